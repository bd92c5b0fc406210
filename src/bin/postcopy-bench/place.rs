//! Row 1: placement. The library's placement entrypoints into a registered block against
//! the bare ioctl loop on a block of the same size registered on a raw userfaultfd.
//! Nothing faults here: this is the loading thread's cost per page.
use crate::huge::HugePool;
use crate::lib_ctx::LibCtx;
use crate::stats::{Goal, Reps, Row};
use crate::sys::{thread_cpu_ns as cpu_ns, Mapping, RawUffd, HUGE_PAGE, PAGE};
use crate::Opts;
use postcopy_ram::ffi::placement::{
    postcopy_place_page, postcopy_place_page_zero, postcopy_place_pages,
};
use postcopy_ram::ffi::types::{MigrationIncomingState, RAMBlock};
use std::ffi::c_void;

/// Pages per call of the batched rows: 64 KiB of 4 KiB pages.
const RUN: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    /// One page per call.
    Copy,
    Zero,
    /// RUN pages per call.
    CopyRun,
}

/// One block on each side, both warmed and emptied before every timed pass.
struct Sides {
    ctx: LibCtx,
    rb: *mut RAMBlock,
    lib_mem: Mapping,
    raw: RawUffd,
    raw_mem: Mapping,
    src: Mapping,
    /// Never written: reads as zeros (the kernel's zero page), like the library's zero page.
    zeros: Mapping,
    page: usize,
}

impl Sides {
    fn new(len: usize, page: usize) -> std::io::Result<Sides> {
        let (lib_mem, raw_mem, src) = if page == HUGE_PAGE {
            (
                Mapping::hugetlb(len)?,
                Mapping::hugetlb(len)?,
                Mapping::anon(HUGE_PAGE)?,
            )
        } else {
            (
                Mapping::anon(len)?,
                Mapping::anon(len)?,
                Mapping::anon(RUN * PAGE)?,
            )
        };
        src.fill(0x5a);
        let zeros = Mapping::anon(page)?;
        let mut ctx = LibCtx::new();
        let fd = lib_mem
            .fd
            .as_ref()
            .map_or(-1, std::os::fd::AsRawFd::as_raw_fd);
        let rb = ctx.add_block("bench.ram", lib_mem.addr(), len, page, fd);
        ctx.setup();
        let raw = RawUffd::open()?;
        raw.register(raw_mem.addr(), len)?;
        Ok(Sides {
            ctx,
            rb,
            lib_mem,
            raw,
            raw_mem,
            src,
            zeros,
            page,
        })
    }

    fn mis(&self) -> *mut MigrationIncomingState {
        self.ctx.mis
    }

    /// Places the pages of `[off, off + len)` of the library's block; returns the thread
    /// CPU time it took, ns.
    fn lib_chunk(&self, op: Op, off: usize, len: usize) -> u64 {
        let base = self.lib_mem.addr();
        let (mis, rb, src, ps) = (
            self.mis(),
            self.rb,
            self.src.addr() as *mut c_void,
            self.page,
        );
        let t0 = cpu_ns();
        match op {
            Op::Copy => {
                for a in (base + off..base + off + len).step_by(ps) {
                    let rc = postcopy_place_page(mis, a as *mut c_void, src, rb);
                    assert_eq!(rc, 0, "postcopy_place_page");
                }
            }
            Op::Zero => {
                for a in (base + off..base + off + len).step_by(ps) {
                    let rc = postcopy_place_page_zero(mis, a as *mut c_void, rb);
                    assert_eq!(rc, 0, "postcopy_place_page_zero");
                }
            }
            Op::CopyRun => {
                for a in (base + off..base + off + len).step_by(ps * RUN) {
                    let rc = postcopy_place_pages(mis, a as *mut c_void, src, RUN as u64, rb);
                    assert_eq!(rc, 0, "postcopy_place_pages");
                }
            }
        }
        cpu_ns() - t0
    }

