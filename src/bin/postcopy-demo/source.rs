//! The source: holds the guest's RAM, runs precopy while the guest dirties pages, sends the
//! discards (through postcopy_discard_send_*), switches over, then streams every missing page
//! in the background while a priority thread answers the destination's page requests.
use crate::protocol::{self, FrameReader, FrameWriter, Header, Kind, Phase};
use crate::ram::{self, fmt_bytes, Layout, Mapping, TARGET_PAGE};
use crate::report::{self, DestStats, SourceStats};
use crate::{Config, Failure, Outcome};
use indicatif::ProgressBar;
use postcopy_ram::ffi::discard::{
    postcopy_discard_get_counts, postcopy_discard_send_finish, postcopy_discard_send_init,
    postcopy_discard_send_range,
};
use postcopy_ram::ffi::host_ops::postcopy_host_unregister;
use postcopy_ram::ffi::standalone::{
    postcopy_standalone_host_free, postcopy_standalone_host_install, postcopy_standalone_host_new,
    postcopy_standalone_set_discard_callback, postcopy_standalone_set_log_callback,
    PostcopyStandaloneHost,
};
use postcopy_ram::ffi::state::postcopy_infrastructure_init;
use postcopy_ram::ffi::types::MigrationState;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the destination's return path told us.
enum Event {
    Ready,
    Report(Vec<u8>),
    Failed(String),
    Closed(String),
}

/// A page bitmap that threads claim pages from: whoever claims a page sends it, once.
struct Claims {
    words: Vec<AtomicU64>,
}

