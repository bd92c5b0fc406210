//! The destination: allocates the guest's RAM, drives postcopy-ram through its C
//! entrypoints and the standalone host (init, precopy pages marked received, discards,
//! setup), runs the vCPUs, places every page that arrives (the main channel here; the
//! preempt channel through the library's preempt thread and our preempt_load callback),
//! and checks every page against the source's checksums.
//!
//! When the connection breaks in postcopy it tells the library the return path is down
//! (postcopy_standalone_set_return_path: the fault thread pauses, faults are recorded),
//! waits for the source to connect again, sends it the received bitmap, takes the new
//! preempt channel (postcopy_preempt_new_channel), and brings the return path back: the
//! library sends every outstanding request again, once.
use crate::protocol::{self, FrameReader, Header, Kind, Phase};
use crate::ram::{self, fmt_bytes, HugePages, Layout, Mapping, PageBitmap, HUGE_PAGE, TARGET_PAGE};
use crate::report::{self, Blocktime, DestStats, LibraryStats, SourceStats, Verification};
use crate::source::errno_str;
use crate::vcpu::{self, Gate, RamView};
use crate::{Config, Failure, Outcome};
use indicatif::ProgressBar;
use parking_lot::Mutex;
use postcopy_ram::ffi::blocktime::{postcopy_blocktime_query, PostcopyBlocktimeInfo};
use postcopy_ram::ffi::host_ops::postcopy_host_unregister;
use postcopy_ram::ffi::incoming::{
    postcopy_incoming_get_stats, postcopy_incoming_temp_page, postcopy_ram_incoming_cleanup,
    postcopy_ram_incoming_init, postcopy_ram_incoming_setup, postcopy_ram_prepare_discard,
    postcopy_ram_supported_by_host, PostcopyIncomingStats,
};
use postcopy_ram::ffi::placement::{postcopy_place_page, postcopy_place_page_zero};
use postcopy_ram::ffi::preempt::{postcopy_preempt_channels_seen, postcopy_preempt_new_channel};
use postcopy_ram::ffi::standalone::{
    postcopy_error_free, postcopy_error_message, postcopy_standalone_add_ram_block,
    postcopy_standalone_add_vcpu, postcopy_standalone_discard_range, postcopy_standalone_host_free,
    postcopy_standalone_host_install, postcopy_standalone_host_new,
    postcopy_standalone_mark_received, postcopy_standalone_page_received,
    postcopy_standalone_set_capabilities, postcopy_standalone_set_log_callback,
    postcopy_standalone_set_preempt_callbacks, postcopy_standalone_set_request_callback,
    postcopy_standalone_set_return_path, PostcopyStandaloneHost,
};
use postcopy_ram::ffi::state::{postcopy_infrastructure_init, postcopy_state_set};
use postcopy_ram::ffi::types::{
    Error as CError, MigrationIncomingState, PostcopyStateArg, QEMUFile, RAMBlock,
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
/// RAM_CHANNEL_POSTCOPY: the preempt channel's temp page.
const RAM_CHANNEL_POSTCOPY: u32 = 1;

/// How long a paused destination waits for the source to connect again.
const RECONNECT_WINDOW: Duration = Duration::from_secs(30);

/// A C pointer shared between the destination's threads.
#[derive(Clone, Copy)]
struct CPtr<T>(*mut T);
// SAFETY: these are the library's handles (host, RAMBlock) and our MigrationIncomingState
// key; the library documents which entrypoints may be called from any thread, and we only
// call those from other threads (placement from the loading threads).
unsafe impl<T> Send for CPtr<T> {}
// SAFETY: as above; the pointers themselves are never dereferenced by us.
unsafe impl<T> Sync for CPtr<T> {}

/// The return path of the current connection (progress, page requests, report, failure).
struct RetPath {
    /// The link generation it belongs to.
    gen: u64,
    stream: TcpStream,
}

/// The connection to the source as a whole, for breaking it.
struct LinkState {
    /// Bumped at every reconnection: a failure reported for an older link is old news.
    gen: u64,
    /// Every socket of the current link (main, preempt): shut down together when it is
    /// lost, so every thread using one notices at once.
    sockets: Vec<TcpStream>,
    down: bool,
}

/// A preempt channel, handed to the library as its `QEMUFile *`.
struct PreemptChannel {
    stream: TcpStream,
    gen: u64,
    /// Set by preempt_shutdown (cleanup): the end of the channel is then not a failure.
    closing: AtomicBool,
}

/// Everything the destination's threads share; also the `opaque` of the request and
/// preempt callbacks.
struct Dest {
    layout: Layout,
    maps: Vec<Mapping>,
    host: CPtr<PostcopyStandaloneHost>,
    mis: CPtr<MigrationIncomingState>,
    rbs: Vec<CPtr<RAMBlock>>,
    /// Shared with run(), which reports a failure on whatever link is current.
    ret: Arc<Mutex<RetPath>>,
    link: Mutex<LinkState>,
    /// The link is down: from the loss to the resume.
    link_down: AtomicBool,
    /// When the current outage began (ns since `epoch`) and the library's fault count then.
    lost_at_ns: AtomicU64,
    faults_at_loss: AtomicU64,
    /// Preempt channels handed to the library, alive until the end.
    preempt_channels: Mutex<Vec<Arc<PreemptChannel>>>,
    /// preempt_load calls running now.
    loads_active: AtomicU32,
    /// A failure found on a loading thread; the main thread gives up with it.
    fatal: Mutex<Option<String>>,
    /// --cut-after, the pages placed since switchover, and how many when the cut happened.
    cut_after: Option<u64>,
    placed_postcopy: AtomicU64,
    cut_at: AtomicU64,
    /// Pages placed since switchover: each must arrive once.
    placed_bits: PageBitmap,
    placed_twice: AtomicU64,
    epoch: Instant,
    /// Per page: when it was requested (ns since `epoch`, plus one), 0 when not pending.
    req_time: Vec<AtomicU64>,
    /// Pages in place (received in precopy and kept, or placed).
    in_place: AtomicU64,
    placed_stream: AtomicU64,
    placed_urgent: AtomicU64,
    placed_zero: AtomicU64,
    last_placed_ns: AtomicU64,
    /// Request-to-placed latencies: (ns, whether the page came on demand).
    latencies: Mutex<Vec<(u64, bool)>>,
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
        let g = self.layout.global(b, page);
        if !self.placed_bits.set(g) {
            self.placed_twice.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let now = self.now_ns();
        let t = self.req_time[g as usize].swap(0, Ordering::AcqRel);
        if t != 0 {
            self.latencies
                .lock()
                .push((now.saturating_sub(t - 1), urgent));
        }
        if data.is_none() {
            self.placed_zero.fetch_add(1, Ordering::Relaxed);
        }
        if urgent {
            self.placed_urgent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.placed_stream.fetch_add(1, Ordering::Relaxed);
        }
        // The cut comes before the page counts as in place: whoever sees every page in
        // place also sees the link down if this page cut it.
        let n = self.placed_postcopy.fetch_add(1, Ordering::SeqCst) + 1;
        if self.cut_after == Some(n) {
            self.cut_at.store(n, Ordering::SeqCst);
            let gen = self.link.lock().gen;
            self.link_lost(gen);
        }
        if self.in_place.fetch_add(1, Ordering::SeqCst) + 1 == self.layout.total_pages {
            self.complete.store(true, Ordering::Release);
        }
        self.last_placed_ns.fetch_max(now, Ordering::Relaxed);
        Ok(())
    }

    /// Sends one frame on the return path; a failure means the link is lost.
    fn send_ret(&self, h: Header, payload: &[u8]) -> io::Result<()> {
        let ret = self.ret.lock();
        if self.link_down.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::NotConnected.into());
        }
        let gen = ret.gen;
        let r = protocol::send_now(&ret.stream, h, payload);
        drop(ret);
        if r.is_err() {
            self.link_lost(gen);
        }
        r
    }

    fn is_down(&self) -> bool {
        self.link_down.load(Ordering::SeqCst)
    }

    /// The link `gen` broke (or is cut): shut every socket of it, so each thread using one
    /// notices, and tell the library the return path is down (its fault thread pauses and
    /// records faults without sending them).
    fn link_lost(&self, gen: u64) {
        let mut link = self.link.lock();
        if link.gen != gen || link.down {
            return;
        }
        link.down = true;
        self.lost_at_ns.store(self.now_ns(), Ordering::SeqCst);
        if let Some(st) = library_stats(self.mis.0) {
            self.faults_at_loss.store(st.faults, Ordering::SeqCst);
        }
        // Down first, so our own senders refuse instead of writing into a dead socket.
        self.link_down.store(true, Ordering::SeqCst);
        postcopy_standalone_set_return_path(self.host.0, self.mis.0, false);
        for s in &link.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The source connected again: `main` is the new link's main channel. Returns its
    /// generation.
    fn install_link(&self, main: &TcpStream) -> io::Result<u64> {
        let (ret, sock) = (main.try_clone()?, main.try_clone()?);
        let mut link = self.link.lock();
        link.gen += 1;
        let gen = link.gen;
        *self.ret.lock() = RetPath { gen, stream: ret };
        link.sockets = vec![sock];
        link.down = false;
        drop(link);
        self.link_down.store(false, Ordering::SeqCst);
        Ok(gen)
    }

    /// Keeps `stream` as a preempt channel of link `gen`; returns the `QEMUFile *` to hand
    /// to the library.
    fn add_preempt_channel(&self, stream: TcpStream, gen: u64) -> Result<*mut QEMUFile, String> {
        let sock = stream.try_clone().map_err(|e| e.to_string())?;
        let ch = Arc::new(PreemptChannel {
            stream,
            gen,
            closing: AtomicBool::new(false),
        });
        {
            let mut link = self.link.lock();
            if link.gen != gen || link.down {
                return Err("the connection broke while the preempt channel was opened".into());
            }
            link.sockets.push(sock);
        }
        let file = Arc::as_ptr(&ch).cast_mut().cast::<QEMUFile>();
        self.preempt_channels.lock().push(ch);
        Ok(file)
    }

    fn set_fatal(&self, msg: String) {
        self.fatal.lock().get_or_insert(msg);
    }

    fn fatal(&self) -> Option<String> {
        self.fatal.lock().clone()
    }

    /// The library's received bitmap (QEMU's recv bitmap), for the source to resume from:
    /// one bit per page, set when the page is in place.
    fn received_bitmap(&self) -> Result<Vec<u64>, String> {
        let layout = &self.layout;
        let ps = layout.page_size;
        let mut words = vec![0u64; layout.total_pages.div_ceil(64) as usize];
        let mut n = 0;
        for b in 0..layout.blocks.len() {
            for page in 0..layout.pages(b) {
                let rc = postcopy_standalone_page_received(self.host.0, self.rbs[b].0, page * ps);
                if rc < 0 {
                    return Err(format!(
                        "postcopy_standalone_page_received: {}",
                        errno_str(rc)
                    ));
                }
                if rc == 1 {
                    let g = layout.global(b, page);
                    words[(g / 64) as usize] |= 1u64 << (g % 64);
                    n += 1;
                }
            }
        }
        let in_place = self.in_place.load(Ordering::SeqCst);
        if n != in_place {
            return Err(format!(
                "the library's received bitmap holds {n} pages, but {in_place} are in place"
            ));
        }
        Ok(words)
    }

    /// Reads urgent pages from a preempt channel and places them (in the library's temp
    /// page of the postcopy channel) until the channel ends. 0 at a clean end (cleanup shut
    /// it), -ECONNRESET when it broke.
    fn load_urgent(&self, ch: &PreemptChannel) -> c_int {
        let ps = self.layout.page_size as usize;
        let tmp = postcopy_incoming_temp_page(self.mis.0, RAM_CHANNEL_POSTCOPY).cast::<u8>();
        let mut own = Vec::new();
        let buf: &mut [u8] = if tmp.is_null() {
            own.resize(ps, 0);
            &mut own
        } else {
            // SAFETY: the library's temp page of RAM_CHANNEL_POSTCOPY is a mapping of the
            // largest block page size (our only page size), used by nobody but the preempt
            // thread that runs this, and unmapped only after cleanup has joined it.
            unsafe { std::slice::from_raw_parts_mut(tmp, ps) }
        };
        let mut rd = match ch.stream.try_clone() {
            Ok(s) => FrameReader::new(s),
            Err(e) => {
                self.set_fatal(format!("preempt channel: {e}"));
                return -libc::EIO;
            }
        };
        // Until the channel ends or breaks.
        while let Ok(Some(h)) = rd.next_header() {
            let placed = match (h.kind, self.page_of(h.block, h.arg)) {
                (_, Err(e)) => Err(e),
                (Kind::Page, Ok((b, page))) => {
                    if rd.read_data(buf).is_err() {
                        break;
                    }
                    self.place(b, page, Some(buf), true)
                }
                (Kind::Zero, Ok((b, page))) => self.place(b, page, None, true),
                (other, _) => Err(format!("unexpected {other:?} frame on the preempt channel")),
            };
            if let Err(e) = placed {
                self.set_fatal(e);
                return -libc::EPROTO;
            }
        }
        if ch.closing.load(Ordering::Acquire) {
            return 0;
        }
        self.link_lost(ch.gen);
        -libc::ECONNRESET
    }
}