    /// The same with bare ioctls on the raw block, `run` pages per UFFDIO_COPY.
    fn raw_chunk(&self, op: Op, run: usize, off: usize, len: usize) -> u64 {
        let base = self.raw_mem.addr();
        let (src, ps) = (self.src.addr(), self.page);
        let t0 = cpu_ns();
        match op {
            Op::Copy | Op::CopyRun => {
                for a in (base + off..base + off + len).step_by(ps * run) {
                    self.raw.copy(a, src, ps * run).expect("UFFDIO_COPY");
                }
            }
            Op::Zero if ps == HUGE_PAGE => {
                // hugetlbfs has no UFFDIO_ZEROPAGE: a C VMM copies a zero page, as the
                // library does (from never-written memory, as the library's zero page).
                for a in (base + off..base + off + len).step_by(ps) {
                    self.raw
                        .copy(a, self.zeros.addr(), ps)
                        .expect("UFFDIO_COPY");
                }
            }
            Op::Zero => {
                for a in (base + off..base + off + len).step_by(ps) {
                    self.raw.zeropage(a, ps).expect("UFFDIO_ZEROPAGE");
                }
            }
        }
        cpu_ns() - t0
    }

    /// Right before the library places `[off, off + len)`: write every page (present
    /// from the last pass, so no fault: the VM's host backs them), then drop them through
    /// the library's discard, so the kernel's next allocations reuse those warm frames.
    fn warm_lib(&self, off: usize, len: usize) {
        self.lib_mem.touch(off, len, self.page);
        self.ctx.discard(self.rb, off, len);
    }

    fn warm_raw(&self, off: usize, len: usize) {
        self.raw_mem
            .warm_and_drop(off, len, self.page)
            .expect("drop pages");
    }
}

/// Bytes placed by one side before the other side takes its turn.
const CHUNK: usize = 1 << 20;

/// Repetitions of `op` over the whole block on both sides. First both blocks are emptied
/// and filled by one untimed copy pass, so every measurement starts from the same state
/// (present, writable pages, which warming can write without faulting). In each
/// repetition the library and the raw loop take turns chunk by chunk, so that whatever
/// else the machine does falls on both alike; each chunk of both sides is warmed and
/// emptied right before either is placed (a freed page the VM's host has taken back costs
/// ~1.5 µs more to touch after ~2 s), and which side goes first alternates, because a side
/// placing into frames the other side just freed finds more of them in the cache. Each
/// side is timed in its thread CPU time (the loops never block). Returns Mpages/s.
fn measure(s: &Sides, op: Op, raw_run: usize, reps: usize) -> (Reps, Reps) {
    let (mut lib, mut raw) = (Reps::default(), Reps::default());
    let len = s.lib_mem.len();
    let chunk = CHUNK.max(s.page).min(len);
    s.ctx.discard(s.rb, 0, len);
    s.raw_mem.drop_pages(0, len).expect("drop pages");
    s.lib_chunk(Op::Copy, 0, len);
    s.raw_chunk(Op::Copy, 1, 0, len);
    for _ in 0..reps {
        let (mut tl, mut tr) = (0u64, 0u64);
        for (i, off) in (0..len).step_by(chunk).enumerate() {
            if i % 2 == 0 {
                s.warm_lib(off, chunk);
                s.warm_raw(off, chunk);
                tl += s.lib_chunk(op, off, chunk);
                tr += s.raw_chunk(op, raw_run, off, chunk);
            } else {
                s.warm_raw(off, chunk);
                s.warm_lib(off, chunk);
                tr += s.raw_chunk(op, raw_run, off, chunk);
                tl += s.lib_chunk(op, off, chunk);
            }
        }
        let pages = (len / s.page) as f64;
        lib.push(pages / tl as f64 * 1e3);
        raw.push(pages / tr as f64 * 1e3);
    }
    (lib, raw)
}

