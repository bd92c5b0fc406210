//! The source: holds the guest's RAM, runs precopy while the guest dirties pages, sends the
//! discards (through postcopy_discard_send_*), switches over, then streams every missing page
//! in the background and answers the destination's page requests: on the preempt channel (a
//! second connection, opened through postcopy_preempt_setup / _establish_channel and the
//! standalone host's preempt_connect callback), or without preempt queued into the main
//! stream, as QEMU's vanilla postcopy does. A destination lost in postcopy is connected to
//! again: it says which pages it holds, the source takes back what the cut lost, opens a new
//! preempt channel, and streams on.
use crate::protocol::{self, FrameReader, FrameWriter, Header, Kind, Phase};
use crate::ram::{self, fmt_bytes, Layout, Mapping, PageBitmap, TARGET_PAGE};
use crate::report::{self, DestStats, SourceStats};
use crate::{Config, Failure, Outcome};
use indicatif::ProgressBar;
use parking_lot::{Condvar, Mutex};
use postcopy_ram::ffi::discard::{
    postcopy_discard_get_counts, postcopy_discard_send_finish, postcopy_discard_send_init,
    postcopy_discard_send_range,
};
use postcopy_ram::ffi::host_ops::postcopy_host_unregister;
use postcopy_ram::ffi::preempt::{
    postcopy_preempt_channel_result, postcopy_preempt_establish_channel, postcopy_preempt_setup,
};
use postcopy_ram::ffi::standalone::{
    postcopy_standalone_host_free, postcopy_standalone_host_install, postcopy_standalone_host_new,
    postcopy_standalone_set_capabilities, postcopy_standalone_set_discard_callback,
    postcopy_standalone_set_log_callback, postcopy_standalone_set_preempt_callbacks,
    PostcopyStandaloneHost,
};
use postcopy_ram::ffi::state::postcopy_infrastructure_init;
use postcopy_ram::ffi::types::MigrationState;
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long the source keeps trying to reach a destination it lost in postcopy.
const RECONNECT_WINDOW: Duration = Duration::from_secs(30);

/// How a page claimed after switchover was sent (`Server::sent_as`): what to take back from
/// the counts when a cut lost it.
const SENT_STREAM: u8 = 1;
const SENT_STREAM_ZERO: u8 = 2;
const SENT_URGENT: u8 = 3;
const SENT_URGENT_ZERO: u8 = 4;

/// What the destination's return path told us.
enum Event {
    Ready,
    Report(Vec<u8>),
    Failed(String),
    /// The destination broke the protocol: no point in reconnecting.
    Fatal(String),
    Closed(String),
}

/// How a postcopy session on one connection ended without the report.
enum End {
    /// The connection broke: reconnect and resume.
    Lost(String),
    Fatal(Failure),
}

/// The guest's RAM on the source.
struct SourceRam {
    layout: Layout,
    maps: Vec<Mapping>,
}