/// postcopy_incoming_get_stats, or None when `mis` has no context.
fn library_stats(mis: *mut MigrationIncomingState) -> Option<PostcopyIncomingStats> {
    let mut st = PostcopyIncomingStats::default();
    (postcopy_incoming_get_stats(mis, &mut st) == 0).then_some(st)
}

/// The standalone host's request callback, on the library's fault thread: note the time and
/// send the request on the return path (refused while the link is down: the library keeps
/// it and sends it again after the resume).
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
    match d.send_ret(Header::new(Kind::Request, r.block_index, r.offset), &[]) {
        Ok(()) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::ENOTCONN),
    }
}

/// The standalone host's preempt_load, on the library's preempt thread: loads urgent pages
/// from the preempt channel `file` until it ends.
unsafe extern "C" fn on_preempt_load(
    opaque: *mut c_void,
    _mis: *mut MigrationIncomingState,
    file: *mut QEMUFile,
) -> c_int {
    // SAFETY: `opaque` is the Dest that run_connected registered, alive until after
    // postcopy_ram_incoming_cleanup (which joins the preempt thread); `file` is one of its
    // PreemptChannels, kept in Dest::preempt_channels while the Dest lives.
    let (d, ch) = unsafe { (&*(opaque as *const Dest), &*(file as *const PreemptChannel)) };
    d.loads_active.fetch_add(1, Ordering::SeqCst);
    let rc = d.load_urgent(ch);
    d.loads_active.fetch_sub(1, Ordering::SeqCst);
    rc
}

