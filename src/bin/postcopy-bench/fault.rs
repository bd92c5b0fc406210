//! Row 2 (local fault service) and the fault-throughput half of row 4 (blocktime on/off).
//!
//! Faulting threads ("vCPUs") read one byte of each missing page of their own slice and
//! time each read. Library: its fault thread reads the fault and asks the host for the
//! page; the host's request callback (an in-process source) places it at once with
//! postcopy_place_page, on the fault thread. Raw: a handler thread doing poll + read +
//! UFFDIO_COPY on its own userfaultfd. Same faulting threads, same pages, same warm-up.
use crate::lib_ctx::{LibCtx, FAULT_THREAD};
use crate::stats::{latency_percentiles, Goal, Reps, Row};
use crate::sys::{self, now_ns, pin, EventFd, Mapping, RawUffd, PAGE};
use crate::Opts;
use postcopy_ram::ffi::placement::postcopy_place_page;
use postcopy_ram::ffi::types::RAMBlock;
use postcopy_ram::standalone::PostcopyPageRequest;
use std::ffi::{c_char, c_int, c_void};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;

/// One slice of pages for one faulting thread.
struct Job {
    start: usize,
    pages: usize,
    cpu: Option<usize>,
    barrier: Arc<Barrier>,
}

struct Done {
    lat: Vec<u64>,
    t0: u64,
    t1: u64,
}

struct Worker {
    tid: u32,
    tx: Option<Sender<Job>>,
    rx: Receiver<Done>,
    join: Option<JoinHandle<()>>,
}

/// Persistent faulting threads: their ids exist before setup, so blocktime can know them
/// as vCPUs.
pub struct Workers {
    w: Vec<Worker>,
}

/// What one repetition measured.
pub struct RepResult {
    pub lat: Vec<u64>,
    /// Faults per second over the repetition's wall time.
    pub rate: f64,
    /// CPU time of the whole process (faulting threads, handler or fault thread, source)
    /// per fault, ns: what serving a fault costs, whatever else the machine runs.
    pub cpu_per_fault: f64,
}

impl RepResult {
    pub fn p50_p99(&mut self) -> (f64, f64) {
        latency_percentiles(&mut self.lat)
    }
}

impl Workers {
    pub fn new(n: usize) -> Workers {
        let w = (0..n)
            .map(|i| {
                let (jtx, jrx) = channel::<Job>();
                let (dtx, drx) = channel::<Done>();
                let (ttx, trx) = channel::<u32>();
                let join = std::thread::Builder::new()
                    .name(format!("bench-vcpu{i}"))
                    .spawn(move || {
                        let _ = ttx.send(sys::gettid());
                        while let Ok(job) = jrx.recv() {
                            let _ = dtx.send(fault_slice(job));
                        }
                    })
                    .expect("spawn a faulting thread");
                Worker {
                    tid: trx.recv().expect("worker tid"),
                    tx: Some(jtx),
                    rx: drx,
                    join: Some(join),
                }
            })
            .collect();
        Workers { w }
    }

    pub fn tids(&self) -> Vec<u32> {
        self.w.iter().map(|w| w.tid).collect()
    }

    pub fn len(&self) -> usize {
        self.w.len()
    }