impl SourceRam {
    fn new(layout: &Layout) -> Result<SourceRam, String> {
        let maps = layout
            .blocks
            .iter()
            .map(|b| {
                Mapping::anonymous(b.len).map_err(|e| {
                    format!(
                        "not enough memory for the source's RAM block '{}' ({}): {e}",
                        b.name,
                        fmt_bytes(b.len)
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SourceRam {
            layout: layout.clone(),
            maps,
        })
    }

    /// Writes the initial image, on two threads (zero pages are left untouched).
    fn fill(&self) {
        let subs_total: u64 = self.layout.blocks.iter().map(|b| b.len / TARGET_PAGE).sum();
        let workers = 2u64;
        std::thread::scope(|s| {
            for w in 0..workers {
                s.spawn(move || {
                    let mut idx = 0u64;
                    for (b, m) in self.maps.iter().enumerate() {
                        let subs = m.len() / TARGET_PAGE;
                        for sub in 0..subs {
                            let mine = idx * workers / subs_total.max(1) == w;
                            idx += 1;
                            if !mine || ram::subpage_is_zero(&self.layout, b, sub) {
                                continue;
                            }
                            // SAFETY: before the migration starts; the workers split the
                            // 4 KiB pages between them, so each page has one writer.
                            let page = unsafe { m.slice_mut(sub * TARGET_PAGE, TARGET_PAGE) };
                            ram::fill_subpage(ram::as_words(page), b, sub);
                        }
                    }
                });
            }
        });
    }

    /// One transfer page.
    ///
    /// # Safety
    /// Nobody writes the page while the slice lives (the guest is stopped, or the caller is
    /// the only thread that dirties pages).
    unsafe fn page(&self, block: usize, page: u64) -> &[u8] {
        let ps = self.layout.page_size;
        // SAFETY: in bounds by construction; no writer (caller's contract).
        unsafe { self.maps[block].slice(page * ps, ps) }
    }

    /// The guest writes to page `page` of `block` (a 4 KiB piece of it chosen by `salt`).
    fn dirty(&self, block: usize, page: u64, salt: u64) {
        let ps = self.layout.page_size;
        let sub = salt % (ps / TARGET_PAGE);
        // SAFETY: only the precopy thread writes guest RAM, and nothing else reads it then.
        let bytes =
            unsafe { self.maps[block].slice_mut(page * ps + sub * TARGET_PAGE, TARGET_PAGE) };
        let words = ram::as_words(bytes);
        let start = (salt >> 16) as usize % (words.len() - 8);
        for (i, w) in words[start..start + 8].iter_mut().enumerate() {
            *w ^= ram::mix(salt ^ i as u64) | 1;
        }
    }
}

/// Paces the background stream to --bandwidth.
struct Limiter {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Limiter {
    fn new(rate: Option<u64>) -> Limiter {
        Limiter {
            rate,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Counts `bytes` sent; returns how long to wait before sending more, if long enough to
    /// bother.
    fn account(&mut self, bytes: u64) -> Option<Duration> {
        self.bytes += bytes;
        let rate = self.rate?;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        let now = self.start.elapsed();
        (due > now + Duration::from_millis(2)).then(|| due - now)
    }

    /// Precopy: counts `bytes` and waits as needed (flushing first, so what was sent leaves).
    fn pace(&mut self, bytes: u64, out: &mut FrameWriter) -> io::Result<()> {
        if let Some(wait) = self.account(bytes) {
            out.flush()?;
            std::thread::sleep(wait);
        }
        Ok(())
    }
}

/// Where the discard callback sends the library's discard commands.
struct DiscardSink<'a> {
    out: &'a mut FrameWriter,
    layout: &'a Layout,
    error: Option<String>,
    commands: u64,
    ranges: u64,
}

/// The standalone host's discard callback: one DISCARD frame per command.
unsafe extern "C" fn on_discard(
    opaque: *mut c_void,
    _ms: *mut MigrationState,
    name: *const c_char,
    n: u16,
    starts: *const u64,
    lengths: *const u64,
) -> c_int {
    // SAFETY: `opaque` is the DiscardSink that send_discards registered; the library calls
    // us synchronously inside postcopy_discard_send_range/finish on that same thread while
    // the sink is alive and not otherwise used.
    let sink = unsafe { &mut *(opaque as *mut DiscardSink) };
    // SAFETY: the library passes a NUL-terminated block name valid for the call.
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
    let Some(block) = sink.layout.block_by_name(&name) else {
        sink.error = Some(format!(
            "the library sent a discard for unknown block '{name}'"
        ));
        return -libc::EINVAL;
    };
    // SAFETY: the library passes two arrays of `n` u64s, valid for the call.
    let (starts, lengths) = unsafe {
        (
            std::slice::from_raw_parts(starts, n as usize),
            std::slice::from_raw_parts(lengths, n as usize),
        )
    };
    let pairs: Vec<(u64, u64)> = starts
        .iter()
        .copied()
        .zip(lengths.iter().copied())
        .collect();
    match sink
        .out
        .sized(Kind::Discard, block as u32, &protocol::encode_pairs(&pairs))
    {
        Ok(()) => {
            sink.commands += 1;
            sink.ranges += n as u64;
            0
        }
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            sink.error
                .get_or_insert(format!("sending a discard command: {e}"));
            -errno
        }
    }
}

/// The preempt_connect callback's state: the destination's address, and the outcome of the
/// connect, which runs on its own thread as QEMU's asynchronous channel creation does.
struct Connector {
    addr: String,
    outcome: Arc<Mutex<Option<Result<TcpStream, String>>>>,
}

/// The standalone host's preempt_connect: starts connecting the preempt channel and returns
/// 1 (pending); the connecting thread reports with postcopy_preempt_channel_result.
unsafe extern "C" fn on_preempt_connect(opaque: *mut c_void, ms: *mut MigrationState) -> c_int {
    // SAFETY: `opaque` is the Connector SourceLibrary::new registered; SourceLibrary
    // unregisters and frees the host before it drops the Connector, so it outlives every
    // callback.
    let c = unsafe { &*(opaque as *const Connector) };
    let addr = c.addr.clone();
    let outcome = c.outcome.clone();
    // The library only uses the MigrationState pointer as a key.
    let ms = ms as usize;
    let spawned = std::thread::Builder::new()
        .name("src/preempt-conn".into())
        .spawn(move || {
            let r = open_preempt(&addr);
            let rc = match &r {
                Ok(_) => 0,
                Err((errno, _)) => -errno,
            };
            *outcome.lock() = Some(r.map_err(|(_, m)| m));
            postcopy_preempt_channel_result(ms as *mut MigrationState, rc);
        });
    match spawned {
        Ok(_) => 1,
        Err(e) => {
            *c.outcome.lock() = Some(Err(format!("cannot start a thread to connect: {e}")));
            -libc::EAGAIN
        }
    }
}

/// Connects the preempt channel and greets the destination on it.
fn open_preempt(addr: &str) -> Result<TcpStream, (i32, String)> {
    let s = try_connect(addr).map_err(|(e, m)| (e.raw_os_error().unwrap_or(libc::EIO), m))?;
    let greet = hello("preempt", None, false);
    protocol::tune(&s)
        .and_then(|_| {
            protocol::send_now(&s, Header::new(Kind::Hello, 0, greet.len() as u64), &greet)
        })
        .map_err(|e| {
            (
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("greeting on the preempt channel: {e}"),
            )
        })?;
    Ok(s)
}

/// The source's side of the library: a standalone host whose discard callback the
/// discard phase points at its sink, and whose preempt_connect opens the preempt channel.
struct SourceLibrary {
    host: *mut PostcopyStandaloneHost,
    /// The `MigrationState *` the discard and preempt functions key their state by.
    ms: Box<u64>,
    /// With preempt: the connect callback's state.
    connector: Option<Box<Connector>>,
}

impl SourceLibrary {
    fn new(preempt: bool, addr: &str) -> Result<SourceLibrary, String> {
        postcopy_infrastructure_init();
        let host = postcopy_standalone_host_new(TARGET_PAGE);
        if host.is_null() {
            return Err("postcopy_standalone_host_new failed".into());
        }
        postcopy_standalone_set_log_callback(host, Some(crate::library_log), std::ptr::null_mut());
        let rc = postcopy_standalone_host_install(host);
        if rc != 0 {
            postcopy_standalone_host_free(host);
            return Err(format!(
                "postcopy_standalone_host_install failed: {}",
                errno_str(rc)
            ));
        }
        let mut lib = SourceLibrary {
            host,
            ms: Box::new(0),
            connector: None,
        };
        postcopy_standalone_set_capabilities(host, false, preempt);
        if preempt {
            let c = Box::new(Connector {
                addr: addr.to_string(),
                outcome: Arc::new(Mutex::new(None)),
            });
            let opaque = (&*c as *const Connector).cast_mut().cast();
            let rc = postcopy_standalone_set_preempt_callbacks(
                host,
                Some(on_preempt_connect),
                None,
                None,
                opaque,
            );
            lib.connector = Some(c);
            if rc != 0 {
                return Err(format!(
                    "postcopy_standalone_set_preempt_callbacks failed: {}",
                    errno_str(rc)
                ));
            }
        }
        Ok(lib)
    }

    fn ms(&self) -> *mut MigrationState {
        (&*self.ms as *const u64).cast_mut().cast()
    }

    /// Starts connecting the preempt channel (QEMU does it when the migration starts).
    fn start_preempt(&self) {
        postcopy_preempt_setup(self.ms());
    }

    /// postcopy_preempt_establish_channel: at once without preempt; with it, waits for the
    /// connect (starting one if none is under way, as on a resume) and returns the channel.
    fn establish(&self) -> Result<Option<TcpStream>, String> {
        let rc = postcopy_preempt_establish_channel(self.ms());
        let outcome = self
            .connector
            .as_ref()
            .and_then(|c| c.outcome.lock().take());
        match (rc, outcome, &self.connector) {
            (0, None, None) => Ok(None),
            (0, Some(Ok(s)), Some(_)) => Ok(Some(s)),
            (_, Some(Err(m)), _) => Err(format!("cannot open the preempt channel: {m}")),
            (rc, _, _) => Err(format!(
                "postcopy_preempt_establish_channel returned {rc} without a preempt channel"
            )),
        }
    }
}

impl Drop for SourceLibrary {
    fn drop(&mut self) {
        postcopy_host_unregister();
        postcopy_standalone_host_free(self.host);
    }
}

pub fn errno_str(rc: i32) -> String {
    io::Error::from_raw_os_error(rc.abs()).to_string()
}

/// Connects to `addr`: the stream, or the error and a message for the user.
fn try_connect(addr: &str) -> Result<TcpStream, (io::Error, String)> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| {
            let m = format!("cannot resolve '{addr}': {e} (expected HOST:PORT)");
            (e, m)
        })?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, Duration::from_secs(10)) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::other("no address"));
    let m = match e.kind() {
        io::ErrorKind::ConnectionRefused => format!(
            "cannot connect to {addr}: connection refused; is a destination listening there? \
             (start one with `postcopy-demo --listen {addr}`)"
        ),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("cannot connect to {addr}: no answer within 10 s")
        }
        _ => format!("cannot connect to {addr}: {e}"),
    };
    Err((e, m))
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    try_connect(addr).map_err(|(_, m)| m)
}