/// The standalone host's preempt_shutdown (cleanup): ends the channel, so a blocked
/// preempt_load returns.
unsafe extern "C" fn on_preempt_shutdown(
    _opaque: *mut c_void,
    _mis: *mut MigrationIncomingState,
    file: *mut QEMUFile,
) {
    // SAFETY: as in on_preempt_load: one of the Dest's live PreemptChannels.
    let ch = unsafe { &*(file as *const PreemptChannel) };
    ch.closing.store(true, Ordering::Release);
    let _ = ch.stream.shutdown(Shutdown::Both);
}

/// Undoes what the destination set up, whatever happened: vCPUs released from the gate,
/// the incoming side cleaned up (after breaking the link and reporting the return path
/// down, so neither a fault thread blocked sending a request nor cleanup's wait for
/// outstanding pages can hang), the host unregistered and freed.
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
            let gen = self.dest.link.lock().gen;
            self.dest.link_lost(gen);
            postcopy_standalone_set_return_path(self.dest.host.0, self.dest.mis.0, false);
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

/// The destination's listener, kept for the whole migration: the preempt channel and, after
/// a broken connection, the source's new connections arrive on it.
struct Acceptor {
    listener: TcpListener,
    /// Channels that arrived before we looked for them (a preempt channel that connected
    /// while we waited for the main one).
    early: Vec<(TcpStream, serde_json::Value)>,
}

