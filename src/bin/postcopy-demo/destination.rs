//! The destination: allocates the guest's RAM, drives postcopy-ram through its C
//! entrypoints and the standalone host (init, precopy pages marked received, discards,
//! setup), runs the vCPUs, places every page that arrives on either channel, and checks
//! every page against the source's checksums.
use crate::protocol::{self, FrameReader, Header, Kind, Phase};
use crate::ram::{self, fmt_bytes, HugePages, Layout, Mapping, HUGE_PAGE, TARGET_PAGE};
use crate::report::{self, Blocktime, DestStats, LibraryStats, SourceStats, Verification};
use crate::source::errno_str;
use crate::vcpu::{self, Gate, RamView};
use crate::{Config, Failure, Outcome};
use indicatif::ProgressBar;
use parking_lot::Mutex;
use postcopy_ram::ffi::blocktime::{postcopy_blocktime_query, PostcopyBlocktimeInfo};
use postcopy_ram::ffi::host_ops::postcopy_host_unregister;
use postcopy_ram::ffi::incoming::{
    postcopy_incoming_get_stats, postcopy_ram_incoming_cleanup, postcopy_ram_incoming_init,
    postcopy_ram_incoming_setup, postcopy_ram_prepare_discard, postcopy_ram_supported_by_host,
    PostcopyIncomingStats,
};
use postcopy_ram::ffi::placement::{postcopy_place_page, postcopy_place_page_zero};
use postcopy_ram::ffi::standalone::{
    postcopy_error_free, postcopy_error_message, postcopy_standalone_add_ram_block,
    postcopy_standalone_add_vcpu, postcopy_standalone_discard_range, postcopy_standalone_host_free,
    postcopy_standalone_host_install, postcopy_standalone_host_new,
    postcopy_standalone_mark_received, postcopy_standalone_page_received,
    postcopy_standalone_set_capabilities, postcopy_standalone_set_log_callback,
    postcopy_standalone_set_request_callback, PostcopyStandaloneHost,
};
use postcopy_ram::ffi::state::{postcopy_infrastructure_init, postcopy_state_set};
use postcopy_ram::ffi::types::{
    Error as CError, MigrationIncomingState, PostcopyStateArg, RAMBlock,
};
use postcopy_ram::standalone::PostcopyPageRequest;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::{self, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// PostcopyState values (the C enum), as postcopy_state_set takes them.
const POSTCOPY_INCOMING_ADVISE: u32 = 1;
const POSTCOPY_INCOMING_LISTENING: u32 = 3;
const POSTCOPY_INCOMING_RUNNING: u32 = 4;
const POSTCOPY_INCOMING_END: u32 = 5;

/// A C pointer shared between the destination's threads.
#[derive(Clone, Copy)]
struct CPtr<T>(*mut T);
// SAFETY: these are the library's handles (host, RAMBlock) and our MigrationIncomingState
// key; the library documents which entrypoints may be called from any thread, and we only
// call those from other threads (placement from the loading threads).
unsafe impl<T> Send for CPtr<T> {}
// SAFETY: as above; the pointers themselves are never dereferenced by us.
unsafe impl<T> Sync for CPtr<T> {}

/// Everything the destination's threads share; also the request callback's `opaque`.
struct Dest {
    layout: Layout,
    maps: Vec<Mapping>,
    host: CPtr<PostcopyStandaloneHost>,
    mis: CPtr<MigrationIncomingState>,
    rbs: Vec<CPtr<RAMBlock>>,
    /// The urgent channel, written by the library's fault thread (page requests).
    urgent_out: TcpStream,
    /// The main channel's return path (progress, report, failure).
    ret: Mutex<TcpStream>,
    epoch: Instant,
    /// Per page: when it was requested (ns since `epoch`, plus one), 0 when not pending.
    req_time: Vec<AtomicU64>,
    /// Pages in place (received in precopy and kept, or placed).
    in_place: AtomicU64,
    placed_stream: AtomicU64,
    placed_urgent: AtomicU64,
    placed_zero: AtomicU64,
    last_placed_ns: AtomicU64,
    latencies: Mutex<Vec<u64>>,
    phase: AtomicU32,
    /// Set when the last page is in place: the vCPUs' workload ends with the migration.
    complete: Arc<AtomicBool>,
}

impl Dest {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Checks a (block, byte offset) from the wire.
    fn page_of(&self, block: u32, offset: u64) -> Result<(usize, u64), String> {
        let b = block as usize;
        let ps = self.layout.page_size;
        if b >= self.layout.blocks.len() || offset % ps != 0 || offset >= self.layout.blocks[b].len
        {
            return Err(format!(
                "the source sent an invalid page (block {block}, offset {offset:#x})"
            ));
        }
        Ok((b, offset / ps))
    }

    /// Places a page that arrived after switchover (data, or a zero page).
    fn place(&self, b: usize, page: u64, data: Option<&[u8]>, urgent: bool) -> Result<(), String> {
        let ps = self.layout.page_size;
        let host_addr = (self.maps[b].addr() + (page * ps) as usize) as *mut c_void;
        let rc = match data {
            Some(d) => postcopy_place_page(
                self.mis.0,
                host_addr,
                d.as_ptr().cast_mut().cast(),
                self.rbs[b].0,
            ),
            None => postcopy_place_page_zero(self.mis.0, host_addr, self.rbs[b].0),
        };
        if rc != 0 {
            return Err(format!(
                "placing page {:#x} of RAM block '{}' failed: {}",
                page * ps,
                self.layout.blocks[b].name,
                errno_str(rc)
            ));
        }
        let now = self.now_ns();
        let t = self.req_time[self.layout.global(b, page) as usize].swap(0, Ordering::AcqRel);
        if t != 0 {
            self.latencies.lock().push(now.saturating_sub(t - 1));
        }
        if data.is_none() {
            self.placed_zero.fetch_add(1, Ordering::Relaxed);
        }
        if urgent {
            self.placed_urgent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.placed_stream.fetch_add(1, Ordering::Relaxed);
        }
        if self.in_place.fetch_add(1, Ordering::AcqRel) + 1 == self.layout.total_pages {
            self.complete.store(true, Ordering::Release);
        }
        self.last_placed_ns.fetch_max(now, Ordering::Relaxed);
        Ok(())
    }

    fn send_ret(&self, h: Header, payload: &[u8]) -> io::Result<()> {
        protocol::send_now(&self.ret.lock(), h, payload)
    }
}

/// The standalone host's request callback, on the library's fault thread: note the time and
/// send the request on the urgent channel.
unsafe extern "C" fn on_request(
    opaque: *mut c_void,
    _rb: *mut RAMBlock,
    _idstr: *const c_char,
    req: *const PostcopyPageRequest,
) -> c_int {
    // SAFETY: `opaque` is the Dest that run() registered; run() keeps it alive until after
    // postcopy_ram_incoming_cleanup, which joins the fault thread. `req` is the library's
    // record, valid for the call.
    let (d, r) = unsafe { (&*(opaque as *const Dest), &*req) };
    let ps = d.layout.page_size;
    let b = r.block_index as usize;
    if b < d.layout.blocks.len() && r.offset < d.layout.blocks[b].len {
        let g = d.layout.global(b, r.offset / ps) as usize;
        // The first request counts: a request sent again after a pause keeps its start.
        let _ =
            d.req_time[g].compare_exchange(0, d.now_ns() + 1, Ordering::AcqRel, Ordering::Relaxed);
    }
    match protocol::send_now(
        &d.urgent_out,
        Header::new(Kind::Request, r.block_index, r.offset),
        &[],
    ) {
        Ok(()) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Undoes what the destination set up, whatever happened: vCPUs released from the gate,
/// the incoming side cleaned up (after cutting the urgent channel, so a fault thread
/// blocked sending a request cannot hold cleanup up), the host unregistered and freed.
struct Session {
    dest: Arc<Dest>,
    gate: Arc<Gate>,
    /// postcopy_ram_incoming_init succeeded and cleanup has not run.
    needs_cleanup: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.gate.abort();
        if self.needs_cleanup {
            let _ = self.dest.urgent_out.shutdown(Shutdown::Both);
            postcopy_ram_incoming_cleanup(self.dest.mis.0);
        }
        postcopy_host_unregister();
        postcopy_standalone_host_free(self.dest.host.0);
    }
}

/// What to tell a user whose process may not use userfaultfd.
fn uffd_hint(detail: &str) -> String {
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let dev = match std::fs::metadata("/dev/userfaultfd") {
        Ok(m) => format!(
            "mode {:04o}, owner uid {}, group gid {}",
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        ),
        Err(e) => format!("not usable: {e}"),
    };
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    format!(
        "userfaultfd is not permitted for this process (uid {uid}), and postcopy needs it: \
         allow it with `sysctl -w vm.unprivileged_userfaultfd=1` (now {sysctl}), or give this \
         user read and write access to /dev/userfaultfd (now {dev}), or run as root \
         [{detail}]"
    )
}

fn is_uffd_permission(rc: i32, msg: &str) -> bool {
    rc == -libc::EPERM
        || rc == -libc::EACCES
        || (msg.contains("userfaultfd not available")
            && (msg.contains("not permitted") || msg.contains("denied")))
}

fn read_hello(stream: &TcpStream) -> Result<serde_json::Value, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut rd = FrameReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let h = rd
        .next_header()
        .map_err(|e| format!("reading the source's greeting: {e}"))?
        .ok_or("a peer connected and closed without a greeting")?;
    if h.kind != Kind::Hello {
        return Err(format!(
            "a peer connected but sent {:?} instead of a greeting",
            h.kind
        ));
    }
    let p = rd
        .payload(&h)
        .map_err(|e| format!("reading the source's greeting: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&p).map_err(|e| format!("bad greeting: {e}"))?;
    if v["version"].as_u64() != Some(protocol::VERSION) {
        return Err(format!(
            "the source speaks protocol version {}, this destination {}",
            v["version"],
            protocol::VERSION
        ));
    }
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(v)
}

/// Waits for the source's two connections: main (with the configuration), then urgent.
fn accept_pair(listener: &TcpListener) -> Result<(TcpStream, TcpStream, Config), String> {
    let mut main = None;
    let mut urgent = None;
    let mut deadline: Option<Instant> = None;
    while main.is_none() || urgent.is_none() {
        let (s, peer) = match deadline {
            None => listener.accept().map_err(|e| format!("accept: {e}"))?,
            Some(d) => {
                listener.set_nonblocking(true).map_err(|e| e.to_string())?;
                let r = loop {
                    match listener.accept() {
                        Ok(x) => break x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if Instant::now() > d {
                                return Err(
                                    "the source opened one channel but not the second within 30 s"
                                        .into(),
                                );
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => return Err(format!("accept: {e}")),
                    }
                };
                listener.set_nonblocking(false).map_err(|e| e.to_string())?;
                r
            }
        };
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        protocol::tune(&s).map_err(|e| e.to_string())?;
        let v = read_hello(&s).map_err(|e| format!("{e} (from {peer})"))?;
        match v["channel"].as_str() {
            Some("main") if main.is_none() => {
                let cfg: Config = serde_json::from_value(v["config"].clone())
                    .map_err(|e| format!("bad configuration from the source: {e}"))?;
                main = Some((s, cfg));
            }
            Some("urgent") if urgent.is_none() => urgent = Some(s),
            other => return Err(format!("unexpected channel {other:?} from {peer}")),
        }
        deadline.get_or_insert(Instant::now() + Duration::from_secs(30));
    }
    let (main, cfg) = main.expect("main channel");
    Ok((main, urgent.expect("urgent channel"), cfg))
}

/// Runs the destination on `addr`. `child`: spawned by a local run (no progress bar, no
/// report; the source prints them).
pub fn run(addr: &str, child: bool) -> Result<Outcome, Failure> {
    let start = Instant::now();
    let listener = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    if child {
        let mut out = io::stdout();
        let _ = writeln!(out, "listening on {local}");
        let _ = out.flush();
    } else {
        eprintln!(
            "postcopy-demo: destination listening on {local}; start the source with `postcopy-demo --connect HOST:{}`",
            local.port()
        );
    }
    let (main, urgent, cfg) = accept_pair(&listener)?;
    drop(listener);
    let ret = main.try_clone().map_err(|e| e.to_string())?;
    let result = run_connected(&cfg, main, urgent, child, start);
    match result {
        Ok(o) => Ok(o),
        Err(mut f) => {
            if !f.reported_to_peer {
                let msg = f.message.as_bytes();
                f.reported_to_peer =
                    protocol::send_now(&ret, Header::new(Kind::Failed, 0, msg.len() as u64), msg)
                        .is_ok();
            }
            let _ = ret.shutdown(Shutdown::Both);
            Err(f)
        }
    }
}

fn run_connected(
    cfg: &Config,
    main: TcpStream,
    urgent: TcpStream,
    child: bool,
    start: Instant,
) -> Result<Outcome, Failure> {
    let layout = Layout::new(cfg.ram, cfg.page_size)?;
    let total = layout.total_pages;
    let ps = layout.page_size;
    if !child {
        ram::check_memory(cfg.ram + 32 * ram::MIB, "the destination's guest RAM")?;
    }
    // Huge pages first (restored last, after the mappings are gone).
    let _huge = if ps == HUGE_PAGE {
        Some(HugePages::reserve(total)?)
    } else {
        None
    };
    let maps = layout
        .blocks
        .iter()
        .map(|b| {
            if ps == HUGE_PAGE {
                Mapping::hugetlb(b.name, b.len).map_err(|e| {
                    format!(
                        "cannot allocate RAM block '{}' ({}) on hugetlbfs: {e}; are {} free 2 MiB huge pages reserved (vm.nr_hugepages)?",
                        b.name,
                        fmt_bytes(b.len),
                        b.len / HUGE_PAGE
                    )
                })
            } else {
                Mapping::anonymous(b.len).map_err(|e| {
                    format!("not enough memory for RAM block '{}' ({}): {e}", b.name, fmt_bytes(b.len))
                })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;

    // The library, as a C hypervisor sets it up.
    postcopy_infrastructure_init();
    let host = postcopy_standalone_host_new(TARGET_PAGE);
    if host.is_null() {
        return Err("postcopy_standalone_host_new failed".to_string().into());
    }
    let rc = postcopy_standalone_host_install(host);
    if rc != 0 {
        postcopy_standalone_host_free(host);
        return Err(format!("postcopy_standalone_host_install: {}", errno_str(rc)).into());
    }
    postcopy_standalone_set_log_callback(host, Some(crate::library_log), std::ptr::null_mut());
    // Our MigrationIncomingState: the library only uses its address as a key.
    let mis_storage = Box::new(0u64);
    let mis = (&*mis_storage as *const u64)
        .cast_mut()
        .cast::<MigrationIncomingState>();
    let mut rbs = Vec::new();
    for (b, m) in layout.blocks.iter().zip(&maps) {
        let name = CString::new(b.name).expect("no NUL in block names");
        let rb = postcopy_standalone_add_ram_block(
            host,
            name.as_ptr(),
            m.ptr().cast(),
            b.len,
            ps,
            m.fd(),
            0,
        );
        if rb.is_null() {
            postcopy_host_unregister();
            postcopy_standalone_host_free(host);
            return Err(format!("postcopy_standalone_add_ram_block('{}') failed", b.name).into());
        }
        rbs.push(CPtr(rb));
    }
    let dest = Arc::new(Dest {
        layout: layout.clone(),
        maps,
        host: CPtr(host),
        mis: CPtr(mis),
        rbs,
        urgent_out: urgent.try_clone().map_err(|e| e.to_string())?,
        ret: Mutex::new(main.try_clone().map_err(|e| e.to_string())?),
        epoch: Instant::now(),
        req_time: (0..total).map(|_| AtomicU64::new(0)).collect(),
        in_place: AtomicU64::new(0),
        placed_stream: AtomicU64::new(0),
        placed_urgent: AtomicU64::new(0),
        placed_zero: AtomicU64::new(0),
        last_placed_ns: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
        phase: AtomicU32::new(Phase::Precopy as u32),
        complete: Arc::new(AtomicBool::new(false)),
    });
    let gate = Arc::new(Gate::default());
    let mut session = Session {
        dest: dest.clone(),
        gate: gate.clone(),
        needs_cleanup: false,
    };
    let rc = postcopy_standalone_set_request_callback(
        host,
        Some(on_request),
        Arc::as_ptr(&dest).cast_mut().cast(),
    );
    if rc != 0 {
        return Err(format!(
            "postcopy_standalone_set_request_callback: {}",
            errno_str(rc)
        )
        .into());
    }

    // vCPUs: started now so their thread ids reach the library (blocktime), held at the gate.
    let view = RamView::new(
        &layout,
        &dest.maps.iter().map(|m| m.addr()).collect::<Vec<_>>(),
        dest.clone(),
    );
    let mut vcpus = Vec::new();
    for i in 0..cfg.vcpus {
        let v = vcpu::spawn(
            i,
            cfg.vcpus,
            cfg.pattern,
            view.clone(),
            gate.clone(),
            dest.complete.clone(),
        )
        .map_err(|e| format!("cannot start vCPU thread {i}: {e}"))?;
        postcopy_standalone_add_vcpu(host, v.index, v.tid);
        vcpus.push(v);
    }
    postcopy_standalone_set_capabilities(host, true, false);

    // Advise: can this host do postcopy at all?
    let mut err: *mut CError = std::ptr::null_mut();
    if !postcopy_ram_supported_by_host(mis, &mut err) {
        let msg = if err.is_null() {
            "unknown reason".to_string()
        } else {
            // SAFETY: the standalone host stored a valid error; its message is a C string
            // that lives until postcopy_error_free below.
            let m = unsafe { CStr::from_ptr(postcopy_error_message(err)) }
                .to_string_lossy()
                .into_owned();
            postcopy_error_free(err);
            m
        };
        return Err(if is_uffd_permission(0, &msg) {
            uffd_hint(&format!("postcopy_ram_supported_by_host: {msg}"))
        } else {
            format!("this host cannot run postcopy: {msg}")
        }
        .into());
    }
    postcopy_state_set(PostcopyStateArg(POSTCOPY_INCOMING_ADVISE));
    let rc = postcopy_ram_incoming_init(mis);
    if rc != 0 {
        return Err(format!("postcopy_ram_incoming_init: {}", errno_str(rc)).into());
    }
    session.needs_cleanup = true;
    let ready = dest.send_ret(Header::new(Kind::Ready, 0, 0), &[]);
    ready.map_err(|e| format!("the source disconnected before precopy ({e})"))?;

    // Progress, for the source's bar (and ours when we run alone).
    let bar = crate::progress_bar(total, !child);
    bar.set_message("precopy");
    let stop_progress = Arc::new(AtomicBool::new(false));
    let progress = {
        let d = dest.clone();
        let stop = stop_progress.clone();
        let bar = bar.clone();
        std::thread::Builder::new()
            .name("dst/progress".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let n = d.in_place.load(Ordering::Acquire);
                    let phase = d.phase.load(Ordering::Relaxed);
                    bar.set_position(n);
                    if d.send_ret(Header::new(Kind::Progress, phase, n), &[])
                        .is_err()
                    {
                        return;
                    }
                    std::thread::park_timeout(Duration::from_millis(100));
                }
            })
            .map_err(|e| e.to_string())?
    };

    let mut st = DestStats::default();
    let outcome = receive(&dest, main, urgent, &gate, &bar, &mut st, cfg);
    stop_progress.store(true, Ordering::Release);
    progress.thread().unpark();
    let _ = progress.join();
    if outcome.is_err() {
        bar.finish_and_clear();
    }
    let (mut rd, sums, urgent_thread) = outcome?;

    // Every page is in place: let the vCPUs finish their work, then read the figures.
    bar.set_message("finishing");
    let mut vcpu_runs = Vec::new();
    for v in vcpus {
        if let Some(done) = v.join() {
            vcpu_runs.push(done);
        }
    }
    let mut stats = PostcopyIncomingStats::default();
    if postcopy_incoming_get_stats(mis, &mut stats) == 0 {
        st.library = LibraryStats {
            faults: stats.faults,
            faults_already_received: stats.faults_already_received,
            duplicate_faults: stats.duplicate_faults,
            requests_sent: stats.requests_sent,
            request_errors: stats.request_errors,
            pages_placed: stats.pages_placed,
            zero_pages_placed: stats.zero_pages_placed,
            placed_already_present: stats.placed_already_present,
            outstanding_requests: stats.outstanding_requests,
        };
    }
    let rc = postcopy_ram_incoming_cleanup(mis);
    session.needs_cleanup = false;
    postcopy_state_set(PostcopyStateArg(POSTCOPY_INCOMING_END));
    if rc != 0 {
        return Err(format!("postcopy_ram_incoming_cleanup: {}", errno_str(rc)).into());
    }
    let _ = dest.urgent_out.shutdown(Shutdown::Both);
    match urgent_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err("the urgent receiver panicked".to_string().into()),
    }
    blocktime(mis, cfg.vcpus, &vcpu_runs, &mut st);
    st.latency = report::Latency::from_ns(std::mem::take(&mut *dest.latencies.lock()));
    st.placed_stream = dest.placed_stream.load(Ordering::Relaxed);
    st.placed_urgent = dest.placed_urgent.load(Ordering::Relaxed);
    st.placed_zero = dest.placed_zero.load(Ordering::Relaxed);

    // Every page against the source's checksum.
    dest.phase.store(Phase::Finishing as u32, Ordering::Relaxed);
    let _ = dest.send_ret(
        Header::new(Kind::Progress, Phase::Finishing as u32, total),
        &[],
    );
    bar.set_message("verifying");
    st.verification = verify(&dest, &sums);
    bar.finish_and_clear();

    let json = serde_json::to_vec(&st).map_err(|e| e.to_string())?;
    dest.send_ret(Header::new(Kind::Report, 0, json.len() as u64), &json)
        .map_err(|e| format!("the source disconnected before the report ({e})"))?;
    // The source answers with its own figures, for our copy of the report.
    let src = source_stats(&mut rd)?;
    let report = report::Report::build(cfg, &layout, &src, &st, start.elapsed().as_secs_f64());
    let ok = report.ok;
    drop(session);
    Ok(Outcome {
        report: Some(report),
        ok,
    })
}

type Received = (
    FrameReader,
    Vec<Option<u64>>,
    std::thread::JoinHandle<Result<(), String>>,
);

/// The main channel, from the first precopy page to the end of the stream; then waits until
/// every page is in place.
fn receive(
    dest: &Arc<Dest>,
    main: TcpStream,
    urgent: TcpStream,
    gate: &Gate,
    bar: &ProgressBar,
    st: &mut DestStats,
    cfg: &Config,
) -> Result<Received, Failure> {
    let layout = &dest.layout;
    let total = layout.total_pages;
    let ps = layout.page_size;
    let host = dest.host.0;
    let mis = dest.mis.0;
    let mut rd = FrameReader::new(main);
    let mut have = vec![false; total as usize];
    let mut discard_prepared = false;
    let mut switchover_start: Option<Instant> = None;
    let mut running_at: Option<u64> = None;
    let mut urgent_thread = None;
    let mut sums: Vec<Option<u64>> = vec![None; total as usize];
    let mut buf = vec![0u8; ps as usize];
    loop {
        let in_place = dest.in_place.load(Ordering::Relaxed);
        let h = match rd.next_header() {
            Ok(Some(h)) => h,
            Ok(None) => {
                return Err(format!(
                    "the source disconnected in the middle of the migration ({in_place} of {total} pages in place); did it crash or get stopped?"
                )
                .into())
            }
            Err(e) => {
                return Err(format!(
                    "lost the source in the middle of the migration ({e}; {in_place} of {total} pages in place); did it crash or get stopped?"
                )
                .into())
            }
        };
        let lost = |e: io::Error| -> Failure {
            let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                "the connection closed in the middle of a frame".to_string()
            } else {
                e.to_string()
            };
            format!(
                "lost the source in the middle of the migration ({e}; {} of {total} pages in place); did it crash or get stopped?",
                dest.in_place.load(Ordering::Relaxed)
            )
            .into()
        };
        match h.kind {
            Kind::Page | Kind::Zero if running_at.is_none() => {
                // Precopy: a plain write into guest RAM, then marked received.
                let (b, page) = dest.page_of(h.block, h.arg)?;
                let g = layout.global(b, page) as usize;
                let m = &dest.maps[b];
                if h.kind == Kind::Page {
                    // SAFETY: before switchover only this thread touches guest RAM (vCPUs
                    // wait at the gate) and the page is inside the block (checked).
                    rd.read_data(unsafe { m.slice_mut(page * ps, ps) })
                        .map_err(lost)?;
                    st.precopy_pages_written += 1;
                } else {
                    st.precopy_zero_pages += 1;
                    if have[g] {
                        // SAFETY: as above.
                        unsafe { m.slice_mut(page * ps, ps) }.fill(0);
                    } else {
                        // A read maps the zero page: present, so it will not fault later.
                        // SAFETY: in bounds; only this thread touches guest RAM now.
                        unsafe { std::ptr::read_volatile(m.ptr().add((page * ps) as usize)) };
                    }
                }
                let rc = postcopy_standalone_mark_received(host, dest.rbs[b].0, page * ps, ps);
                if rc != 0 {
                    return Err(
                        format!("postcopy_standalone_mark_received: {}", errno_str(rc)).into(),
                    );
                }
                if !have[g] {
                    have[g] = true;
                    dest.in_place.fetch_add(1, Ordering::AcqRel);
                }
            }
            Kind::Discard => {
                switchover_start.get_or_insert_with(Instant::now);
                bar.set_message("discard");
                let payload = rd.payload(&h).map_err(lost)?;
                let words = protocol::decode_u64s(&payload).map_err(|e| e.to_string())?;
                let b = h.block as usize;
                if b >= layout.blocks.len() || words.len() % 2 != 0 {
                    return Err(format!("the source sent a malformed discard for block {b}").into());
                }
                if !discard_prepared {
                    let rc = postcopy_ram_prepare_discard(mis);
                    if rc != 0 {
                        return Err(
                            format!("postcopy_ram_prepare_discard: {}", errno_str(rc)).into()
                        );
                    }
                    discard_prepared = true;
                }
                st.discard_commands += 1;
                for pair in words.chunks_exact(2) {
                    let (start, len) = (pair[0], pair[1]);
                    if start % ps != 0
                        || len % ps != 0
                        || start.saturating_add(len) > layout.blocks[b].len
                    {
                        return Err(format!(
                            "the source sent a discard of {len:#x} bytes at {start:#x} that does not fit RAM block '{}'",
                            layout.blocks[b].name
                        )
                        .into());
                    }
                    let rc = postcopy_standalone_discard_range(host, dest.rbs[b].0, start, len);
                    if rc != 0 {
                        return Err(format!(
                            "postcopy_standalone_discard_range: {}",
                            errno_str(rc)
                        )
                        .into());
                    }
                    for page in start / ps..(start + len) / ps {
                        let g = layout.global(b, page) as usize;
                        st.discarded_pages += 1;
                        if std::mem::take(&mut have[g]) {
                            dest.in_place.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                }
            }
            Kind::Listen => {
                let t0 = *switchover_start.get_or_insert_with(Instant::now);
                bar.set_message("switchover");
                if !discard_prepared {
                    let rc = postcopy_ram_prepare_discard(mis);
                    if rc != 0 {
                        return Err(
                            format!("postcopy_ram_prepare_discard: {}", errno_str(rc)).into()
                        );
                    }
                }
                check_received(dest, &have)?;
                st.pages_needed = total - dest.in_place.load(Ordering::Acquire);
                let t = Instant::now();
                let rc = postcopy_ram_incoming_setup(mis);
                if rc != 0 {
                    return Err(if is_uffd_permission(rc, "") {
                        uffd_hint(&format!("postcopy_ram_incoming_setup: {}", errno_str(rc)))
                    } else {
                        format!("postcopy_ram_incoming_setup: {}", errno_str(rc))
                    }
                    .into());
                }
                st.setup_ms = t.elapsed().as_secs_f64() * 1e3;
                postcopy_state_set(PostcopyStateArg(POSTCOPY_INCOMING_LISTENING));
                let d = dest.clone();
                let u = urgent.try_clone().map_err(|e| e.to_string())?;
                urgent_thread = Some(
                    std::thread::Builder::new()
                        .name("dst/urgent".into())
                        .spawn(move || urgent_receiver(&d, u))
                        .map_err(|e| e.to_string())?,
                );
                postcopy_state_set(PostcopyStateArg(POSTCOPY_INCOMING_RUNNING));
                dest.phase.store(Phase::Postcopy as u32, Ordering::Relaxed);
                if dest.in_place.load(Ordering::Acquire) == total {
                    dest.complete.store(true, Ordering::Release);
                }
                gate.open();
                running_at = Some(dest.now_ns());
                st.switchover_ms = t0.elapsed().as_secs_f64() * 1e3;
                bar.set_message(format!(
                    "postcopy, {} vCPUs {}",
                    cfg.vcpus,
                    cfg.pattern.name()
                ));
            }
            Kind::Page => {
                let (b, page) = dest.page_of(h.block, h.arg)?;
                rd.read_data(&mut buf).map_err(lost)?;
                dest.place(b, page, Some(&buf), false)?;
            }
            Kind::Zero => {
                let (b, page) = dest.page_of(h.block, h.arg)?;
                dest.place(b, page, None, false)?;
            }
            Kind::StreamEnd => break,
            Kind::Checksums => {
                let payload = rd.payload(&h).map_err(lost)?;
                let words = protocol::decode_u64s(&payload).map_err(|e| e.to_string())?;
                let b = h.block as usize;
                let first = words.first().copied().unwrap_or(u64::MAX);
                if b >= layout.blocks.len()
                    || first.saturating_add(words.len() as u64 - 1) > layout.pages(b)
                {
                    return Err(format!("the source sent malformed checksums for block {b}").into());
                }
                for (i, &c) in words[1..].iter().enumerate() {
                    sums[layout.global(b, first + i as u64) as usize] = Some(c);
                }
            }
            Kind::Failed => {
                let payload = rd.payload(&h).map_err(lost)?;
                return Err(Failure {
                    message: format!("the source failed: {}", String::from_utf8_lossy(&payload)),
                    reported_to_peer: true,
                });
            }
            other => return Err(format!("unexpected {other:?} frame from the source").into()),
        }
    }
    let (Some(running_at), Some(urgent_thread)) = (running_at, urgent_thread) else {
        return Err("the source finished without switching over"
            .to_string()
            .into());
    };
    // Demand-requested pages may still be on the urgent channel.
    let mut last = (dest.in_place.load(Ordering::Acquire), Instant::now());
    loop {
        let n = dest.in_place.load(Ordering::Acquire);
        if n >= total {
            break;
        }
        if urgent_thread.is_finished() {
            return Err(match urgent_thread.join() {
                Ok(Err(e)) => e,
                _ => format!(
                    "the urgent channel ended with {} of {total} pages in place",
                    n
                ),
            }
            .into());
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(30) {
            return Err(format!("{} pages never arrived (no progress for 30 s)", total - n).into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let done = dest.last_placed_ns.load(Ordering::Relaxed);
    st.postcopy_s = done.saturating_sub(running_at) as f64 / 1e9;
    Ok((rd, sums, urgent_thread))
}

/// The source's last frame: its statistics.
fn source_stats(rd: &mut FrameReader) -> Result<SourceStats, Failure> {
    let gone = |why: String| -> Failure {
        format!("the source disconnected before sending its statistics ({why})").into()
    };
    let h = rd
        .next_header()
        .map_err(|e| gone(e.to_string()))?
        .ok_or_else(|| gone("connection closed".into()))?;
    let payload = rd.payload(&h).map_err(|e| gone(e.to_string()))?;
    match h.kind {
        Kind::SourceStats => serde_json::from_slice(&payload)
            .map_err(|e| format!("bad statistics from the source: {e}").into()),
        Kind::Failed => Err(Failure {
            message: format!("the source failed: {}", String::from_utf8_lossy(&payload)),
            reported_to_peer: true,
        }),
        other => Err(format!("unexpected {other:?} frame from the source").into()),
    }
}

/// Before setup, the library's received bitmap must hold exactly the pages we kept.
fn check_received(dest: &Dest, have: &[bool]) -> Result<(), String> {
    let layout = &dest.layout;
    let ps = layout.page_size;
    for b in 0..layout.blocks.len() {
        for page in 0..layout.pages(b) {
            let want = have[layout.global(b, page) as usize];
            let got = postcopy_standalone_page_received(dest.host.0, dest.rbs[b].0, page * ps);
            if got != want as c_int {
                return Err(format!(
                    "the library's received bitmap says {got} for page {:#x} of RAM block '{}', but the destination {} it",
                    page * ps,
                    layout.blocks[b].name,
                    if want { "holds" } else { "does not hold" }
                ));
            }
        }
    }
    Ok(())
}

/// The urgent channel: requested pages, placed as soon as they arrive.
fn urgent_receiver(dest: &Dest, stream: TcpStream) -> Result<(), String> {
    let mut rd = FrameReader::new(stream);
    let mut buf = vec![0u8; dest.layout.page_size as usize];
    loop {
        let h = match rd.next_header() {
            Ok(Some(h)) => h,
            // The end of the migration (we shut the channel), or the source gone, which
            // the main channel reports.
            Ok(None) | Err(_) => return Ok(()),
        };
        let (b, page) = dest.page_of(h.block, h.arg)?;
        match h.kind {
            Kind::Page => {
                if rd.read_data(&mut buf).is_err() {
                    return Ok(());
                }
                dest.place(b, page, Some(&buf), true)?;
            }
            Kind::Zero => dest.place(b, page, None, true)?,
            other => return Err(format!("unexpected {other:?} frame on the urgent channel")),
        }
    }
}

/// postcopy_blocktime_query: total and per vCPU.
fn blocktime(
    mis: *mut MigrationIncomingState,
    vcpus: u32,
    runs: &[vcpu::VcpuDone],
    st: &mut DestStats,
) {
    let n = vcpus as usize;
    let mut info = std::mem::MaybeUninit::<PostcopyBlocktimeInfo>::zeroed();
    let (mut ms, mut ns, mut faults, mut lat) =
        (vec![0u32; n], vec![0u64; n], vec![0u64; n], vec![0u64; n]);
    let rc = postcopy_blocktime_query(
        mis,
        info.as_mut_ptr(),
        ms.as_mut_ptr(),
        ns.as_mut_ptr(),
        faults.as_mut_ptr(),
        lat.as_mut_ptr(),
        n,
    );
    if rc < 0 {
        st.blocktime_note = Some(format!(
            "not available: postcopy_blocktime_query returned {}",
            errno_str(rc)
        ));
    } else {
        // SAFETY: the query succeeded, so it filled `info` (and all-zero is valid anyway).
        let info = unsafe { info.assume_init() };
        st.blocktime = Some(Blocktime {
            total_ms: info.total_blocktime_ms,
            total_ns: info.total_blocktime_ns,
            latency_avg_us: info.latency_avg_ns as f64 / 1e3,
            faults: info.faults,
            resolved_faults: info.resolved_faults,
            non_vcpu_faults: info.non_vcpu_faults,
            outstanding_faults: info.outstanding_faults,
            histogram: info.latency_histogram.to_vec(),
        });
    }
    for r in runs {
        let i = r.index as usize;
        st.vcpus.push(report::Vcpu {
            index: r.index,
            tid: r.tid,
            touches: r.touches,
            run_ms: r.run_ns as f64 / 1e6,
            blocktime_ms: ms.get(i).copied().unwrap_or(0),
            blocktime_ns: ns.get(i).copied().unwrap_or(0),
            faults: faults.get(i).copied().unwrap_or(0),
            latency_avg_us: lat.get(i).copied().unwrap_or(0) as f64 / 1e3,
        });
    }
}

/// Every page of the destination against the source's checksum.
fn verify(dest: &Dest, sums: &[Option<u64>]) -> Verification {
    let t = Instant::now();
    let layout = &dest.layout;
    let ps = layout.page_size;
    let mut v = Verification::default();
    for b in 0..layout.blocks.len() {
        for page in 0..layout.pages(b) {
            let g = layout.global(b, page) as usize;
            // SAFETY: the vCPUs are joined and the library cleaned up: nothing else touches
            // guest RAM any more.
            let got = ram::checksum(unsafe { dest.maps[b].slice(page * ps, ps) });
            v.pages_checked += 1;
            let problem = match sums[g] {
                Some(want) if want == got => continue,
                Some(_) => "content differs",
                None => "the source sent no checksum",
            };
            v.mismatches += 1;
            if v.examples.len() < 5 {
                v.examples.push(format!(
                    "RAM block '{}' page at offset {:#x}: {problem}",
                    layout.blocks[b].name,
                    page * ps
                ));
            }
        }
    }
    v.passed = v.mismatches == 0;
    v.seconds = t.elapsed().as_secs_f64();
    v
}
