//! The fault thread (`mig/dst/fault`): waits on the userfaultfd, the kick eventfd and every
//! shared userfaultfd; turns each missing-page fault into one page request.
use crate::host::{LogLevel, PageRequest, RequestOutcome};
use crate::incoming::{Active, Incoming};
use crate::requests::{Counters, Pending};
use crate::shared_ufds::SharedUfd;
use crate::sys::uffd;
use std::collections::hash_map::Entry;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Messages read per read(2): faults come in bursts when many vCPUs fault at once.
const BATCH: usize = 64;

pub const THREAD_NAME: &str = "mig/dst/fault";

pub fn spawn(incoming: Arc<Incoming>, active: Arc<Active>) -> io::Result<JoinHandle<()>> {
    let host = incoming.host.clone();
    spawn_postcopy_thread(host, THREAD_NAME, move || run(&incoming, &active))
}

/// Starts a library thread the way postcopy_thread_create starts QEMU's: named, with
/// asynchronous signals blocked, registered with the host (`thread_enter`, QEMU's RCU
/// registration) before it runs, and returns only once it has started.
pub fn spawn_postcopy_thread<F>(
    host: Arc<dyn crate::host::Host>,
    name: &'static str,
    body: F,
) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            block_async_signals();
            host.thread_enter(name);
            let _ = started_tx.send(());
            body();
            host.thread_exit();
        })?;
    // The thread signals after registering; a thread that died first dropped the sender.
    let _ = started_rx.recv();
    Ok(handle)
}

/// Like QEMU's threads: signals go to the hypervisor's main thread, not this one.
fn block_async_signals() {
    // SAFETY: sigset_t is plain data; sigfillset/sigdelset/pthread_sigmask write only into
    // the live set and this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for sig in [libc::SIGSEGV, libc::SIGFPE, libc::SIGILL, libc::SIGBUS] {
            libc::sigdelset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn run(inc: &Incoming, active: &Active) {
    let mut msgs = uffd::msg_buffer(BATCH);
    let mut shared: Vec<Arc<dyn SharedUfd>> = Vec::new();
    let mut generation = u64::MAX;
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    let mut dead_shared: Vec<i32> = Vec::new();
    let pfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    while !active.quit.load(Ordering::Acquire) {
        let g = inc.shared.generation();
        if g != generation {
            generation = g;
            shared = inc.shared.snapshot();
            dead_shared.clear();
        }
        pollfds.clear();
        pollfds.push(pfd(active.uffd.as_raw_fd()));
        pollfds.push(pfd(active.kick.as_raw_fd()));
        pollfds.extend(shared.iter().map(|s| {
            pfd(if dead_shared.contains(&s.fd()) {
                -1
            } else {
                s.fd()
            })
        }));

        // SAFETY: pollfds is a live, correctly sized array of pollfd for the call's duration.
        let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                // Never exit: a dead fault thread freezes every vCPU that faults later.
                inc.log(
                    LogLevel::Error,
                    &format!("fault thread: poll failed: {err}"),
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            continue;
        }
        if pollfds[1].revents != 0 {
            active.kick.drain();
            if active.quit.load(Ordering::Acquire) {
                break;
            }
            inc.check_return_path();
        }
        if pollfds[0].revents & libc::POLLIN != 0 {
            drain_uffd(inc, active, &mut msgs);
        }
        // The registry changed while we polled: the snapshot may name an fd that was
        // unregistered (and perhaps closed, its number reused) after poll() started, whose
        // messages are no longer ours to read. Rebuild first; poll is level-triggered, so
        // fds still registered and readable are reported again on the next pass.
        if inc.shared.generation() != generation {
            continue;
        }
        for (i, s) in shared.iter().enumerate() {
            let revents = pollfds[2 + i].revents;
            if revents & libc::POLLIN != 0 {
                serve_shared(inc, s.as_ref());
            } else if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                inc.log(
                    LogLevel::Warning,
                    &format!(
                        "shared userfaultfd '{}' (fd {}) failed; no longer polled",
                        s.name(),
                        s.fd()
                    ),
                );
                dead_shared.push(s.fd());
            }
        }
    }
}