impl Acceptor {
    /// The next connection that greets as `channel`, within `timeout` (None: no limit).
    fn accept(
        &mut self,
        channel: &str,
        timeout: Option<Duration>,
    ) -> Result<(TcpStream, serde_json::Value), String> {
        if let Some(i) = self
            .early
            .iter()
            .position(|(_, v)| v["channel"].as_str() == Some(channel))
        {
            return Ok(self.early.remove(i));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        self.listener
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        loop {
            let (s, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() > d) {
                        return Err(format!(
                            "the source opened no {channel} channel within {} s",
                            timeout.unwrap_or_default().as_secs()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(format!("accept: {e}")),
            };
            s.set_nonblocking(false).map_err(|e| e.to_string())?;
            protocol::tune(&s).map_err(|e| e.to_string())?;
            let v = read_hello(&s).map_err(|e| format!("{e} (from {peer})"))?;
            match v["channel"].as_str() {
                Some(c) if c == channel => return Ok((s, v)),
                Some("preempt") => self.early.push((s, v)),
                other => return Err(format!("unexpected channel {other:?} from {peer}")),
            }
        }
    }
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
    let mut acceptor = Acceptor {
        listener,
        early: Vec::new(),
    };
    let (main, hello) = acceptor.accept("main", None)?;
    if hello["resume"].as_bool() == Some(true) {
        return Err(
            "the source asks to resume a migration this destination never started"
                .to_string()
                .into(),
        );
    }
    let cfg: Config = serde_json::from_value(hello["config"].clone())
        .map_err(|e| format!("bad configuration from the source: {e}"))?;
    let ret = Arc::new(Mutex::new(RetPath {
        gen: 0,
        stream: main.try_clone().map_err(|e| e.to_string())?,
    }));
    let result = run_connected(&cfg, main, acceptor, ret.clone(), child, start);
    match result {
        Ok(o) => Ok(o),
        Err(mut f) => {
            let ret = ret.lock();
            if !f.reported_to_peer {
                let msg = f.message.as_bytes();
                f.reported_to_peer = protocol::send_now(
                    &ret.stream,
                    Header::new(Kind::Failed, 0, msg.len() as u64),
                    msg,
                )
                .is_ok();
            }
            let _ = ret.stream.shutdown(Shutdown::Both);
            Err(f)
        }
    }
}

fn run_connected(
    cfg: &Config,
    main: TcpStream,
    mut acceptor: Acceptor,
    ret: Arc<Mutex<RetPath>>,
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
        ret,
        link: Mutex::new(LinkState {
            gen: 0,
            sockets: vec![main.try_clone().map_err(|e| e.to_string())?],
            down: false,
        }),
        link_down: AtomicBool::new(false),
        lost_at_ns: AtomicU64::new(0),
        faults_at_loss: AtomicU64::new(0),
        preempt_channels: Mutex::new(Vec::new()),
        loads_active: AtomicU32::new(0),
        fatal: Mutex::new(None),
        cut_after: cfg.cut_after,
        placed_postcopy: AtomicU64::new(0),
        cut_at: AtomicU64::new(0),
        placed_bits: PageBitmap::new(total),
        placed_twice: AtomicU64::new(0),
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
    if cfg.preempt {
        // The library's preempt thread loads the preempt channel through these.
        let rc = postcopy_standalone_set_preempt_callbacks(
            host,
            None,
            Some(on_preempt_load),
            Some(on_preempt_shutdown),
            Arc::as_ptr(&dest).cast_mut().cast(),
        );
        if rc != 0 {
            return Err(format!(
                "postcopy_standalone_set_preempt_callbacks: {}",
                errno_str(rc)
            )
            .into());
        }
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
    postcopy_standalone_set_capabilities(host, true, cfg.preempt);

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
                    // A failure breaks the link; progress resumes with the next one.
                    let _ = d.send_ret(Header::new(Kind::Progress, phase, n), &[]);
                    std::thread::park_timeout(Duration::from_millis(100));
                }
            })
            .map_err(|e| e.to_string())?
    };