pub fn run(opts: &Opts) -> Vec<Row> {
    let mut rows = Vec::new();
    let len = (opts.place_mib as usize) << 20;
    let mib = opts.place_mib;
    match Sides::new(len, PAGE) {
        Ok(s) => {
            eprintln!("  place_page 4 KiB x {} ...", len / PAGE);
            let (lib, raw) = measure(&s, Op::Copy, 1, opts.reps);
            let raw4k = raw.clone();
            rows.push(Row::new(
                "1a",
                &format!("place_page 4 KiB into {mib} MiB block vs UFFDIO_COPY 4 KiB"),
                "Mpages/s",
                lib,
                Some(raw),
                Goal::RatioAtLeast(0.95),
            ));
            eprintln!("  place_page_zero 4 KiB ...");
            let (lib, raw) = measure(&s, Op::Zero, 1, opts.reps);
            rows.push(Row::new(
                "1b",
                "place_page_zero 4 KiB vs UFFDIO_ZEROPAGE 4 KiB",
                "Mpages/s",
                lib,
                Some(raw),
                Goal::RatioAtLeast(0.95),
            ));
            eprintln!("  place_pages 64 KiB runs ...");
            let (lib, raw) = measure(&s, Op::CopyRun, RUN, opts.reps);
            let lib_run = lib.clone();
            rows.push(Row::new(
                "1c",
                "place_pages 16 x 4 KiB vs UFFDIO_COPY 64 KiB",
                "Mpages/s",
                lib,
                Some(raw),
                Goal::RatioAtLeast(0.95),
            ));
            rows.push(Row::new(
                "1d",
                "place_pages 16 x 4 KiB vs UFFDIO_COPY 4 KiB (gain)",
                "Mpages/s",
                lib_run,
                Some(raw4k),
                Goal::None,
            ));
        }
        Err(e) => rows.push(Row::missing(
            "1a",
            "placement 4 KiB",
            format!("setup failed: {e}"),
        )),
    }
    if opts.huge_pages == 0 {
        rows.push(Row::missing(
            "1e",
            "place_page 2 MiB hugetlbfs",
            "skipped (--huge-pages 0)".into(),
        ));
        return rows;
    }
    let n = opts.huge_pages as usize;
    // Two blocks of n pages, the library's zero page and one spare.
    match HugePool::reserve(2 * n as u64 + 2) {
        Err(why) => rows.push(Row::missing(
            "1e",
            "place_page 2 MiB hugetlbfs",
            format!("skipped: {why}"),
        )),
        Ok(pool) => {
            match Sides::new(n * HUGE_PAGE, HUGE_PAGE) {
                Ok(s) => {
                    eprintln!("  place_page 2 MiB x {n} ...");
                    let reps = opts.reps * 3;
                    let (lib, raw) = measure(&s, Op::Copy, 1, reps);
                    rows.push(Row::new(
                        "1e",
                        "place_page 2 MiB hugetlbfs vs UFFDIO_COPY 2 MiB",
                        "pages/ms",
                        Reps(lib.0.iter().map(|x| x * 1e3).collect()),
                        Some(Reps(raw.0.iter().map(|x| x * 1e3).collect())),
                        Goal::RatioAtLeast(0.95),
                    ));
                    let (lib, raw) = measure(&s, Op::Zero, 1, reps);
                    rows.push(Row::new(
                        "1f",
                        "place_page_zero 2 MiB hugetlbfs vs UFFDIO_COPY of zeros",
                        "pages/ms",
                        Reps(lib.0.iter().map(|x| x * 1e3).collect()),
                        Some(Reps(raw.0.iter().map(|x| x * 1e3).collect())),
                        Goal::RatioAtLeast(0.95),
                    ));
                    drop(s);
                }
                Err(e) => rows.push(Row::missing(
                    "1e",
                    "place_page 2 MiB hugetlbfs",
                    format!("setup failed: {e}"),
                )),
            }
            drop(pool);
        }
    }
    rows
}