fn drain_uffd(inc: &Incoming, active: &Active, msgs: &mut [uffd::UffdMsg]) {
    loop {
        let n = match active.uffd.read_msgs(msgs) {
            Ok(n) => n,
            Err(e) => {
                inc.log(
                    LogLevel::Error,
                    &format!("fault thread: read from userfaultfd failed: {e}"),
                );
                return;
            }
        };
        // Every fault of this read happened before it: one blocktime clock read serves them all.
        let mut clock = BatchClock::default();
        for msg in &msgs[..n] {
            if let Some((addr, tid)) = uffd::pagefault_of(msg, active.thread_id) {
                inc.handle_fault_at(active, addr, tid, &mut clock);
            }
        }
        if n < msgs.len() {
            return;
        }
    }
}

fn serve_shared(inc: &Incoming, s: &dyn SharedUfd) {
    let mut msg = uffd::msg_buffer(1);
    match uffd::read_msgs_fd(s.fd(), &mut msg) {
        Ok(1) => {
            Counters::bump(&inc.counters.shared_faults);
            let rc = s.handle(&mut msg[0]);
            if rc != 0 {
                Counters::bump(&inc.counters.shared_handler_errors);
                inc.log(
                    LogLevel::Error,
                    &format!("shared userfaultfd '{}' handler failed: {rc}", s.name()),
                );
            }
        }
        Ok(_) => {}
        Err(e) => inc.log(
            LogLevel::Warning,
            &format!("read from shared userfaultfd '{}' failed: {e}", s.name()),
        ),
    }
}

impl Incoming {
    /// One missing-page fault at `addr` by thread `tid`: record it once and ask the source.
    pub fn handle_fault(&self, active: &Active, addr: u64, tid: u32) {
        self.handle_fault_at(active, addr, tid, &mut BatchClock::default())
    }

    /// [`Incoming::handle_fault`] for one fault of a batch read at once: blocktime's begin
    /// takes its time from `clock`, read once for the batch.
    pub fn handle_fault_at(&self, active: &Active, addr: u64, tid: u32, clock: &mut BatchClock) {
        Counters::bump(&self.counters.faults);
        let Some(block) = active.blocks.find_addr(addr) else {
            Counters::bump(&self.counters.faults_outside_ram);
            self.log(
                LogLevel::Error,
                &format!("fault at {addr:#x} is outside guest RAM; not served"),
            );
            return;
        };
        let ps = block.page_size();
        let aligned = addr & !(ps - 1);
        let offset = aligned - block.start();
        let pending = Pending {
            block: block.info.id,
            offset,
            len: ps,
            haddr: addr,
            tid,
            sent: false,
        };
        match self.record_request_at(aligned, pending, Some(tid), clock) {
            Recorded::Send(p) => self.send_request(aligned, &p, &block.info.idstr),
            Recorded::AlreadyReceived => {
                // Placed between the fault and now: the placement woke the thread already,
                // but a wake is cheap insurance against a lost one.
                let _ = active.uffd.wake(aligned as usize, ps);
            }
            Recorded::Duplicate | Recorded::Held => {}
        }
    }

    /// Under the request lock: if the page is missing, run blocktime begin (for every
    /// fault, as QEMU does) and insert it once.
    pub fn record_request(
        &self,
        aligned: u64,
        pending: Pending,
        blocktime_tid: Option<u32>,
    ) -> Recorded {
        self.record_request_at(aligned, pending, blocktime_tid, &mut BatchClock::default())
    }