    let mut st = DestStats::default();
    let outcome = receive(&dest, main, &mut acceptor, &gate, &bar, &mut st, cfg);
    stop_progress.store(true, Ordering::Release);
    progress.thread().unpark();
    let _ = progress.join();
    if outcome.is_err() {
        bar.finish_and_clear();
    }
    let (mut rd, sums) = outcome?;

    // Every page is in place: let the vCPUs finish their work, then read the figures.
    bar.set_message("finishing");
    st.vcpus_started = vcpus.len() as u32;
    let mut vcpu_runs = Vec::new();
    for v in vcpus {
        if let Some(done) = v.join() {
            vcpu_runs.push(done);
        }
    }
    st.recovery.cut = dest.cut_at.load(Ordering::SeqCst) > 0;
    st.recovery.placed_at_cut = dest.cut_at.load(Ordering::SeqCst);
    st.preempt_channels = postcopy_preempt_channels_seen(mis);
    if let Some(stats) = library_stats(mis) {
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
            pauses: stats.pauses,
            resent_after_resume: stats.resent_after_resume,
        };
    }
    let rc = postcopy_ram_incoming_cleanup(mis);
    session.needs_cleanup = false;
    postcopy_state_set(PostcopyStateArg(POSTCOPY_INCOMING_END));
    if rc != 0 {
        return Err(format!("postcopy_ram_incoming_cleanup: {}", errno_str(rc)).into());
    }
    if let Some(e) = dest.fatal() {
        return Err(e.into());
    }
    blocktime(mis, cfg.vcpus, &vcpu_runs, &mut st);
    st.placed_twice = dest.placed_twice.load(Ordering::Relaxed);
    let latencies = std::mem::take(&mut *dest.latencies.lock());
    let of = |on_demand: bool| {
        report::Latency::from_ns(
            latencies
                .iter()
                .filter(|l| l.1 == on_demand)
                .map(|l| l.0)
                .collect(),
        )
    };
    st.latency_on_demand = of(true);
    st.latency_in_stream = of(false);
    st.latency = report::Latency::from_ns(latencies.iter().map(|l| l.0).collect());
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