    /// Every worker faults on its share of `pages` pages from `base` (contiguous slices).
    pub fn run(&self, base: usize, pages: usize, cpu: Option<usize>) -> RepResult {
        let n = self.w.len();
        let barrier = Arc::new(Barrier::new(n));
        let per = pages / n;
        let cpu0 = sys::process_cpu_ns();
        for (i, w) in self.w.iter().enumerate() {
            w.tx.as_ref()
                .expect("worker running")
                .send(Job {
                    start: base + i * per * PAGE,
                    pages: per,
                    cpu,
                    barrier: barrier.clone(),
                })
                .expect("worker alive");
        }
        let mut lat = Vec::with_capacity(pages);
        let (mut t0, mut t1) = (u64::MAX, 0);
        for w in &self.w {
            let d = w.rx.recv().expect("worker result");
            lat.extend_from_slice(&d.lat);
            t0 = t0.min(d.t0);
            t1 = t1.max(d.t1);
        }
        let cpu = sys::process_cpu_ns() - cpu0;
        let rate = lat.len() as f64 / ((t1 - t0) as f64 / 1e9);
        let cpu_per_fault = cpu as f64 / lat.len() as f64;
        RepResult {
            lat,
            rate,
            cpu_per_fault,
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.w {
            w.tx.take();
            if let Some(j) = w.join.take() {
                let _ = j.join();
            }
        }
    }
}

fn fault_slice(job: Job) -> Done {
    pin(0, job.cpu).expect("pin a faulting thread");
    let mut lat = Vec::with_capacity(job.pages);
    job.barrier.wait();
    let t0 = now_ns();
    for i in 0..job.pages {
        let p = (job.start + i * PAGE) as *const u8;
        let a = now_ns();
        // SAFETY: inside a mapping the benchmark owns for the whole run; the page is
        // missing and registered, so this read blocks until a handler places it.
        unsafe { std::ptr::read_volatile(p) };
        lat.push(now_ns() - a);
    }
    Done {
        lat,
        t0,
        t1: now_ns(),
    }
}

/// The library's side: a block whose request callback places each page at once.
pub struct LibLocal {
    pub ctx: LibCtx,
    pub mem: Mapping,
    _src: Box<LocalSource>,
}

/// What the request callback needs: the C VMM's view of its source.
struct LocalSource {
    mis: usize,
    base: usize,
    page: Mapping,
}

/// The host's page-request callback, called on the library's fault thread: the "source"
/// is in-process, so the page is placed right here.
unsafe extern "C" fn place_at_once(
    opaque: *mut c_void,
    rb: *mut RAMBlock,
    _idstr: *const c_char,
    req: *const PostcopyPageRequest,
) -> c_int {
    // SAFETY: `opaque` is the LocalSource registered with this callback, alive as long as
    // the context; `req` is the library's live request record.
    let (s, req) = unsafe { (&*(opaque as *const LocalSource), &*req) };
    postcopy_place_page(
        s.mis as *mut _,
        (s.base + req.offset as usize) as *mut c_void,
        s.page.addr() as *mut c_void,
        rb,
    )
}

impl LibLocal {
    pub fn new(pages: usize, vcpus: &[u32]) -> LibLocal {
        let mem = Mapping::anon(pages * PAGE).expect("mmap");
        let page = Mapping::anon(PAGE).expect("mmap");
        page.fill(0x5a);
        let ctx = LibCtx::new();
        ctx.add_block("bench.ram", mem.addr(), pages * PAGE, PAGE, -1);
        for (i, &tid) in vcpus.iter().enumerate() {
            ctx.add_vcpu(i as u32, tid);
        }
        let src = Box::new(LocalSource {
            mis: ctx.mis as usize,
            base: mem.addr(),
            page,
        });
        ctx.set_request_callback(
            Some(place_at_once),
            &*src as *const LocalSource as *mut c_void,
        );
        LibLocal {
            ctx,
            mem,
            _src: src,
        }
    }

    /// One repetition: warm, set up (init discards the block: every page missing), pin
    /// the fault thread, fault, clean up.
    pub fn rep(
        &mut self,
        workers: &Workers,
        pages: usize,
        cpus: Cpus,
        blocktime: bool,
    ) -> RepResult {
        self.mem.touch(0, pages * PAGE, PAGE);
        self.ctx.set_blocktime(blocktime);
        self.ctx.setup();
        let ft = sys::find_thread(FAULT_THREAD).expect("the library's fault thread");
        pin(ft, cpus.handler).expect("pin the fault thread");
        let r = workers.run(self.mem.addr(), pages, cpus.worker);
        let st = self.ctx.stats();
        assert_eq!(
            st.requests_sent as usize,
            pages / workers.len() * workers.len()
        );
        self.ctx.cleanup();
        r
    }
}

/// Where the threads of a repetition may run (`None`: anywhere).
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    /// The faulting threads.
    pub worker: Option<usize>,
    /// The library's fault thread, or the raw handler.
    pub handler: Option<usize>,
}

/// A raw handler thread, started for one repetition as the library starts its fault
/// thread at every setup (from this thread, returning once it runs), so that both sides
/// meet the scheduler alike; stopped and joined on drop.
pub struct Handler {
    pub tid: u32,
    quit: Arc<EventFd>,
    join: Option<JoinHandle<()>>,
}