fn hello(channel: &str, config: Option<&Config>, resume: bool) -> Vec<u8> {
    serde_json::json!({
        "channel": channel,
        "version": protocol::VERSION,
        "config": config,
        "resume": resume,
    })
    .to_string()
    .into_bytes()
}

/// Vanilla postcopy: requests the return-path reader took, waiting for the stream (the
/// main thread) to send their pages between two background pages.
#[derive(Default)]
struct RequestQueue {
    inner: Mutex<QueueInner>,
    cv: Condvar,
    /// Length, read without the lock on every background page.
    len: AtomicUsize,
}

#[derive(Default)]
struct QueueInner {
    items: VecDeque<(usize, u64)>,
    closed: bool,
}

impl RequestQueue {
    fn push(&self, block: usize, page: u64) {
        let mut q = self.inner.lock();
        q.items.push_back((block, page));
        self.len.store(q.items.len(), Ordering::Release);
        self.cv.notify_one();
    }

    fn pop(&self) -> Option<(usize, u64)> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut q = self.inner.lock();
        let r = q.items.pop_front();
        self.len.store(q.items.len(), Ordering::Release);
        r
    }

    /// Waits up to `timeout` for a request (or the close).
    fn wait(&self, timeout: Duration) {
        let mut q = self.inner.lock();
        if q.items.is_empty() && !q.closed {
            self.cv.wait_for(&mut q, timeout);
        }
    }

    fn close(&self) {
        self.inner.lock().closed = true;
        self.cv.notify_all();
    }

    /// Empties the queue; returns how many requests it held.
    fn drain(&self) -> u64 {
        let mut q = self.inner.lock();
        let n = q.items.len() as u64;
        q.items.clear();
        self.len.store(0, Ordering::Release);
        n
    }
}

/// The postcopy phase: shared by the stream (main thread) and the return-path reader of
/// whichever connection is current.
struct Server {
    ram: Arc<SourceRam>,
    preempt: bool,
    /// Pages sent, or held by the destination: whoever claims a page sends it, once.
    claims: PageBitmap,
    /// How each page claimed after switchover went (SENT_*).
    sent_as: Vec<AtomicU8>,
    requests: AtomicU64,
    already_sent: AtomicU64,
    requested: AtomicU64,
    zero_requested: AtomicU64,
    bytes: AtomicU64,
    /// Pages requested before the last resume, and since it.
    requested_before: PageBitmap,
    requested_since: PageBitmap,
    resumed: AtomicBool,
    requests_after_resume: AtomicU64,
    duplicates_after_resume: AtomicU64,
    repeats_after_resume: AtomicU64,
}

impl Server {
    fn new(ram: Arc<SourceRam>, preempt: bool) -> Server {
        let total = ram.layout.total_pages;
        Server {
            preempt,
            claims: PageBitmap::new(total),
            sent_as: (0..total).map(|_| AtomicU8::new(0)).collect(),
            requests: AtomicU64::new(0),
            already_sent: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            zero_requested: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            requested_before: PageBitmap::new(total),
            requested_since: PageBitmap::new(total),
            resumed: AtomicBool::new(false),
            requests_after_resume: AtomicU64::new(0),
            duplicates_after_resume: AtomicU64::new(0),
            repeats_after_resume: AtomicU64::new(0),
            ram,
        }
    }