type Received = (FrameReader, Vec<Option<u64>>);

/// The main channel, from the first precopy page to the end of the stream; then waits until
/// every page is in place. A connection lost in postcopy is recovered from (see `recover`).
fn receive(
    dest: &Arc<Dest>,
    main: TcpStream,
    acceptor: &mut Acceptor,
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
    // The generation of the link `rd` reads.
    let mut rd_gen = 0;
    let mut have = vec![false; total as usize];
    let mut discard_prepared = false;
    let mut switchover_start: Option<Instant> = None;
    let mut running_at: Option<u64> = None;
    let mut sums: Vec<Option<u64>> = vec![None; total as usize];
    let mut buf = vec![0u8; ps as usize];
    loop {
        if running_at.is_some() {
            if let Some(e) = dest.fatal() {
                return Err(e.into());
            }
            if dest.is_down() {
                (rd, rd_gen) = recover(dest, acceptor, cfg, st, bar)?;
                continue;
            }
        }
        let in_place = dest.in_place.load(Ordering::Relaxed);
        let h = match rd.next_header() {
            Ok(Some(h)) => h,
            // In postcopy a broken connection pauses the migration (recovered above).
            Ok(None) | Err(_) if running_at.is_some() => {
                dest.link_lost(rd_gen);
                continue;
            }
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
            Kind::Listen if running_at.is_none() => {
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
                if cfg.preempt {
                    // The source opened it before switching over; the library's preempt
                    // thread loads it once setup starts that thread.
                    let (p, _) = acceptor.accept("preempt", Some(RECONNECT_WINDOW))?;
                    let file = dest.add_preempt_channel(p, rd_gen)?;
                    postcopy_preempt_new_channel(mis, file);
                }
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
            Kind::Page if running_at.is_some() => {
                let (b, page) = dest.page_of(h.block, h.arg)?;
                if rd.read_data(&mut buf).is_err() {
                    dest.link_lost(rd_gen);
                    continue;
                }
                dest.place(b, page, Some(&buf), h.is_urgent())?;
            }
            Kind::Zero if running_at.is_some() => {
                let (b, page) = dest.page_of(h.block, h.arg)?;
                dest.place(b, page, None, h.is_urgent())?;
            }
            Kind::StreamEnd => {
                let Some(running_at) = running_at else {
                    return Err("the source finished without switching over"
                        .to_string()
                        .into());
                };
                if wait_all_placed(dest, running_at, st)? {
                    break;
                }
                // The connection broke before the last pages came: recover, and read the
                // rest of the stream from the new connection.
            }
            Kind::Checksums => {
                let payload = match rd.payload(&h) {
                    Ok(p) => p,
                    Err(_) if running_at.is_some() => {
                        dest.link_lost(rd_gen);
                        continue;
                    }
                    Err(e) => return Err(lost(e)),
                };
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
    Ok((rd, sums))
}

/// After the end of the stream: waits until every page is in place (true), or the link is
/// lost first (false). Fails on a loading thread's error or 30 s without progress.
fn wait_all_placed(dest: &Dest, running_at: u64, st: &mut DestStats) -> Result<bool, Failure> {
    let total = dest.layout.total_pages;
    let mut last = (dest.in_place.load(Ordering::SeqCst), Instant::now());
    loop {
        // In this order: a cut by the last placement is visible once that page counts.
        let n = dest.in_place.load(Ordering::SeqCst);
        if let Some(e) = dest.fatal() {
            return Err(e.into());
        }
        if dest.is_down() {
            return Ok(false);
        }
        if n >= total {
            break;
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
    Ok(true)
}

/// Polls `cond` until it holds (true) or `limit` passes (false).
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The connection broke in postcopy (`link_lost` has shut it and reported the return path
/// down): wait for the source to connect again, send it the received bitmap, take the new
/// preempt channel, then bring the return path back, so the library sends every
/// outstanding request again, once. Returns the new main channel's reader and its link
/// generation.
fn recover(
    dest: &Dest,
    acceptor: &mut Acceptor,
    cfg: &Config,
    st: &mut DestStats,
    bar: &ProgressBar,
) -> Result<(FrameReader, u64), Failure> {
    let (host, mis) = (dest.host.0, dest.mis.0);
    bar.set_message("postcopy paused: waiting for the source");
    // Down (again: the link may have broken during a previous resume, after which the
    // return path was reported up).
    postcopy_standalone_set_return_path(host, mis, false);
    // The fault thread pauses (faults are recorded, not sent) and the preempt loader lets go
    // of the broken channel: nothing is placed until the resume, so the received bitmap
    // is final.
    let paused = wait_until(Duration::from_secs(10), || {
        library_stats(mis).is_some_and(|s| s.paused == 1)
            && dest.loads_active.load(Ordering::SeqCst) == 0
    });
    if !paused {
        return Err(
            "the connection broke, but the library's fault thread did not pause"
                .to_string()
                .into(),
        );
    }
    let window = RECONNECT_WINDOW + Duration::from_millis(cfg.cut_outage_ms);
    let (main, hello) = acceptor.accept("main", Some(window)).map_err(|e| {
        format!("the connection to the source broke in postcopy and it did not come back: {e}")
    })?;
    if hello["resume"].as_bool() != Some(true) {
        return Err("the source connected again but did not ask to resume"
            .to_string()
            .into());
    }
    let held = dest.received_bitmap()?;
    let payload = protocol::encode_u64s(&held);
    protocol::send_now(
        &main,
        Header::new(Kind::Resume, 0, payload.len() as u64),
        &payload,
    )
    .map_err(|e| format!("resuming: the new connection broke ({e})"))?;
    let gen = dest
        .install_link(&main)
        .map_err(|e| format!("resuming: {e}"))?;
    if cfg.preempt {
        // The source opens a new one (postcopy_preempt_establish_channel) once it has the
        // bitmap; the library's preempt thread waits for it.
        let (p, _) = acceptor.accept("preempt", Some(window))?;
        let file = dest.add_preempt_channel(p, gen)?;
        postcopy_preempt_new_channel(mis, file);
    }
    // Quiet: every vCPU is blocked on a missing page (or done), so what is outstanding now
    // is exactly what the library will send again.
    let mut before = library_stats(mis).unwrap_or_default();
    let mut stable = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while stable < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = library_stats(mis).unwrap_or_default();
        stable = if now.faults == before.faults {
            stable + 1
        } else {
            0
        };
        before = now;
    }
    postcopy_standalone_set_return_path(host, mis, true);
    let resumed = wait_until(Duration::from_secs(10), || {
        library_stats(mis).is_some_and(|s| s.paused == 0)
    });
    if !resumed {
        return Err("the library's fault thread did not resume"
            .to_string()
            .into());
    }
    let r = &mut st.recovery;
    r.resumes += 1;
    r.outstanding_at_resume += before.outstanding_requests;
    r.faults_during_outage += before
        .faults
        .saturating_sub(dest.faults_at_loss.load(Ordering::SeqCst));
    r.outage_ms += dest
        .now_ns()
        .saturating_sub(dest.lost_at_ns.load(Ordering::SeqCst)) as f64
        / 1e6;
    bar.set_message(format!(
        "postcopy (resumed), {} vCPUs {}",
        cfg.vcpus,
        cfg.pattern.name()
    ));
    Ok((FrameReader::new(main), gen))
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
