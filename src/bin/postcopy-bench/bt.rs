//! Row 4, bookkeeping half: the cost of one blocktime begin + end pair, from the
//! library's own benchmark helpers (src/blocktime.rs), timed in thread CPU time.
use crate::stats::{Goal, Reps, Row};
use crate::Opts;
use postcopy_ram::blocktime::{
    bench_clock, bench_disabled, bench_pairs, bench_pairs_with, bench_shared_page, Clock,
};
use std::sync::Arc;

/// A clock that does not move: what a pair costs without its two clock reads.
struct Frozen;

impl Clock for Frozen {
    fn now_ns(&self) -> u64 {
        1
    }
}

fn reps(n: usize, mut f: impl FnMut() -> f64) -> Reps {
    let mut r = Reps::default();
    f(); // warm-up
    for _ in 0..n {
        r.push(f());
    }
    r
}

pub fn run(opts: &Opts) -> Vec<Row> {
    eprintln!("  blocktime begin+end pairs ...");
    let it = opts.bt_iters;
    let n = opts.reps;
    let mut rows = Vec::new();
    for vcpus in [1usize, 64, 512] {
        for outstanding in [1usize, 64] {
            // The goal is for 512 vCPUs; fewer show it is O(1) in the count.
            let goal = if vcpus == 512 {
                Goal::AtMost(50.0)
            } else {
                Goal::None
            };
            rows.push(Row::new(
                "4p",
                &format!("blocktime begin+end, {vcpus} vCPUs, {outstanding} outstanding"),
                "ns/pair",
                reps(n, || bench_pairs(vcpus, outstanding, it)),
                None,
                goal,
            ));
        }
    }
    for outstanding in [1usize, 64] {
        rows.push(Row::new(
            "4p",
            &format!("  same, 512 vCPUs, {outstanding} outstanding, clock reads left out"),
            "ns/pair",
            reps(n, || {
                bench_pairs_with(Arc::new(Frozen), 512, outstanding, it)
            }),
            None,
            Goal::None,
        ));
    }
    rows.push(Row::new(
        "4p",
        "blocktime, two vCPUs on one page (begin+begin+end)",
        "ns/page",
        reps(n, || bench_shared_page(2, it)),
        None,
        Goal::None,
    ));
    rows.push(Row::new(
        "4p",
        "blocktime disabled, begin+end sites",
        "ns/pair",
        reps(n, || bench_disabled(it)),
        None,
        Goal::AtMost(5.0),
    ));
    rows.push(Row::new(
        "4p",
        "clock read (CLOCK_MONOTONIC; one per begin, one per end)",
        "ns",
        reps(n, || bench_clock(it)),
        None,
        Goal::None,
    ));
    rows
}