impl Claims {
    fn new(pages: u64) -> Claims {
        Claims {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    /// True if the caller is the first to claim page `g`.
    fn claim(&self, g: u64) -> bool {
        let bit = 1u64 << (g % 64);
        self.words[(g / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
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
    fn account(&mut self, bytes: u64, out: &mut FrameWriter) -> io::Result<()> {
        self.bytes += bytes;
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            let now = self.start.elapsed();
            if due > now + Duration::from_millis(2) {
                out.flush()?;
                std::thread::sleep(due - now);
            }
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

/// The source's side of the library: a standalone host whose discard callback the
/// discard phase points at its sink.
struct SourceLibrary {
    host: *mut PostcopyStandaloneHost,
    /// The `MigrationState *` the discard functions key their batches by.
    ms: Box<u64>,
}

impl SourceLibrary {
    fn new() -> Result<SourceLibrary, String> {
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
        Ok(SourceLibrary {
            host,
            ms: Box::new(0),
        })
    }

    fn ms(&self) -> *mut MigrationState {
        (&*self.ms as *const u64).cast_mut().cast()
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

fn connect(addr: &str) -> Result<TcpStream, String> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{addr}': {e} (expected HOST:PORT)"))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, Duration::from_secs(10)) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::other("no address"));
    Err(match e.kind() {
        io::ErrorKind::ConnectionRefused => format!(
            "cannot connect to {addr}: connection refused; is a destination listening there? \
             (start one with `postcopy-demo --listen {addr}`)"
        ),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("cannot connect to {addr}: no answer within 10 s")
        }
        _ => format!("cannot connect to {addr}: {e}"),
    })
}

fn hello(channel: &str, config: Option<&Config>) -> Vec<u8> {
    serde_json::json!({ "channel": channel, "version": protocol::VERSION, "config": config })
        .to_string()
        .into_bytes()
}

/// Reads the destination's return path: progress into the bar, everything else as events.
fn return_path_reader(
    mut rd: FrameReader,
    tx: mpsc::Sender<Event>,
    bar: ProgressBar,
    progress: Arc<AtomicU64>,
) {
    loop {
        let event = match rd.next_header() {
            Ok(None) => Event::Closed("the connection was closed".into()),
            Err(e) => Event::Closed(e.to_string()),
            Ok(Some(h)) => match h.kind {
                Kind::Ready => Event::Ready,
                Kind::Progress => {
                    progress.store(h.arg, Ordering::Relaxed);
                    bar.set_position(h.arg);
                    if Phase::from_u32(h.block) == Phase::Finishing {
                        bar.set_message("destination verifying");
                    }
                    continue;
                }
                Kind::Report | Kind::Failed => match rd.payload(&h) {
                    Ok(p) if h.kind == Kind::Report => Event::Report(p),
                    Ok(p) => Event::Failed(String::from_utf8_lossy(&p).into_owned()),
                    Err(e) => Event::Closed(e.to_string()),
                },
                other => Event::Closed(format!("unexpected {other:?} frame from the destination")),
            },
        };
        let last = matches!(event, Event::Closed(_));
        if tx.send(event).is_err() || last {
            return;
        }
    }
}

/// Page requests in, requested pages out, on the urgent channel: the priority path that
/// does not wait behind the background stream.
struct Urgent {
    requests: AtomicU64,
    already_sent: AtomicU64,
    requested: AtomicU64,
    zero_requested: AtomicU64,
    bytes: AtomicU64,
}

fn urgent_loop(
    ram: &SourceRam,
    claims: &Claims,
    stats: &Urgent,
    stream: TcpStream,
) -> Result<(), String> {
    let layout = &ram.layout;
    let ps = layout.page_size;
    let mut rd = FrameReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut out = &stream;
    let mut buf = vec![0u8; protocol::HEADER_LEN + ps as usize];
    loop {
        let h = match rd.next_header() {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(()),
            // Our own shutdown at the end, or the destination gone (the main channel tells).
            Err(_) => return Ok(()),
        };
        if h.kind != Kind::Request {
            return Err(format!(
                "unexpected {:?} frame on the urgent channel",
                h.kind
            ));
        }
        let b = h.block as usize;
        if b >= layout.blocks.len() || h.arg % ps != 0 || h.arg >= layout.blocks[b].len {
            return Err(format!(
                "the destination requested an invalid page (block {b}, offset {:#x})",
                h.arg
            ));
        }
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let page = h.arg / ps;
        if !claims.claim(layout.global(b, page)) {
            // Already on its way in the background stream (or sent for an earlier request).
            stats.already_sent.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // SAFETY: the guest is stopped after switchover; source RAM is only read now.
        let data = unsafe { ram.page(b, page) };
        // Counted before the page leaves, so the counts are complete by the time the
        // destination has every page.
        let result = if ram::is_zero(data) {
            stats.zero_requested.fetch_add(1, Ordering::Relaxed);
            io::Write::write_all(&mut out, &Header::new(Kind::Zero, h.block, h.arg).encode())
        } else {
            stats.requested.fetch_add(1, Ordering::Relaxed);
            buf[..protocol::HEADER_LEN]
                .copy_from_slice(&Header::new(Kind::Page, h.block, h.arg).encode());
            buf[protocol::HEADER_LEN..].copy_from_slice(data);
            stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
            io::Write::write_all(&mut out, &buf)
        };
        if result.is_err() {
            return Ok(()); // the destination is gone; the main channel reports it
        }
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
    let urgent = connect(addr)?;
    protocol::tune(&main).map_err(|e| e.to_string())?;
    protocol::tune(&urgent).map_err(|e| e.to_string())?;
    let ctrl = main.try_clone().map_err(|e| e.to_string())?;
    let bar = crate::progress_bar(layout.total_pages, progress_bar);
    let result = run_connected(cfg, &layout, main, urgent, start, &bar);
    bar.finish_and_clear();
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
    main: TcpStream,
    urgent: TcpStream,
    start: Instant,
    bar: &ProgressBar,
) -> Result<Outcome, Failure> {
    let ps = layout.page_size;
    let total = layout.total_pages;
    let mut out = FrameWriter::new(main.try_clone().map_err(|e| e.to_string())?);
    let rd = FrameReader::new(main.try_clone().map_err(|e| e.to_string())?);
    let (tx, events) = mpsc::channel();
    let dest_progress = Arc::new(AtomicU64::new(0));
    let reader = {
        let bar = bar.clone();
        let p = dest_progress.clone();
        std::thread::Builder::new()
            .name("src/return-path".into())
            .spawn(move || return_path_reader(rd, tx, bar, p))
            .map_err(|e| e.to_string())?
    };
    let peer = Peer { events: &events };

    out.sized(Kind::Hello, 0, &hello("main", Some(cfg)))
        .and_then(|_| out.flush())
        .map_err(|e| peer.gone(e, "greeting"))?;
    protocol::send_now(
        &urgent,
        Header::new(Kind::Hello, 0, hello("urgent", None).len() as u64),
        &hello("urgent", None),
    )
    .map_err(|e| peer.gone(e, "greeting"))?;

    bar.set_message("preparing guest RAM");
    let t_prepare = Instant::now();
    let ram = SourceRam::new(layout)?;
    ram.fill();
    let prepare_s = t_prepare.elapsed().as_secs_f64();
    let lib = SourceLibrary::new()?;
    bar.set_message("waiting for destination");
    peer.wait_ready()?;

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
                    out.frame(Kind::Zero, b as u32, page * ps)
                } else {
                    st.bytes_sent += ps + protocol::HEADER_LEN as u64;
                    out.page(b as u32, page * ps, data)
                };
                r.and_then(|_| limiter.account(ps, &mut out))
                    .map_err(|e| peer.gone(e, "sending precopy pages"))?;
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
    out.flush()
        .map_err(|e| peer.gone(e, "sending precopy pages"))?;

    // The guest stops. Every page still dirty (never sent, or changed since) is discarded
    // on the destination, so what it holds is exactly what it will not be sent again.
    if cfg.precopy_rounds > 0 {
        bar.set_message("discard");
        st.redirtied_pages = (0..total as usize)
            .filter(|&g| dirty[g] && dest_has[g])
            .count() as u64;
        send_discards(&lib, layout, &dirty, &mut out, &mut st).map_err(|e| peer.failure(e))?;
    }
    st.precopy_s = t_precopy.elapsed().as_secs_f64();

    // Switchover.
    let t_postcopy = Instant::now();
    out.frame(Kind::Listen, 0, 0)
        .and_then(|_| out.flush())
        .map_err(|e| peer.gone(e, "switching over"))?;
    let claims = Claims::new(total);
    for g in 0..total {
        if !dirty[g as usize] {
            claims.claim(g);
            if sent_zero[g as usize] {
                st.zero += 1;
            } else {
                st.streamed_precopy += 1;
            }
        }
    }
    bar.set_message("postcopy");
    let urgent_stats = Urgent {
        requests: AtomicU64::new(0),
        already_sent: AtomicU64::new(0),
        requested: AtomicU64::new(0),
        zero_requested: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    };
    let urgent_shut = urgent.try_clone().map_err(|e| e.to_string())?;
    let (stream_result, urgent_result) = std::thread::scope(|s| {
        let u = std::thread::Builder::new()
            .name("src/urgent".into())
            .spawn_scoped(s, || urgent_loop(&ram, &claims, &urgent_stats, urgent))
            .expect("spawn the urgent sender");
        let r = stream(&ram, &claims, &mut out, &mut limiter, &mut st)
            .map_err(|e| peer.gone(e, "streaming pages"))
            .and_then(|_| {
                st.postcopy_s = t_postcopy.elapsed().as_secs_f64();
                bar.set_message("verifying");
                let t = Instant::now();
                let r = send_checksums(&ram, &mut out)
                    .and_then(|_| out.frame(Kind::StreamEnd, 0, 0))
                    .and_then(|_| out.flush())
                    .map_err(|e| peer.gone(e, "sending checksums"));
                st.checksum_s = t.elapsed().as_secs_f64();
                r
            })
            .and_then(|_| peer.wait_report());
        // The destination closes the urgent channel once its fault thread has stopped, so
        // the urgent sender ends after reading every request. On failure, end it now.
        if r.is_err() {
            let _ = urgent_shut.shutdown(Shutdown::Both);
        }
        let u = u
            .join()
            .unwrap_or_else(|_| Err("the urgent sender panicked".into()));
        (r, u)
    });
    let dest_json = stream_result?;
    urgent_result?;
    // Every request has been read and every page sent: the counts are final.
    st.requests_received = urgent_stats.requests.load(Ordering::Relaxed);
    st.requests_already_sent = urgent_stats.already_sent.load(Ordering::Relaxed);
    st.requested = urgent_stats.requested.load(Ordering::Relaxed);
    st.zero_requested = urgent_stats.zero_requested.load(Ordering::Relaxed);
    st.zero += st.zero_requested;
    st.bytes_sent += urgent_stats.bytes.load(Ordering::Relaxed);
    // The destination prints the report too when it runs on its own.
    if let Ok(json) = serde_json::to_vec(&st) {
        let _ = out
            .sized(Kind::SourceStats, 0, &json)
            .and_then(|_| out.flush());
    }
    bar.finish_and_clear();
    drop(lib);
    drop(events);
    let _ = main.shutdown(Shutdown::Write);
    let _ = reader.join();

    let dest: DestStats = serde_json::from_slice(&dest_json)
        .map_err(|e| format!("the destination's report is not valid: {e}"))?;
    let report = report::Report::build(cfg, layout, &st, &dest, start.elapsed().as_secs_f64());
    let ok = report.ok;
    Ok(Outcome {
        report: Some(report),
        ok,
    })
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

/// The background stream: every page not yet claimed, in RAM order.
fn stream(
    ram: &SourceRam,
    claims: &Claims,
    out: &mut FrameWriter,
    limiter: &mut Limiter,
    st: &mut SourceStats,
) -> io::Result<()> {
    let layout = &ram.layout;
    let ps = layout.page_size;
    for b in 0..layout.blocks.len() {
        for page in 0..layout.pages(b) {
            if !claims.claim(layout.global(b, page)) {
                continue;
            }
            // SAFETY: the guest is stopped; source RAM is only read now.
            let data = unsafe { ram.page(b, page) };
            if ram::is_zero(data) {
                st.zero += 1;
                out.frame(Kind::Zero, b as u32, page * ps)?;
            } else {
                st.streamed_postcopy += 1;
                st.bytes_sent += ps + protocol::HEADER_LEN as u64;
                out.page(b as u32, page * ps, data)?;
            }
            limiter.account(ps, out)?;
        }
    }
    out.flush()
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

/// Turns I/O failures and return-path events into messages.
struct Peer<'a> {
    events: &'a Receiver<Event>,
}

impl Peer<'_> {
    /// A write failed: the destination is gone, or told us why it stopped.
    fn gone(&self, e: io::Error, doing: &str) -> Failure {
        // The destination may have explained itself just before closing.
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(Event::Failed(msg)) => return Self::dest_failed(msg),
                Ok(Event::Closed(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        format!("the destination disconnected while {doing} ({e}); did it crash or get stopped?")
            .into()
    }

    fn failure(&self, msg: String) -> Failure {
        match self.events.try_recv() {
            Ok(Event::Failed(m)) => Self::dest_failed(m),
            _ => msg.into(),
        }
    }

    fn dest_failed(msg: String) -> Failure {
        Failure {
            message: format!("the destination failed: {msg}"),
            reported_to_peer: true,
        }
    }

    fn wait_ready(&self) -> Result<(), Failure> {
        match self.events.recv() {
            Ok(Event::Ready) => Ok(()),
            Ok(Event::Failed(m)) => Err(Self::dest_failed(m)),
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

    fn wait_report(&self) -> Result<Vec<u8>, Failure> {
        loop {
            match self.events.recv_timeout(Duration::from_secs(600)) {
                Ok(Event::Report(r)) => return Ok(r),
                Ok(Event::Failed(m)) => return Err(Self::dest_failed(m)),
                Ok(Event::Closed(why)) => {
                    return Err(format!(
                        "the destination disconnected before sending its report ({why}); did it crash or get stopped?"
                    )
                    .into())
                }
                Ok(Event::Ready) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err("the destination sent no report within 10 minutes".to_string().into())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the destination's return path ended".to_string().into())
                }
            }
        }
    }
}