impl Handler {
    pub fn spawn(name: &str, body: impl FnOnce(&EventFd) + Send + 'static) -> Handler {
        let quit = Arc::new(EventFd::new().expect("eventfd"));
        let q = quit.clone();
        let (tx, rx) = channel();
        let join = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ = tx.send(sys::gettid());
                body(&q)
            })
            .expect("spawn a raw handler");
        let tid = rx.recv().expect("the raw handler started");
        Handler {
            tid,
            quit,
            join: Some(join),
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.quit.kick();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// The raw side: its own userfaultfd over its own block, a handler thread per repetition.
pub struct RawLocal {
    pub mem: Mapping,
    uffd: Arc<RawUffd>,
}

impl RawLocal {
    pub fn new(pages: usize) -> RawLocal {
        let mem = Mapping::anon(pages * PAGE).expect("mmap");
        mem.touch(0, pages * PAGE, PAGE);
        let uffd = Arc::new(RawUffd::open().expect("userfaultfd"));
        uffd.register(mem.addr(), pages * PAGE)
            .expect("UFFDIO_REGISTER");
        RawLocal { mem, uffd }
    }

    pub fn rep(&self, workers: &Workers, pages: usize, cpus: Cpus) -> RepResult {
        self.mem
            .warm_and_drop(0, pages * PAGE, PAGE)
            .expect("drop pages");
        let u = self.uffd.clone();
        let h = Handler::spawn("bench-raw-handl", move |quit| raw_handler(&u, quit));
        pin(h.tid, cpus.handler).expect("pin the raw handler");
        workers.run(self.mem.addr(), pages, cpus.worker)
    }
}

/// poll + read + UFFDIO_COPY, as small as a C handler gets.
fn raw_handler(uffd: &RawUffd, quit: &EventFd) {
    let mut src = vec![0x5au8; PAGE];
    let src_addr = src.as_mut_ptr() as usize;
    sys::raw_fault_loop(uffd, quit, |page| {
        uffd.copy(page, src_addr, PAGE).expect("UFFDIO_COPY");
    });
}

/// A library side and a raw side for one configuration of faulting threads.
struct Bench {
    workers: Workers,
    lib: LibLocal,
    raw: RawLocal,
    pages: usize,
}

/// Blocktime on over off, per repetition: the two runs of a repetition are adjacent in
/// time, so their ratio is free of the drift between repetitions.
#[derive(Default)]
struct Paired {
    rate: Reps,
    cpu: Reps,
}

#[derive(Default)]
struct Figures {
    rate: Reps,
    p50: Reps,
    p99: Reps,
    cpu: Reps,
}

impl Figures {
    fn add(&mut self, mut r: RepResult) {
        let (p50, p99) = r.p50_p99();
        self.rate.push(r.rate / 1e3);
        self.p50.push(p50 / 1e3);
        self.p99.push(p99 / 1e3);
        self.cpu.push(r.cpu_per_fault / 1e3);
    }
}

impl Bench {
    fn new(threads: usize, faults: usize) -> Bench {
        let workers = Workers::new(threads);
        let pages = faults / threads * threads;
        let lib = LibLocal::new(pages, &workers.tids());
        let raw = RawLocal::new(pages);
        Bench {
            workers,
            lib,
            raw,
            pages,
        }
    }

    /// Interleaved repetitions: library (blocktime off), raw, and library with blocktime
    /// on when asked; one untimed round first.
    fn measure(
        &mut self,
        reps: usize,
        cpus: Cpus,
        with_blocktime: bool,
    ) -> (Figures, Figures, Figures, Paired) {
        let (mut lib, mut raw, mut bt) =
            (Figures::default(), Figures::default(), Figures::default());
        let mut paired = Paired::default();
        for rep in 0..=reps {
            // Which side goes first alternates, so neither always inherits the other's
            // scheduler state.
            let (l, r) = if rep % 2 == 0 {
                let l = self.lib.rep(&self.workers, self.pages, cpus, false);
                (l, self.raw.rep(&self.workers, self.pages, cpus))
            } else {
                let r = self.raw.rep(&self.workers, self.pages, cpus);
                (self.lib.rep(&self.workers, self.pages, cpus, false), r)
            };
            let b = with_blocktime.then(|| self.lib.rep(&self.workers, self.pages, cpus, true));
            if rep == 0 {
                continue;
            }
            if let Some(b) = b {
                paired.rate.push(b.rate / l.rate);
                paired.cpu.push(b.cpu_per_fault / l.cpu_per_fault);
                bt.add(b);
            }
            lib.add(l);
            raw.add(r);
        }
        (lib, raw, bt, paired)
    }
}

pub struct FaultRows {
    pub local: Vec<Row>,
    pub blocktime: Vec<Row>,
}

pub fn run(opts: &Opts) -> FaultRows {
    let mut local = Vec::new();
    let mut blocktime = Vec::new();
    let mut variant = |id: char, label: &str, threads: usize, cpus: Cpus, bt: bool| {
        eprintln!("  local faults: {label} ...");
        let mut b = Bench::new(threads, opts.faults);
        // The blocktime cost is ~1 % of a fault: more repetitions to resolve it.
        let reps = if bt {
            opts.blocktime_reps
        } else {
            opts.fault_reps
        };
        let (lib, raw, on, paired) = b.measure(reps, cpus, bt);
        local.push(Row::new(
            &format!("2{id}"),
            &format!("local fault p50, {label}"),
            "us",
            lib.p50.clone(),
            Some(raw.p50),
            Goal::RatioAtMost(1.1),
        ));
        local.push(Row::new(
            &format!("2{id}"),
            &format!("local fault p99, {label}"),
            "us",
            lib.p99,
            Some(raw.p99),
            Goal::None,
        ));
        local.push(Row::new(
            &format!("2{id}"),
            &format!("local fault rate, {label}"),
            "kfaults/s",
            lib.rate.clone(),
            Some(raw.rate),
            Goal::None,
        ));
        local.push(Row::new(
            &format!("2{id}"),
            &format!("local fault CPU time per fault (all threads), {label}"),
            "us",
            lib.cpu.clone(),
            Some(raw.cpu),
            Goal::None,
        ));
        if bt {
            blocktime.push(Row::new(
                &format!("4{id}"),
                &format!("fault rate, blocktime on / off, paired per repetition, {label}"),
                "x",
                paired.rate,
                None,
                Goal::AtLeast(0.98),
            ));
            blocktime.push(Row::new(
                &format!("4{id}"),
                &format!("CPU time per fault, blocktime on / off, paired per repetition, {label}"),
                "x",
                paired.cpu,
                None,
                Goal::AtMost(1.02),
            ));
            blocktime.push(Row::new(
                &format!("4{id}"),
                &format!("fault rate, blocktime on (lib) vs off (raw col.), {label}"),
                "kfaults/s",
                on.rate,
                Some(lib.rate),
                Goal::None,
            ));
            blocktime.push(Row::new(
                &format!("4{id}"),
                &format!("fault p50, blocktime on (lib) vs off (raw col.), {label}"),
                "us",
                on.p50,
                Some(lib.p50),
                Goal::None,
            ));
        }
    };
    let cpu = opts.cpu;
    let other = (cpu + 1) % sys::online_cpus();
    let same = Cpus {
        worker: Some(cpu),
        handler: Some(cpu),
    };
    let anywhere = Cpus {
        worker: None,
        handler: None,
    };
    variant('a', &format!("1 thread, all on CPU {cpu}"), 1, same, true);
    if other != cpu {
        let cross = Cpus {
            worker: Some(cpu),
            handler: Some(other),
        };
        let label = format!("1 thread on CPU {cpu}, handler on CPU {other}");
        variant('b', &label, 1, cross, false);
    }
    variant('c', "1 thread, unpinned", 1, anywhere, false);
    if opts.fault_threads > 1 {
        let n = opts.fault_threads;
        variant(
            'd',
            &format!("{n} threads, all on CPU {cpu}"),
            n,
            same,
            true,
        );
        variant('e', &format!("{n} threads, unpinned"), n, anywhere, false);
    }
    FaultRows { local, blocktime }
}