    /// [`Incoming::record_request`] with the blocktime clock shared by a batch of faults.
    pub fn record_request_at(
        &self,
        aligned: u64,
        mut pending: Pending,
        blocktime_tid: Option<u32>,
        clock: &mut BatchClock,
    ) -> Recorded {
        let mut req = self.requests.lock();
        if self.host.recv_test(pending.block, pending.offset) {
            Counters::bump(&self.counters.faults_already_received);
            return Recorded::AlreadyReceived;
        }
        if let (Some(tid), Some(bt)) = (blocktime_tid, req.blocktime.as_mut()) {
            // tid 0 is ignored by begin: no clock read for it.
            if tid != 0 {
                let now = *clock.0.get_or_insert_with(|| bt.now_ns());
                bt.begin_at(aligned, tid, now);
            }
        }
        let paused = req.paused;
        match req.requested.entry(aligned) {
            Entry::Occupied(_) => {
                Counters::bump(&self.counters.duplicate_faults);
                Recorded::Duplicate
            }
            Entry::Vacant(v) => {
                pending.sent = !paused;
                v.insert(pending);
                if paused {
                    Recorded::Held
                } else {
                    Recorded::Send(pending)
                }
            }
        }
    }

    /// Hands one request to the host; on failure it stays recorded as unsent, for resume.
    pub fn send_request(&self, aligned: u64, p: &Pending, idstr: &str) {
        let req = PageRequest {
            block: p.block,
            idstr,
            offset: p.offset,
            len: p.len,
            haddr: p.haddr,
            tid: p.tid,
        };
        // Counted before the host sends it: the page can arrive (and its thread resume)
        // before request_page returns, and a reader must never see placements of pages
        // that were not yet counted as requested.
        Counters::bump(&self.counters.requests_sent);
        match self.host.request_page(&req) {
            Ok(RequestOutcome::Sent) => {
                // A plain load first: the common case (no failures) writes nothing.
                if self.request_failures_in_a_row.load(Ordering::Relaxed) != 0 {
                    let n = self.request_failures_in_a_row.swap(0, Ordering::Relaxed);
                    if n > 1 {
                        self.log(
                            LogLevel::Warning,
                            &format!("page requests are sent again, after {n} failed in a row"),
                        );
                    }
                }
            }
            Ok(RequestOutcome::Discarded) => {
                self.counters
                    .requests_sent
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                // The source will never send it: it reads as zeros.
                if let Err(e) = self.place_zero_page(p.block, aligned) {
                    self.log(
                        LogLevel::Error,
                        &format!(
                            "zero page for discarded '{idstr}' offset {:#x}: {e}",
                            p.offset
                        ),
                    );
                }
            }
            Err(errno) => {
                self.counters
                    .requests_sent
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                Counters::bump(&self.counters.request_errors);
                let n = self
                    .request_failures_in_a_row
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                // The first failure, then the 10th, 100th...: one line per decade.
                if n == 1 || is_power_of_ten(n) {
                    let more = if n == 1 {
                        String::from("; until one succeeds, only every power of ten is logged")
                    } else {
                        format!("; {n} failed in a row")
                    };
                    self.log(
                        LogLevel::Error,
                        &format!(
                            "page request for '{idstr}' offset {:#x} failed: {}{more}",
                            p.offset,
                            io::Error::from_raw_os_error(errno)
                        ),
                    );
                }
                // Ask the host before taking the lock: no host call runs under it except
                // the received-bitmap pair.
                let return_path_ok = self.host.return_path_ok();
                let mut r = self.requests.lock();
                if let Some(e) = r.requested.get_mut(&aligned) {
                    e.sent = false;
                }
                if !return_path_ok && !r.paused {
                    r.paused = true;
                    Counters::bump(&self.counters.pauses);
                }
            }
        }
    }