    /// A page request from the destination: with preempt, answered at once on the preempt
    /// channel; without, queued for the stream (unless the page is on its way already).
    fn on_request(&self, io: &SessionIo, h: &Header, buf: &mut Vec<u8>) -> Result<(), Event> {
        let layout = &self.ram.layout;
        let ps = layout.page_size;
        let b = h.block as usize;
        if b >= layout.blocks.len() || h.arg % ps != 0 || h.arg >= layout.blocks[b].len {
            return Err(Event::Fatal(format!(
                "the destination requested an invalid page (block {b}, offset {:#x})",
                h.arg
            )));
        }
        let page = h.arg / ps;
        let g = layout.global(b, page);
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.resumed.load(Ordering::Acquire) {
            self.requests_after_resume.fetch_add(1, Ordering::Relaxed);
            if !self.requested_since.set(g) {
                self.duplicates_after_resume.fetch_add(1, Ordering::Relaxed);
            } else if self.requested_before.test(g) {
                self.repeats_after_resume.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            self.requested_since.set(g);
        }
        if self.preempt {
            let Some(ch) = io.preempt.get() else {
                return Err(Event::Fatal(
                    "a page request arrived before the preempt channel was open".into(),
                ));
            };
            self.serve(b, page, buf, &mut |bytes| {
                let mut w = ch;
                w.write_all(bytes)
            })
            .map_err(|e| Event::Closed(format!("the preempt channel broke: {e}")))
        } else {
            if self.claims.test(g) {
                self.already_sent.fetch_add(1, Ordering::Relaxed);
            } else {
                io.queue.push(b, page);
            }
            Ok(())
        }
    }

    /// Sends page `page` of block `b` because the destination asked for it, unless it is
    /// on its way already. `out` receives the whole frame.
    fn serve(
        &self,
        b: usize,
        page: u64,
        buf: &mut Vec<u8>,
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let layout = &self.ram.layout;
        let ps = layout.page_size;
        let g = layout.global(b, page);
        if !self.claims.set(g) {
            // Already on its way in the background stream (or sent for an earlier request).
            self.already_sent.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // SAFETY: the guest is stopped after switchover; source RAM is only read now.
        let data = unsafe { self.ram.page(b, page) };
        buf.clear();
        // Counted before the page leaves, so the counts are complete by the time the
        // destination has every page.
        if ram::is_zero(data) {
            self.sent_as[g as usize].store(SENT_URGENT_ZERO, Ordering::Relaxed);
            self.zero_requested.fetch_add(1, Ordering::Relaxed);
            buf.extend_from_slice(&Header::urgent(Kind::Zero, b as u32, page * ps).encode());
        } else {
            self.sent_as[g as usize].store(SENT_URGENT, Ordering::Relaxed);
            self.requested.fetch_add(1, Ordering::Relaxed);
            buf.extend_from_slice(&Header::urgent(Kind::Page, b as u32, page * ps).encode());
            buf.extend_from_slice(data);
            self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        out(buf)
    }

    /// After a reconnect: `held` is the destination's received bitmap. Pages we sent that it
    /// lacks were lost with the connection: unclaimed (sent again) and taken back from the
    /// counts. Runs while no stream or reader uses the claims.
    fn resume(&self, held: &[u64], st: &mut SourceStats) -> Result<(), String> {
        if held.len() != self.claims.words() {
            return Err(format!(
                "the destination's received bitmap has {} words, expected {}",
                held.len(),
                self.claims.words()
            ));
        }
        let total = self.ram.layout.total_pages;
        let (mut lost, mut lacking) = (0u64, 0u64);
        for g in 0..total {
            let has = held[(g / 64) as usize] & (1u64 << (g % 64)) != 0;
            let claimed = self.claims.test(g);
            if !has {
                lacking += 1;
            }
            if claimed && !has {
                lost += 1;
                match self.sent_as[g as usize].swap(0, Ordering::Relaxed) {
                    SENT_STREAM => st.streamed_postcopy -= 1,
                    SENT_STREAM_ZERO => st.zero -= 1,
                    SENT_URGENT => {
                        self.requested.fetch_sub(1, Ordering::Relaxed);
                    }
                    SENT_URGENT_ZERO => {
                        self.zero_requested.fetch_sub(1, Ordering::Relaxed);
                    }
                    _ => {
                        return Err(format!(
                            "the destination lacks global page {g}, which it kept from precopy"
                        ))
                    }
                }
            } else if has && !claimed {
                return Err(format!(
                    "the destination holds global page {g}, which was never sent"
                ));
            }
        }
        let mut held = held.to_vec();
        if total % 64 != 0 {
            if let Some(last) = held.last_mut() {
                *last &= (1u64 << (total % 64)) - 1;
            }
        }
        self.claims.assign(&held);
        let before: Vec<u64> = self
            .requested_before
            .to_words()
            .iter()
            .zip(self.requested_since.to_words())
            .map(|(a, b)| a | b)
            .collect();
        self.requested_before.assign(&before);
        self.requested_since.assign(&vec![0; before.len()]);
        self.resumed.store(true, Ordering::Release);
        st.recovery.lost_in_flight += lost;
        st.recovery.dest_lacked_at_resume = lacking;
        Ok(())
    }
}

/// One connection to the destination (the main channel and, with preempt, its preempt
/// channel): what its return-path reader and the stream share.
struct SessionIo {
    main: TcpStream,
    preempt: OnceLock<TcpStream>,
    server: OnceLock<Arc<Server>>,
    queue: RequestQueue,
    /// The reader has stopped (connection lost, or a protocol error): stop streaming.
    broken: AtomicBool,
}

impl SessionIo {
    /// Breaks the connection: both channels shut, so blocked writers and readers return.
    fn shutdown(&self) {
        let _ = self.main.shutdown(Shutdown::Both);
        if let Some(p) = self.preempt.get() {
            let _ = p.shutdown(Shutdown::Both);
        }
        self.stop();
    }

    /// Tells the stream to stop.
    fn stop(&self) {
        self.broken.store(true, Ordering::Release);
        self.queue.close();
    }
}

/// Reads the destination's return path: progress into the bar, page requests to the
/// server, everything else as events. A broken connection is shut down here, so the stream
/// notices at once.
fn return_path_reader(
    mut rd: FrameReader,
    tx: mpsc::Sender<Event>,
    bar: ProgressBar,
    io: Arc<SessionIo>,
) {
    let mut buf = Vec::new();
    loop {
        let event = match rd.next_header() {
            Ok(None) => Event::Closed("the connection was closed".into()),
            Err(e) => Event::Closed(e.to_string()),
            Ok(Some(h)) => match h.kind {
                Kind::Ready => Event::Ready,
                Kind::Progress => {
                    bar.set_position(h.arg);
                    if Phase::from_u32(h.block) == Phase::Finishing {
                        bar.set_message("destination verifying");
                    }
                    continue;
                }
                Kind::Request => match io.server.get() {
                    None => Event::Fatal(
                        "the destination requested a page before the switchover".into(),
                    ),
                    Some(srv) => match srv.on_request(&io, &h, &mut buf) {
                        Ok(()) => continue,
                        Err(ev) => ev,
                    },
                },
                Kind::Report | Kind::Failed => match rd.payload(&h) {
                    Ok(p) if h.kind == Kind::Report => Event::Report(p),
                    Ok(p) => Event::Failed(String::from_utf8_lossy(&p).into_owned()),
                    Err(e) => Event::Closed(e.to_string()),
                },
                other => Event::Fatal(format!("unexpected {other:?} frame from the destination")),
            },
        };
        let last = match event {
            Event::Closed(_) => {
                io.shutdown();
                true
            }
            Event::Fatal(_) => {
                // The channel stays up so the main thread can tell the destination why.
                io.stop();
                true
            }
            _ => false,
        };
        if tx.send(event).is_err() || last {
            return;
        }
    }
}

/// The current connection: its writer, its reader thread's events.
struct Link {
    io: Arc<SessionIo>,
    out: FrameWriter,
    events: Receiver<Event>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Link {
    /// Starts the return-path reader on `rd` (the main channel's reading half).
    fn open(
        main: TcpStream,
        rd: FrameReader,
        server: Option<Arc<Server>>,
        preempt: Option<TcpStream>,
        bar: &ProgressBar,
    ) -> Result<Link, String> {
        let io = Arc::new(SessionIo {
            main: main.try_clone().map_err(|e| e.to_string())?,
            preempt: OnceLock::new(),
            server: OnceLock::new(),
            queue: RequestQueue::default(),
            broken: AtomicBool::new(false),
        });
        if let Some(s) = server {
            let _ = io.server.set(s);
        }
        if let Some(p) = preempt {
            let _ = io.preempt.set(p);
        }
        let (tx, events) = mpsc::channel();
        let reader = {
            let bar = bar.clone();
            let io = io.clone();
            std::thread::Builder::new()
                .name("src/return-path".into())
                .spawn(move || return_path_reader(rd, tx, bar, io))
                .map_err(|e| e.to_string())?
        };
        Ok(Link {
            io,
            out: FrameWriter::new(main),
            events,
            reader: Some(reader),
        })
    }

    /// Breaks the connection and waits for its reader.
    fn close(&mut self) {
        self.io.shutdown();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// The normal end: no more frames from us; the reader ends when the destination closes.
    fn finish(&mut self) {
        let _ = self.io.main.shutdown(Shutdown::Write);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// A write failed before postcopy: the destination is gone, or told us why it stopped.
    fn gone(&self, e: io::Error, doing: &str) -> Failure {
        // The destination may have explained itself just before closing.
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(Event::Failed(msg)) => return dest_failed(msg),
                Ok(Event::Fatal(msg)) => return msg.into(),
                Ok(Event::Closed(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        format!("the destination disconnected while {doing} ({e}); did it crash or get stopped?")
            .into()
    }

    fn failure(&self, msg: String) -> Failure {
        match self.events.try_recv() {
            Ok(Event::Failed(m)) => dest_failed(m),
            _ => msg.into(),
        }
    }

    /// A write failed in postcopy: a broken connection (resume), unless the destination
    /// said why it stopped or broke the protocol.
    fn classify(&self, e: io::Error, doing: &str) -> End {
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(Event::Failed(msg)) => return End::Fatal(dest_failed(msg)),
                Ok(Event::Fatal(msg)) => return End::Fatal(msg.into()),
                Ok(Event::Closed(why)) => return End::Lost(format!("{doing}: {e}; {why}")),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        End::Lost(format!("{doing}: {e}"))
    }

    fn wait_ready(&self) -> Result<(), Failure> {
        match self.events.recv() {
            Ok(Event::Ready) => Ok(()),
            Ok(Event::Failed(m)) => Err(dest_failed(m)),
            Ok(Event::Fatal(m)) => Err(m.into()),
            Ok(Event::Closed(why)) => Err(format!(
                "the destination disconnected before the migration started ({why})"
            )
            .into()),
            Ok(Event::Report(_)) => Err("the destination reported before the migration"
                .to_string()
                .into()),
            Err(_) => Err("the destination's return path ended".to_string().into()),
        }
    }

    fn wait_report(&self) -> Result<Vec<u8>, End> {
        loop {
            match self.events.recv_timeout(Duration::from_secs(600)) {
                Ok(Event::Report(r)) => return Ok(r),
                Ok(Event::Failed(m)) => return Err(End::Fatal(dest_failed(m))),
                Ok(Event::Fatal(m)) => return Err(End::Fatal(m.into())),
                Ok(Event::Closed(why)) => {
                    return Err(End::Lost(format!("waiting for the report: {why}")))
                }
                Ok(Event::Ready) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(End::Fatal(
                        "the destination sent no report within 10 minutes"
                            .to_string()
                            .into(),
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(End::Lost("the return path ended".into()))
                }
            }
        }
    }
}

impl Drop for Link {
    /// On a failure: stops the reader, but leaves the main channel writable so the caller
    /// can still tell the destination why.
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = self.io.main.shutdown(Shutdown::Read);
            if let Some(p) = self.io.preempt.get() {
                let _ = p.shutdown(Shutdown::Both);
            }
            self.io.stop();
            let _ = r.join();
        }
    }
}

fn dest_failed(msg: String) -> Failure {
    Failure {
        message: format!("the destination failed: {msg}"),
        reported_to_peer: true,
    }
}

/// Runs the source against the destination at `addr`.
pub fn run(cfg: &Config, addr: &str, progress_bar: bool) -> Result<Outcome, Failure> {
    let start = Instant::now();
    let layout = Layout::new(cfg.ram, cfg.page_size)?;
    ram::check_memory(
        cfg.ram + 32 * ram::MIB,
        "the source's copy of the guest RAM",
    )?;
    let main = connect(addr)?;
    protocol::tune(&main).map_err(|e| e.to_string())?;
    // The current main channel (replaced on a reconnect), to tell the destination why we
    // give up.
    let ctrl = Mutex::new(main.try_clone().map_err(|e| e.to_string())?);
    let bar = crate::progress_bar(layout.total_pages, progress_bar);
    let result = run_connected(cfg, &layout, addr, main, &ctrl, start, &bar);
    bar.finish_and_clear();
    let ctrl = ctrl.into_inner();
    if let Err(f) = &result {
        if !f.reported_to_peer {
            // Best effort: tell the destination why we stop.
            let msg = f.message.as_bytes();
            let _ = protocol::send_now(&ctrl, Header::new(Kind::Failed, 0, msg.len() as u64), msg);
        }
    }
    let _ = ctrl.shutdown(Shutdown::Both);
    result.map_err(|mut f| {
        f.reported_to_peer = false;
        f
    })
}

fn run_connected(
    cfg: &Config,
    layout: &Layout,
    addr: &str,
    main: TcpStream,
    ctrl: &Mutex<TcpStream>,
    start: Instant,
    bar: &ProgressBar,
) -> Result<Outcome, Failure> {
    let ps = layout.page_size;
    let total = layout.total_pages;
    let rd = FrameReader::new(main.try_clone().map_err(|e| e.to_string())?);
    let mut link = Link::open(main, rd, None, None, bar)?;
    link.out
        .sized(Kind::Hello, 0, &hello("main", Some(cfg), false))
        .and_then(|_| link.out.flush())
        .map_err(|e| link.gone(e, "greeting"))?;
    // The library; with preempt, its channel starts connecting now, as QEMU's does when the
    // migration starts, and is ready by the switchover.
    let lib = SourceLibrary::new(cfg.preempt, addr)?;
    if cfg.preempt {
        lib.start_preempt();
    }

    bar.set_message("preparing guest RAM");
    let t_prepare = Instant::now();
    let ram = Arc::new(SourceRam::new(layout)?);
    ram.fill();
    let prepare_s = t_prepare.elapsed().as_secs_f64();
    bar.set_message("waiting for destination");
    link.wait_ready()?;

    // Precopy: the guest runs and dirties pages while we copy.
    let t_precopy = Instant::now();
    let mut st = SourceStats {
        prepare_s,
        precopy_rounds: cfg.precopy_rounds,
        bandwidth_limit: cfg.bandwidth,
        ..Default::default()
    };
    let mut dirty = vec![true; total as usize];
    let mut dest_has = vec![false; total as usize];
    let mut sent_zero = vec![false; total as usize];
    let mut limiter = Limiter::new(cfg.bandwidth);
    let hot = hot_set(layout);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 1..=cfg.precopy_rounds {
        bar.set_message(format!("precopy round {round}/{}", cfg.precopy_rounds));
        for (b, spec) in layout.blocks.iter().enumerate() {
            let end = (spec.len / ps) * cfg.precopy_share as u64 / 100;
            for page in 0..end {
                let g = layout.global(b, page) as usize;
                if !dirty[g] {
                    continue;
                }
                dirty[g] = false;
                // SAFETY: this thread is the only writer of guest RAM (dirty() below).
                let data = unsafe { ram.page(b, page) };
                let zero = ram::is_zero(data);
                let r = if zero {
                    st.precopy_zero_sent += 1;
                    link.out.frame(Kind::Zero, b as u32, page * ps)
                } else {
                    st.bytes_sent += ps + protocol::HEADER_LEN as u64;
                    link.out.page(b as u32, page * ps, data)
                };
                r.and_then(|_| limiter.pace(ps, &mut link.out))
                    .map_err(|e| link.gone(e, "sending precopy pages"))?;
                st.precopy_pages_sent += 1;
                sent_zero[g] = zero;
                dest_has[g] = true;
                // The guest keeps running: one page dirtied for every eight sent, mostly
                // in its hot set.
                if st.precopy_pages_sent % 8 == 0 {
                    rng = xorshift(rng);
                    let dg = if rng % 10 < 6 {
                        hot.0 + (rng >> 8) % (hot.1 - hot.0)
                    } else {
                        (rng >> 8) % total
                    };
                    let (db, dp) = layout.locate(dg);
                    ram.dirty(db, dp, rng);
                    dirty[dg as usize] = true;
                    st.pages_dirtied += 1;
                }
            }
        }
    }
    link.out
        .flush()
        .map_err(|e| link.gone(e, "sending precopy pages"))?;

    // The guest stops. Every page still dirty (never sent, or changed since) is discarded
    // on the destination, so what it holds is exactly what it will not be sent again.
    if cfg.precopy_rounds > 0 {
        bar.set_message("discard");
        st.redirtied_pages = (0..total as usize)
            .filter(|&g| dirty[g] && dest_has[g])
            .count() as u64;
        send_discards(&lib, layout, &dirty, &mut link.out, &mut st).map_err(|e| link.failure(e))?;
    }
    st.precopy_s = t_precopy.elapsed().as_secs_f64();

    // Switchover. With preempt, the destination asks for pages on the preempt channel's
    // behalf as soon as it runs: the channel must exist first.
    let preempt = lib.establish().map_err(|e| link.failure(e))?;
    if preempt.is_some() {
        st.recovery.preempt_channels_opened += 1;
    }
    let srv = Arc::new(Server::new(ram.clone(), cfg.preempt));
    for g in 0..total {
        if !dirty[g as usize] {
            srv.claims.set(g);
            if sent_zero[g as usize] {
                st.zero += 1;
            } else {
                st.streamed_precopy += 1;
            }
        }
    }
    let _ = link.io.server.set(srv.clone());
    if let Some(p) = preempt {
        let _ = link.io.preempt.set(p);
    }
    let t_postcopy = Instant::now();
    link.out
        .frame(Kind::Listen, 0, 0)
        .and_then(|_| link.out.flush())
        .map_err(|e| link.gone(e, "switching over"))?;
    bar.set_message("postcopy");
    let mut buf = Vec::new();
    let dest_json = loop {
        match session(
            &srv,
            &mut link,
            &mut limiter,
            &mut st,
            bar,
            t_postcopy,
            &mut buf,
        ) {
            Ok(json) => break json,
            Err(End::Fatal(f)) => return Err(f),
            Err(End::Lost(why)) => {
                let lost_at = Instant::now();
                link.close();
                // Requests the broken connection brought that nobody served: the
                // destination sends them again after the resume.
                st.recovery.requests_dropped_in_cut += link.io.queue.drain();
                bar.set_message("postcopy paused: reconnecting");
                let peer = Peer {
                    cfg,
                    addr,
                    lib: &lib,
                    bar,
                    ctrl,
                };
                link = reconnect(&peer, &srv, &mut st, &why)?;
                st.recovery.reconnects += 1;
                st.recovery.outage_ms += lost_at.elapsed().as_secs_f64() * 1e3;
                bar.set_message("postcopy (resumed)");
            }
        }
    };
    // Requests still queued are for pages the stream has sent since.
    srv.already_sent
        .fetch_add(link.io.queue.drain(), Ordering::Relaxed);
    // Every request has been read and every page sent: the counts are final.
    st.requests_received = srv.requests.load(Ordering::Relaxed);
    st.requests_already_sent = srv.already_sent.load(Ordering::Relaxed);
    st.requested = srv.requested.load(Ordering::Relaxed);
    st.zero_requested = srv.zero_requested.load(Ordering::Relaxed);
    st.zero += st.zero_requested;
    st.bytes_sent += srv.bytes.load(Ordering::Relaxed);
    st.recovery.requests_after_resume = srv.requests_after_resume.load(Ordering::Relaxed);
    st.recovery.duplicate_requests_after_resume =
        srv.duplicates_after_resume.load(Ordering::Relaxed);
    st.recovery.repeat_requests_after_resume = srv.repeats_after_resume.load(Ordering::Relaxed);
    // The destination prints the report too when it runs on its own.
    if let Ok(json) = serde_json::to_vec(&st) {
        let _ = link
            .out
            .sized(Kind::SourceStats, 0, &json)
            .and_then(|_| link.out.flush());
    }
    bar.finish_and_clear();
    drop(lib);
    link.finish();

    let dest: DestStats = serde_json::from_slice(&dest_json)
        .map_err(|e| format!("the destination's report is not valid: {e}"))?;
    let report = report::Report::build(cfg, layout, &st, &dest, start.elapsed().as_secs_f64());
    let ok = report.ok;
    Ok(Outcome {
        report: Some(report),
        ok,
    })
}

/// Postcopy on one connection: the background stream of every page not yet claimed, the
/// checksums, then the destination's report.
fn session(
    srv: &Server,
    link: &mut Link,
    limiter: &mut Limiter,
    st: &mut SourceStats,
    bar: &ProgressBar,
    t_postcopy: Instant,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, End> {
    if let Err(e) = stream(srv, &link.io, &mut link.out, limiter, st, buf) {
        return Err(link.classify(e, "streaming pages"));
    }
    st.postcopy_s = t_postcopy.elapsed().as_secs_f64();
    bar.set_message("verifying");
    let t = Instant::now();
    let r = send_checksums(&srv.ram, &mut link.out)
        .and_then(|_| link.out.frame(Kind::StreamEnd, 0, 0))
        .and_then(|_| link.out.flush());
    st.checksum_s += t.elapsed().as_secs_f64();
    if let Err(e) = r {
        return Err(link.classify(e, "sending checksums"));
    }
    link.wait_report()
}

/// What reconnecting to the destination needs.
struct Peer<'a> {
    cfg: &'a Config,
    addr: &'a str,
    lib: &'a SourceLibrary,
    bar: &'a ProgressBar,
    /// Where a failure is reported: the current main channel.
    ctrl: &'a Mutex<TcpStream>,
}

/// Connects again after losing the destination in postcopy: the resume handshake (the
/// destination's received bitmap in, the claims rebuilt from it), then a new preempt
/// channel through postcopy_preempt_establish_channel.
fn reconnect(
    to: &Peer,
    srv: &Arc<Server>,
    st: &mut SourceStats,
    why: &str,
) -> Result<Link, Failure> {
    let Peer {
        cfg,
        addr,
        lib,
        bar,
        ctrl,
    } = *to;
    // The link stays down this long (--cut-outage), then we try every 100 ms.
    std::thread::sleep(Duration::from_millis(cfg.cut_outage_ms));
    let deadline = Instant::now() + RECONNECT_WINDOW;
    let main = loop {
        match connect(addr) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                return Err(format!(
                    "lost the destination in postcopy ({why}) and could not connect again within {} s: {e}",
                    RECONNECT_WINDOW.as_secs()
                )
                .into())
            }
        }
    };
    bar.set_message("postcopy paused: resuming");
    let broke = |e: io::Error| -> Failure {
        format!("resuming the migration: the new connection broke ({e})").into()
    };
    // A failure from here on is reported on the new connection.
    *ctrl.lock() = main.try_clone().map_err(broke)?;
    protocol::tune(&main).map_err(broke)?;
    main.set_read_timeout(Some(RECONNECT_WINDOW))
        .map_err(broke)?;
    let greet = hello("main", None, true);
    protocol::send_now(
        &main,
        Header::new(Kind::Hello, 0, greet.len() as u64),
        &greet,
    )
    .map_err(broke)?;
    let mut rd = FrameReader::new(main.try_clone().map_err(broke)?);
    let held = loop {
        let h = rd
            .next_header()
            .map_err(broke)?
            .ok_or_else(|| broke(io::ErrorKind::UnexpectedEof.into()))?;
        match h.kind {
            Kind::Progress => {}
            Kind::Resume => {
                let payload = rd.payload(&h).map_err(broke)?;
                break protocol::decode_u64s(&payload).map_err(|e| e.to_string())?;
            }
            Kind::Failed => {
                let payload = rd.payload(&h).map_err(broke)?;
                return Err(dest_failed(String::from_utf8_lossy(&payload).into_owned()));
            }
            other => {
                return Err(
                    format!("unexpected {other:?} frame from the destination on resume").into(),
                )
            }
        }
    };
    main.set_read_timeout(None).map_err(broke)?;
    srv.resume(&held, st)?;
    let preempt = lib.establish()?;
    if preempt.is_some() {
        st.recovery.preempt_channels_opened += 1;
    }
    Ok(Link::open(main, rd, Some(srv.clone()), preempt, bar)?)
}

/// The background stream: every page not yet claimed, in RAM order. Without preempt, the
/// requested pages go out between two background pages, behind whatever the stream has
/// queued in the socket already: QEMU's vanilla postcopy.
fn stream(
    srv: &Server,
    io: &SessionIo,
    out: &mut FrameWriter,
    limiter: &mut Limiter,
    st: &mut SourceStats,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let layout = &srv.ram.layout;
    let ps = layout.page_size;
    for b in 0..layout.blocks.len() {
        for page in 0..layout.pages(b) {
            if !srv.preempt {
                serve_queue(srv, io, out, buf)?;
            }
            if io.broken.load(Ordering::Acquire) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the return path ended",
                ));
            }
            let g = layout.global(b, page);
            if !srv.claims.set(g) {
                continue;
            }
            // SAFETY: the guest is stopped; source RAM is only read now.
            let data = unsafe { srv.ram.page(b, page) };
            if ram::is_zero(data) {
                srv.sent_as[g as usize].store(SENT_STREAM_ZERO, Ordering::Relaxed);
                st.zero += 1;
                out.frame(Kind::Zero, b as u32, page * ps)?;
            } else {
                srv.sent_as[g as usize].store(SENT_STREAM, Ordering::Relaxed);
                st.streamed_postcopy += 1;
                st.bytes_sent += ps + protocol::HEADER_LEN as u64;
                out.page(b as u32, page * ps, data)?;
            }
            if let Some(wait) = limiter.account(ps) {
                out.flush()?;
                pause(srv, io, out, buf, wait)?;
            }
        }
    }
    if !srv.preempt {
        serve_queue(srv, io, out, buf)?;
    }
    out.flush()
}

/// Vanilla postcopy: sends the pages asked for so far on the main channel, and flushes.
fn serve_queue(
    srv: &Server,
    io: &SessionIo,
    out: &mut FrameWriter,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let mut any = false;
    while let Some((b, page)) = io.queue.pop() {
        srv.serve(b, page, buf, &mut |bytes| out.raw(bytes))?;
        any = true;
    }
    if any {
        out.flush()?;
    }
    Ok(())
}

/// The bandwidth limit's wait; requested pages are not limited, so without preempt they
/// are served while we wait.
fn pause(
    srv: &Server,
    io: &SessionIo,
    out: &mut FrameWriter,
    buf: &mut Vec<u8>,
    wait: Duration,
) -> io::Result<()> {
    if srv.preempt {
        std::thread::sleep(wait);
        return Ok(());
    }
    let until = Instant::now() + wait;
    loop {
        serve_queue(srv, io, out, buf)?;
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            return Ok(());
        };
        if io.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        io.queue.wait(left);
    }
}

/// The pages the guest dirties most: a few percent of pc.ram, inside what the first precopy
/// round covers, so some of its pages are sent and then dirtied again.
fn hot_set(layout: &Layout) -> (u64, u64) {
    let n = layout.pages(0);
    let lo = n / 10;
    let hi = (lo + (n / 25).max(1)).min(n);
    (layout.global(0, lo), layout.global(0, hi.max(lo + 1)))
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Sends the discards: per block, each run of dirty pages as one range of target pages,
/// through postcopy_discard_send_init / _range / _finish, as QEMU's migration thread does.
fn send_discards(
    lib: &SourceLibrary,
    layout: &Layout,
    dirty: &[bool],
    out: &mut FrameWriter,
    st: &mut SourceStats,
) -> Result<(), String> {
    let mut sink = DiscardSink {
        out,
        layout,
        error: None,
        commands: 0,
        ranges: 0,
    };
    // The library calls on_discard with this pointer only inside the discard_send calls
    // below, while `sink` is alive; nothing sends discards after this function.
    let sink_ptr: *mut DiscardSink = &mut sink;
    let rc = postcopy_standalone_set_discard_callback(lib.host, Some(on_discard), sink_ptr.cast());
    if rc != 0 {
        return Err(format!(
            "postcopy_standalone_set_discard_callback: {}",
            errno_str(rc)
        ));
    }
    let sub = layout.subpages();
    let ms = lib.ms();
    for (b, spec) in layout.blocks.iter().enumerate() {
        let name = CString::new(spec.name).expect("no NUL in block names");
        postcopy_discard_send_init(ms, name.as_ptr());
        let n = layout.pages(b);
        let mut page = 0;
        while page < n {
            if !dirty[layout.global(b, page) as usize] {
                page += 1;
                continue;
            }
            let first = page;
            while page < n && dirty[layout.global(b, page) as usize] {
                page += 1;
            }
            st.discard_pages += page - first;
            postcopy_discard_send_range(ms, (first * sub) as _, ((page - first) * sub) as _);
        }
        postcopy_discard_send_finish(ms);
    }
    if let Some(e) = sink.error.take() {
        return Err(e);
    }
    let (mut ranges, mut commands) = (0u64, 0u64);
    if postcopy_discard_get_counts(ms, &mut ranges, &mut commands) == 0 {
        st.discard_ranges = ranges;
        st.discard_commands = commands;
    }
    if (sink.ranges, sink.commands) != (ranges, commands) {
        return Err(format!(
            "the library counts {ranges} discard ranges in {commands} commands, but its callback sent {} in {}",
            sink.ranges, sink.commands
        ));
    }
    sink.out
        .flush()
        .map_err(|e| format!("sending discards: {e}"))
}

/// The source's checksum of every page, for the destination to verify against.
fn send_checksums(ram: &SourceRam, out: &mut FrameWriter) -> io::Result<()> {
    let layout = &ram.layout;
    const CHUNK: u64 = 65536;
    for b in 0..layout.blocks.len() {
        let n = layout.pages(b);
        let mut first = 0;
        while first < n {
            let last = (first + CHUNK).min(n);
            let mut words = Vec::with_capacity((last - first + 1) as usize);
            words.push(first);
            // SAFETY: the guest is stopped; source RAM is only read now.
            words.extend((first..last).map(|p| ram::checksum(unsafe { ram.page(b, p) })));
            out.sized(Kind::Checksums, b as u32, &protocol::encode_u64s(&words))?;
            first = last;
        }
    }
    out.flush()
}
