//! postcopy-bench: each hot path of postcopy-ram next to a minimal raw loop doing the same
//! kernel work, in the same run, printed as one table (median, spread over repetitions,
//! library/raw ratio, goal).
//!
//! The library is used only through its C entrypoints and the standalone host, as a C VMM
//! would; the raw side is libc and the kernel's userfaultfd ABI. Memory is warmed before
//! every timed pass (this VM hands freed memory back to its host after ~2 s, and the next
//! touch then costs ~1.5 µs more per page): pages are written, then dropped, right before
//! timing. Mappings get MADV_NOHUGEPAGE, as QEMU gives postcopy RAM.
//!
//! Timing decides nothing here but the table: this is not a test.
#![deny(clippy::undocumented_unsafe_blocks)]

mod bt;
mod e2e;
mod fault;
mod huge;
mod lib_ctx;
mod place;
mod remote;
mod stats;
mod sys;

use std::process::ExitCode;

const USAGE: &str = "\
postcopy-bench: postcopy-ram's hot paths against raw userfaultfd loops, one table.

USAGE:
    cargo run --release --bin postcopy-bench -- [OPTIONS]

OPTIONS:
    --reps N            timed repetitions of placement and blocktime pairs  [default: 5]
    --fault-reps N      timed repetitions of the fault rows (short ones, so a burst of
                        other load spoils few of them)                    [default: 21]
    --blocktime-reps N  timed repetitions of the fault variants measured with blocktime
                        on and off (its cost is ~1 % of a fault)          [default: 61]
    --rows LIST         comma-separated subset of: place,fault,remote,blocktime,e2e
                                                                     [default: all]
    --place-mib N       size of the placement block, MiB              [default: 1024]
    --huge-pages N      2 MiB hugetlbfs pages per side for placement (0: skip;
                        nr_hugepages is raised if needed and restored) [default: 64]
    --faults N          local faults per repetition                   [default: 3000]
    --fault-threads N   faulting threads of the multi-thread variant (1: skip)
                                                                     [default: 2]
    --cpu N             CPU of the pinned variant                     [default: last CPU]
    --remote-faults N   remote (TCP) faults per repetition            [default: 1000]
    --bt-iters N        blocktime pairs per repetition                [default: 2000000]
    --demo-runs N       postcopy-demo runs for row 5                  [default: 1]
    --demo-arg ARG      pass ARG to postcopy-demo (repeatable), e.g. --demo-arg=--ram=256M
    --markdown          print the table as Markdown
    -h, --help          this text

Needs root (or vm.unprivileged_userfaultfd=1 and a writable nr_hugepages).";

pub struct Opts {
    pub reps: usize,
    pub fault_reps: usize,
    pub blocktime_reps: usize,
    pub rows: Vec<String>,
    pub place_mib: u64,
    pub huge_pages: u64,
    pub faults: usize,
    pub fault_threads: usize,
    pub cpu: usize,
    pub remote_faults: usize,
    pub bt_iters: u64,
    pub demo_runs: usize,
    pub demo_args: Vec<String>,
    pub markdown: bool,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        reps: 5,
        fault_reps: 21,
        blocktime_reps: 61,
        rows: ["place", "fault", "remote", "blocktime", "e2e"]
            .map(String::from)
            .to_vec(),
        place_mib: 1024,
        huge_pages: 64,
        faults: 3000,
        fault_threads: 2,
        cpu: sys::online_cpus() - 1,
        remote_faults: 1000,
        bt_iters: 2_000_000,
        demo_runs: 1,
        demo_args: Vec::new(),
        markdown: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{key} needs a value"))
        };
        fn n<T: std::str::FromStr>(k: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{k}: not a number: {v}"))
        }
        match key.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--reps" => o.reps = n(&key, value()?)?,
            "--fault-reps" => o.fault_reps = n(&key, value()?)?,
            "--blocktime-reps" => o.blocktime_reps = n(&key, value()?)?,
            "--rows" => o.rows = value()?.split(',').map(|s| s.trim().to_string()).collect(),
            "--place-mib" => o.place_mib = n(&key, value()?)?,
            "--huge-pages" => o.huge_pages = n(&key, value()?)?,
            "--faults" => o.faults = n(&key, value()?)?,
            "--fault-threads" => o.fault_threads = n(&key, value()?)?,
            "--cpu" => o.cpu = n(&key, value()?)?,
            "--remote-faults" => o.remote_faults = n(&key, value()?)?,
            "--bt-iters" => o.bt_iters = n(&key, value()?)?,
            "--demo-runs" => o.demo_runs = n(&key, value()?)?,
            "--demo-arg" => o.demo_args.push(value()?),
            "--markdown" => o.markdown = true,
            _ => return Err(format!("unknown option {a}")),
        }
    }
    for r in &o.rows {
        if !["place", "fault", "remote", "blocktime", "e2e"].contains(&r.as_str()) {
            return Err(format!("--rows: unknown row group {r}"));
        }
    }
    if o.reps == 0
        || o.fault_reps == 0
        || o.blocktime_reps == 0
        || o.place_mib == 0
        || o.faults == 0
        || o.remote_faults == 0
        || o.fault_threads == 0
    {
        return Err(
            "--reps, --place-mib, --faults, --remote-faults and --fault-threads must be positive"
                .into(),
        );
    }
    if o.cpu >= sys::online_cpus() {
        return Err(format!(
            "--cpu {}: only {} CPUs online",
            o.cpu,
            sys::online_cpus()
        ));
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("postcopy-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = sys::RawUffd::open() {
        eprintln!("postcopy-bench: userfaultfd unavailable ({e}); run as root");
        return ExitCode::FAILURE;
    }
    postcopy_ram::ffi::state::postcopy_infrastructure_init();
    let want = |r: &str| opts.rows.iter().any(|x| x == r);
    let load_before = sys::loadavg();
    let t0 = std::time::Instant::now();
    eprintln!("postcopy-bench: {} repetitions per measurement", opts.reps);
    let mut rows = Vec::new();
    if want("place") {
        rows.extend(place::run(&opts));
    }
    let mut bt_rows = Vec::new();
    if want("fault") || want("blocktime") {
        let f = fault::run(&opts);
        if want("fault") {
            rows.extend(f.local);
        }
        bt_rows = f.blocktime;
    }
    if want("remote") {
        rows.extend(remote::run(&opts));
    }
    if want("blocktime") {
        rows.extend(bt_rows);
        rows.extend(bt::run(&opts));
    }
    if want("e2e") {
        rows.extend(e2e::run(&opts));
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "postcopy-bench: {} CPUs ({}), kernel {}; load average {} before, {} after; {:.0} s",
        sys::online_cpus(),
        sys::cpu_model(),
        sys::kernel(),
        load_before,
        sys::loadavg(),
        secs
    );
    println!(
        "medians over {} repetitions (placement, blocktime pairs), {} (faults), {} (fault variants with blocktime on and off); spread is min-max below 10 repetitions, p10-p90 from 10; lib/raw is the ratio of medians",
        opts.reps, opts.fault_reps, opts.blocktime_reps
    );
    println!();
    stats::print_table(&rows, opts.markdown);
    let missed: Vec<String> = rows
        .iter()
        .filter(|r| r.verdict() == "MISSED")
        .map(|r| format!("{} {}", r.id, r.name))
        .collect();
    println!();
    if missed.is_empty() {
        println!("every goal met");
    } else {
        println!("goals missed: {}", missed.join("; "));
    }
    ExitCode::SUCCESS
}