    /// On every kick: pause while the host reports the return path down; on the way back,
    /// send every outstanding request again, once each. A host with a recovery wait (QEMU
    /// 10.0) blocks the fault thread here until it has recovered.
    pub fn check_return_path(&self) {
        if !self.host.return_path_ok() {
            let newly_paused = !std::mem::replace(&mut self.requests.lock().paused, true);
            if newly_paused {
                Counters::bump(&self.counters.pauses);
                self.log(
                    LogLevel::Info,
                    "return path down: fault thread paused, faults are recorded",
                );
            }
            if self.host.wait_for_recovery(self.mis).is_none() {
                return;
            }
        }
        let resend: Vec<(u64, Pending)> = {
            let mut r = self.requests.lock();
            let was_paused = std::mem::replace(&mut r.paused, false);
            let any_unsent = r.requested.values().any(|p| !p.sent);
            if !was_paused && !any_unsent {
                return;
            }
            // After a pause the source may have lost any request: all of them again. Without
            // one, only those whose send failed (the others reached the source).
            r.requested
                .iter_mut()
                .filter(|(_, p)| was_paused || !p.sent)
                .map(|(a, p)| {
                    p.sent = true;
                    (*a, *p)
                })
                .collect()
        };
        let blocks = self.blocks();
        for (aligned, p) in &resend {
            let idstr = blocks
                .as_ref()
                .and_then(|t| t.find_id(p.block).map(|b| b.info.idstr.clone()))
                .unwrap_or_default();
            Counters::bump(&self.counters.resent_after_resume);
            self.send_request(*aligned, p, &idstr);
        }
        if !resend.is_empty() {
            self.log(
                LogLevel::Info,
                &format!(
                    "return path back: {} outstanding requests sent again",
                    resend.len()
                ),
            );
        }
    }
}

/// The blocktime clock of one batch of faults (one read(2) of the userfaultfd): read by
/// the first fault that needs it, under the request lock, and reused by the rest. Every
/// fault of the batch was raised before the read, so this time is no later for any of
/// them than a read per fault would be.
#[derive(Debug, Default)]
pub struct BatchClock(Option<u64>);

/// What recording a fault decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    /// New request: send it.
    Send(Pending),
    /// Already requested: nothing to send.
    Duplicate,
    /// New, but the return path is down: sent on resume.
    Held,
    /// The page arrived meanwhile.
    AlreadyReceived,
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n % 10 == 0 {
        n /= 10;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocktime::Clock;
    use crate::notifiers::NotifierList;
    use crate::shared_ufds::SharedUfdRegistry;
    use crate::standalone::StandaloneHost;
    use crate::sys::host_page_size;
    use crate::sys::mem::AnonMapping;
    use std::sync::atomic::AtomicU64;

    /// Counts its reads; time advances 1 µs per read.
    #[derive(Default)]
    struct CountingClock(AtomicU64);
    impl Clock for CountingClock {
        fn now_ns(&self) -> u64 {
            (self.0.fetch_add(1, Ordering::SeqCst) + 1) * 1000
        }
    }

    #[test]
    fn a_dead_link_logs_one_line_per_decade_of_failed_requests() {
        let host = Arc::new(StandaloneHost::new(0));
        let logs = Arc::new(parking_lot::Mutex::new(Vec::<(LogLevel, String)>::new()));
        let l = logs.clone();
        host.set_log_fn(Box::new(move |level, msg| {
            l.lock().push((level, msg.into()))
        }));
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        // The first 120 sends fail; the return path still says it is up.
        host.set_request_fn(Box::new(move |_, _| {
            if c.fetch_add(1, Ordering::SeqCst) < 120 {
                Err(libc::EPIPE)
            } else {
                Ok(())
            }
        }));
        let ps = host_page_size();
        let mem = AnonMapping::new(256 * ps as usize).unwrap();
        host.add_block("pc.ram", mem.addr(), 256 * ps, ps, -1, 0)
            .unwrap();
        let inc = Arc::new(Incoming::new(
            0x3000,
            host.clone(),
            Arc::new(NotifierList::new()),
            Arc::new(SharedUfdRegistry::new()),
        ));
        inc.init().unwrap();
        inc.setup().unwrap();
        let active = inc.active().unwrap();
        for page in 0..125 {
            inc.handle_fault(&active, mem.addr() as u64 + page * ps, 0);
        }
        let c = inc.counters.snapshot();
        assert_eq!((c.request_errors, c.requests_sent), (120, 5));
        let lines: Vec<_> = logs
            .lock()
            .iter()
            .filter(|(_, m)| m.contains("page request"))
            .cloned()
            .collect();
        let errors: Vec<_> = lines
            .iter()
            .filter(|(lv, _)| *lv == LogLevel::Error)
            .map(|(_, m)| m.as_str())
            .collect();
        assert_eq!(
            errors.len(),
            3,
            "the 1st, 10th and 100th failure: {errors:?}"
        );
        assert!(errors[0].contains("Broken pipe") && errors[0].contains("only every power of ten"));
        assert!(errors[1].ends_with("; 10 failed in a row"), "{}", errors[1]);
        assert!(
            errors[2].ends_with("; 100 failed in a row"),
            "{}",
            errors[2]
        );
        let warnings: Vec<_> = lines
            .iter()
            .filter(|(lv, _)| *lv == LogLevel::Warning)
            .map(|(_, m)| m.as_str())
            .collect();
        assert_eq!(
            warnings,
            ["page requests are sent again, after 120 failed in a row"]
        );
        drop(active);
        inc.cleanup().unwrap();
    }

    #[test]
    fn powers_of_ten() {
        let found: Vec<u64> = (1..=10_000)
            .filter(|&n| super::is_power_of_ten(n))
            .collect();
        assert_eq!(found, [1, 10, 100, 1000, 10_000]);
    }

    #[test]
    fn a_batch_of_faults_reads_the_blocktime_clock_once() {
        let host = Arc::new(StandaloneHost::new(0));
        host.set_log_fn(Box::new(|_, _| {}));
        host.set_request_fn(Box::new(|_, _| Ok(())));
        let ps = host_page_size();
        let mem = AnonMapping::new(16 * ps as usize).unwrap();
        host.add_block("pc.ram", mem.addr(), 16 * ps, ps, -1, 0)
            .unwrap();
        for i in 0..4 {
            host.add_vcpu(i, 100 + i);
        }
        host.set_capabilities(true, false);
        let clock = Arc::new(CountingClock::default());
        let inc = Arc::new(Incoming::with_clock(
            0x2000,
            host.clone(),
            Arc::new(NotifierList::new()),
            Arc::new(SharedUfdRegistry::new()),
            clock.clone(),
        ));
        inc.init().unwrap();
        inc.setup().unwrap();
        let active = inc.active().unwrap();
        let base = mem.addr() as u64;
        let reads = || clock.0.load(Ordering::SeqCst);

        // One batch: three vCPU faults on three pages, a tid-0 fault, a duplicate.
        let before = reads();
        let mut batch = BatchClock::default();
        for (i, tid) in [(0, 100), (1, 101), (2, 102), (3, 0), (0, 103)] {
            inc.handle_fault_at(&active, base + i * ps, tid, &mut batch);
        }
        assert_eq!(reads() - before, 1, "one clock read for the batch");

        // Faults handled one by one read it once each (tid 0 never).
        let before = reads();
        inc.handle_fault(&active, base + 5 * ps, 100);
        inc.handle_fault(&active, base + 6 * ps, 0);
        inc.handle_fault(&active, base + 7 * ps, 101);
        assert_eq!(reads() - before, 2);

        let st = inc.blocktime_stats().unwrap();
        assert_eq!(st.vcpus.iter().map(|v| v.faults).sum::<u64>(), 6);
        assert_eq!(inc.counters.snapshot().requests_sent, 7);
        drop(active);
        inc.cleanup().unwrap();
    }
}
