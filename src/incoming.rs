//! The destination's incoming context: host probe, init, prepare_discard, setup, cleanup.
//!
//! One `Incoming` exists per `MigrationIncomingState`. It owns the userfaultfd, the kick
//! eventfd, the fault thread, the temp and zero pages, a snapshot of the RAM blocks, and —
//! under one mutex, QEMU's `page_request_mutex` — the requested-page set and blocktime.
use crate::blocktime::{Blocktime, BlocktimeStats, Clock, MonotonicClock};
use crate::error::{Error, Result};
use crate::host::{BlockId, ErrorSlot, Host, LogLevel, RamBlockInfo};
use crate::notifiers::{NotifierList, NotifyReason};
use crate::preempt::PreemptDst;
use crate::requests::{Counters, PageRequests};
use crate::shared_ufds::SharedUfdRegistry;
use crate::state::{State, POSTCOPY_STATE};
use crate::sync::{Condvar, Mutex, Publish, RwLock, RwLockReadGuard};
use crate::sys::eventfd::EventFd;
use crate::sys::host_page_size;
use crate::sys::mem::{self, AnonMapping};
use crate::sys::uffd::{self, Userfaultfd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A RAM block as postcopy sees it for the whole migration.
#[derive(Clone, Debug)]
pub struct BlockSnap {
    pub info: RamBlockInfo,
    /// UFFDIO_ZEROPAGE works on this block (not hugetlbfs); known after setup.
    pub zeroable: bool,
}

impl BlockSnap {
    pub fn start(&self) -> u64 {
        self.info.host as u64
    }
    pub fn len(&self) -> u64 {
        self.info.used_length
    }
    pub fn is_empty(&self) -> bool {
        self.info.used_length == 0
    }
    pub fn end(&self) -> u64 {
        self.start() + self.len()
    }
    pub fn page_size(&self) -> u64 {
        self.info.page_size
    }
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start() && addr < self.end()
    }
}

/// The RAM blocks, sorted by host address, so a fault is looked up without calling out.
#[derive(Clone, Debug, Default)]
pub struct BlockTable {
    blocks: Vec<BlockSnap>,
}

impl BlockTable {
    /// Snapshots and validates the host's blocks: page sizes are powers of two, blocks are
    /// page aligned and do not overlap.
    pub fn from_host(host: &dyn Host) -> Result<Self> {
        let mut blocks: Vec<BlockSnap> = host
            .ram_blocks()
            .into_iter()
            .map(|info| BlockSnap {
                info,
                zeroable: false,
            })
            .collect();
        for b in &blocks {
            let ps = b.page_size();
            if ps == 0 || !ps.is_power_of_two() {
                return Err(Error::InvalidArgument(format!(
                    "RAM block '{}' has page size {ps:#x}, not a power of two",
                    b.info.idstr
                )));
            }
            if b.start() % ps != 0 {
                return Err(Error::InvalidArgument(format!(
                    "RAM block '{}' host address {:#x} is not aligned to its page size {ps:#x}",
                    b.info.idstr,
                    b.start()
                )));
            }
        }
        blocks.sort_by_key(|b| b.start());
        for pair in blocks.windows(2) {
            if pair[0].end() > pair[1].start() {
                return Err(Error::InvalidArgument(format!(
                    "RAM blocks '{}' and '{}' overlap",
                    pair[0].info.idstr, pair[1].info.idstr
                )));
            }
        }
        Ok(BlockTable { blocks })
    }

    pub fn iter(&self) -> impl Iterator<Item = &BlockSnap> {
        self.blocks.iter()
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The block containing `addr`.
    pub fn find_addr(&self, addr: u64) -> Option<&BlockSnap> {
        let idx = self.blocks.partition_point(|b| b.start() <= addr);
        let b = self.blocks.get(idx.checked_sub(1)?)?;
        b.contains(addr).then_some(b)
    }

    pub fn find_id(&self, id: BlockId) -> Option<&BlockSnap> {
        self.blocks.iter().find(|b| b.info.id == id)
    }

    /// The block `id`, checking that `addr` is a page-aligned address inside it.
    pub fn check(&self, id: BlockId, addr: u64) -> Result<&BlockSnap> {
        let b = self.find_id(id).ok_or(Error::UnknownBlock(id.0))?;
        if !b.contains(addr) {
            return Err(Error::OutsideRam { addr });
        }
        // Page sizes are powers of two (checked when the table is built): a mask, not a
        // division, on this per-page path.
        if addr & (b.page_size() - 1) != 0 {
            return Err(Error::Misaligned {
                addr,
                page_size: b.page_size(),
                block: b.info.idstr.clone(),
            });
        }
        Ok(b)
    }

    pub fn largest_page_size(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.page_size())
            .max()
            .unwrap_or_else(host_page_size)
    }
}

/// Everything that exists between setup and cleanup.
pub struct Active {
    pub uffd: Userfaultfd,
    pub kick: Arc<EventFd>,
    pub blocks: Arc<BlockTable>,
    /// One temp page per channel, of the largest page size (QEMU's postcopy_tmp_pages).
    pub tmp_pages: Vec<AnonMapping>,
    /// A zero-filled page of the largest page size, for blocks without UFFDIO_ZEROPAGE.
    pub zero_page: AnonMapping,
    pub quit: AtomicBool,
    /// UFFD_FEATURE_THREAD_ID was negotiated: faults carry the faulting thread's id.
    pub thread_id: bool,
    fault_thread: Mutex<Option<JoinHandle<()>>>,
}

/// The incoming postcopy context of one `MigrationIncomingState`.
pub struct Incoming {
    /// The caller's `MigrationIncomingState *`, for host callbacks that need it.
    pub mis: usize,
    pub host: Arc<dyn Host>,
    pub notifiers: Arc<NotifierList>,
    pub shared: Arc<SharedUfdRegistry>,
    pub clock: Arc<dyn Clock>,
    /// Serialises init, setup and cleanup; never held while a notifier runs.
    lifecycle: Mutex<Lifecycle>,
    /// The snapshot taken by init. Its own lock, held only to copy the Arc, so `blocks()`
    /// works from inside any callback (a notifier, a host op) without the lifecycle lock.
    snapshot: RwLock<Option<Arc<BlockTable>>>,
    active: RwLock<Option<Arc<Active>>>,
    /// QEMU's page_request_mutex: the requested set, blocktime and pause state.
    pub requests: Mutex<PageRequests>,
    /// Signalled when the requested set becomes empty.
    pub drained: Condvar,
    pub counters: Counters,
    /// Page requests the host failed to send since the last one it sent: only the first
    /// and every power of ten are logged, so a dead link does not flood the log.
    pub request_failures_in_a_row: AtomicU64,
    pub preempt: PreemptDst,
}

#[derive(Default)]
struct Lifecycle {
    /// init or setup ran and cleanup has not: INBOUND_END is owed.
    end_owed: bool,
}

impl Incoming {
    pub fn new(
        mis: usize,
        host: Arc<dyn Host>,
        notifiers: Arc<NotifierList>,
        shared: Arc<SharedUfdRegistry>,
    ) -> Self {
        Self::with_clock(mis, host, notifiers, shared, Arc::new(MonotonicClock))
    }

    pub fn with_clock(
        mis: usize,
        host: Arc<dyn Host>,
        notifiers: Arc<NotifierList>,
        shared: Arc<SharedUfdRegistry>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Incoming {
            mis,
            host,
            notifiers,
            shared,
            clock,
            lifecycle: Mutex::new(Lifecycle::default()),
            snapshot: RwLock::new(None),
            active: RwLock::new(None),
            requests: Mutex::new(PageRequests::default()),
            drained: Condvar::new(),
            counters: Counters::default(),
            request_failures_in_a_row: AtomicU64::new(0),
            preempt: PreemptDst::default(),
        }
    }

    /// The setup-time resources, or NotSetUp.
    pub fn active(&self) -> Result<Arc<Active>> {
        self.active.read().clone().ok_or(Error::NotSetUp)
    }

    /// The setup-time resources for a short use on a per-page path (placement), without
    /// touching their reference count: a recursive read guard, which never waits for a
    /// writer (cleanup's write waits for it instead). Hold it for no more than a kernel
    /// call: no callback into the host or the hypervisor while it is held.
    pub fn active_ref(&self) -> Result<RwLockReadGuard<'_, Active>> {
        RwLockReadGuard::try_map(self.active.read_recursive(), |a| a.as_deref())
            .ok_or(Error::NotSetUp)
    }

    pub fn is_set_up(&self) -> bool {
        self.active.read().is_some()
    }

    pub fn log(&self, level: LogLevel, msg: &str) {
        self.host.log(level, msg)
    }

    /// The block table in force: setup's, else init's.
    pub fn blocks(&self) -> Option<Arc<BlockTable>> {
        if let Some(a) = self.active.read().as_ref() {
            return Some(a.blocks.clone());
        }
        self.snapshot.read().clone()
    }

    /// `postcopy_ram_incoming_init`: snapshot the blocks and discard their contents so
    /// every page is missing.
    pub fn init(&self) -> Result<()> {
        let mut life = self.lifecycle.lock();
        if self.is_set_up() {
            return Err(Error::AlreadySetUp);
        }
        for b in BlockTable::from_host(&*self.host)?.iter() {
            self.host.block_incoming_init(b.info.id);
        }
        // Described again: the hook may have fixed the length postcopy covers.
        let table = BlockTable::from_host(&*self.host)?;
        for b in table.iter() {
            self.host.discard_range(&b.info, 0, b.len())?;
        }
        *self.snapshot.write() = Some(Arc::new(table));
        life.end_owed = true;
        Ok(())
    }

    /// `postcopy_ram_prepare_discard`: no transparent huge pages from here on (a THP would
    /// be half-discarded), then state DISCARD.
    pub fn prepare_discard(&self) -> Result<()> {
        let table = match self.blocks() {
            Some(t) => t,
            None => Arc::new(BlockTable::from_host(&*self.host)?),
        };
        for b in table.iter() {
            nohugepage(b, true).map_err(|e| {
                Error::os(
                    format!("madvise(NOHUGEPAGE) on RAM block '{}'", b.info.idstr),
                    e,
                )
            })?;
        }
        POSTCOPY_STATE.set(State::Discard);
        Ok(())
    }

    /// `postcopy_ram_incoming_setup`: userfaultfd, kick eventfd, registrations, temp pages,
    /// blocktime, fault thread (and the preempt thread when the capability is on).
    pub fn setup(self: &Arc<Self>) -> Result<()> {
        let mut life = self.lifecycle.lock();
        if self.is_set_up() {
            return Err(Error::AlreadySetUp);
        }
        // Read again rather than reuse init's snapshot: a host may resize a block while
        // still in ADVISE (QEMU's ram_mig_ram_block_resized updates postcopy_length).
        let mut table = BlockTable::from_host(&*self.host)?;

        let uffd =
            Userfaultfd::open(true, uffd::FEATURE_THREAD_ID).map_err(Error::UffdUnavailable)?;
        let hps = host_page_size();
        if table.iter().any(|b| b.page_size() != hps)
            && !uffd.has_feature(uffd::FEATURE_MISSING_HUGETLBFS)
        {
            return Err(Error::Unsupported(
                "kernel lacks userfaultfd support for huge pages (MISSING_HUGETLBFS)".into(),
            ));
        }
        let kick = Arc::new(EventFd::new().map_err(|e| Error::os("eventfd", e))?);
        for b in table.blocks.iter_mut() {
            let ioctls = uffd.register_missing(b.info.host, b.len()).map_err(|e| {
                Error::os(
                    format!("UFFDIO_REGISTER of RAM block '{}'", b.info.idstr),
                    e,
                )
            })?;
            if ioctls & uffd::IOCTL_COPY == 0 {
                return Err(Error::Unsupported(format!(
                    "RAM block '{}' does not offer UFFDIO_COPY",
                    b.info.idstr
                )));
            }
            b.zeroable = ioctls & uffd::IOCTL_ZEROPAGE != 0;
            self.host.set_uf_zeroable(b.info.id, b.zeroable);
        }
        let largest = table.largest_page_size() as usize;
        let preempt = self.host.preempt_enabled();
        let channels = if preempt { 2 } else { 1 };
        let tmp_pages = (0..channels)
            .map(|_| AnonMapping::new(largest))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::os("mmap of a postcopy temp page", e))?;
        let zero_page = AnonMapping::new(largest)
            .map_err(|e| Error::os("mmap of the postcopy zero page", e))?;

        let blocktime = self
            .host
            .blocktime_enabled()
            .then(|| Blocktime::new(&self.host.vcpus(), self.clock.clone()));
        *self.requests.lock() = PageRequests::new(blocktime);
        self.counters.reset();
        self.request_failures_in_a_row.store(0, Ordering::Relaxed);

        let active = Arc::new(Active {
            thread_id: uffd.has_feature(uffd::FEATURE_THREAD_ID),
            uffd,
            kick,
            blocks: Arc::new(table),
            tmp_pages,
            zero_page,
            quit: AtomicBool::new(false),
            fault_thread: Mutex::new(None),
        });
        self.shared.add_listener(&active.kick);
        // Published before the fault thread starts: a page request it sends may be answered
        // (placed) at once, and placement needs the context set up.
        *self.active.write() = Some(active.clone());
        let handle = match crate::fault_thread::spawn(self.clone(), active.clone()) {
            Ok(h) => h,
            Err(e) => {
                *self.active.write() = None;
                return Err(Error::os("starting the fault thread", e));
            }
        };
        *active.fault_thread.lock() = Some(handle);
        let tmp: Vec<usize> = active.tmp_pages.iter().map(|m| m.addr()).collect();
        self.host
            .publish_temp_pages(self.mis, &tmp, active.zero_page.addr());
        if preempt {
            if let Err(e) = self.preempt.start(self.clone()) {
                drop(life);
                let _ = self.cleanup();
                return Err(e);
            }
        }
        life.end_owed = true;
        Ok(())
    }

    /// `postcopy_ram_incoming_cleanup`: wait for urgent pages (preempt), stop and join the
    /// fault thread, notify INBOUND_END, unregister every block and give THP back, release
    /// fds and temp pages, and (nothing left registered) let the host lock memory again.
    /// Safe to call twice, after a failed setup, or without setup. Stats stay readable
    /// until the next setup.
    pub fn cleanup(&self) -> Result<()> {
        let mut life = self.lifecycle.lock();
        let active = self.active.read().clone();
        if let Some(active) = &active {
            self.preempt.stop(self, active);
            active.quit.publish(true);
            let _ = active.kick.kick();
            if let Some(handle) = active.fault_thread.lock().take() {
                if handle.join().is_err() {
                    self.log(LogLevel::Error, "the fault thread panicked");
                }
            }
            *self.active.write() = None;
            self.host.publish_temp_pages(self.mis, &[], 0);
        }
        let end_rc = if std::mem::take(&mut life.end_owed) {
            // Without the lifecycle lock: a notifier may call back into the library (an
            // init or setup then finds the blocks still registered and fails cleanly).
            drop(life);
            let rc = self
                .notifiers
                .notify(NotifyReason::InboundEnd, ErrorSlot(0));
            life = self.lifecycle.lock();
            rc
        } else {
            0
        };
        let mut first_err = None;
        if let Some(active) = active {
            for b in active.blocks.iter() {
                if let Err(e) = nohugepage(b, false) {
                    self.log(
                        LogLevel::Warning,
                        &format!("madvise(HUGEPAGE) on RAM block '{}': {e}", b.info.idstr),
                    );
                }
                if let Err(e) = active.uffd.unregister(b.info.host, b.len()) {
                    first_err.get_or_insert(Error::os(
                        format!("UFFDIO_UNREGISTER of RAM block '{}'", b.info.idstr),
                        e,
                    ));
                }
            }
            let mut req = self.requests.lock();
            req.finish();
            drop(req);
            self.drained.notify_all();
            // Dropping the last Arc closes the userfaultfd and eventfd and unmaps the temp pages.
        }
        // Only with nothing registered: locking a registered missing page would wait for
        // the fault thread, which is gone.
        if first_err.is_none() {
            if let Err(errno) = self.host.restore_mlock() {
                self.log(
                    LogLevel::Error,
                    &format!(
                        "mlock of guest memory after postcopy failed: {}",
                        std::io::Error::from_raw_os_error(errno)
                    ),
                );
            }
        }
        *self.snapshot.write() = None;
        drop(life);
        if end_rc != 0 {
            return Err(Error::NotifierFailed {
                reason: "INBOUND_END",
                rc: end_rc,
            });
        }
        first_err.map_or(Ok(()), Err)
    }

    /// `postcopy_fault_thread_notify`: kick the fault thread (it re-checks quit and the
    /// return path).
    pub fn kick_fault_thread(&self) -> Result<()> {
        let active = self.active()?;
        active
            .kick
            .kick()
            .map_err(|e| Error::os("write to the fault thread's eventfd", e))
    }

    /// Blocktime figures: live while set up, the final ones after cleanup.
    pub fn blocktime_stats(&self) -> Option<BlocktimeStats> {
        self.requests.lock().blocktime_stats()
    }

    /// The temp page of `channel`, and the zero page (QEMU's postcopy_tmp_pages[] and
    /// postcopy_tmp_zero_page), for hosts that assemble pages themselves.
    pub fn temp_page(&self, channel: usize) -> Result<usize> {
        let active = self.active()?;
        active
            .tmp_pages
            .get(channel)
            .map(|m| m.addr())
            .ok_or_else(|| Error::InvalidArgument(format!("no temp page for channel {channel}")))
    }

    pub fn zero_page(&self) -> Result<usize> {
        Ok(self.active()?.zero_page.addr())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // A context dropped while set up (a Rust user's early return) still stops its threads.
        if self.is_set_up() {
            let _ = self.cleanup();
        }
    }
}

fn nohugepage(b: &BlockSnap, off: bool) -> std::io::Result<()> {
    let advice = if off {
        libc::MADV_NOHUGEPAGE
    } else {
        libc::MADV_HUGEPAGE
    };
    match mem::madvise(b.info.host, b.len(), advice) {
        // Kernels without THP reject the advice; there is nothing to turn off then.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other,
    }
}

/// `postcopy_ram_supported_by_host`: every check QEMU makes, in QEMU's order. A failing
/// PROBE notifier has set errp itself, which `Error::NotifierFailed` tells the caller.
pub fn supported_by_host(host: &dyn Host, notifiers: &NotifierList, errp: ErrorSlot) -> Result<()> {
    let hps = host_page_size();
    let tps = host.target_page_size();
    if tps > hps {
        return Err(Error::Unsupported(format!(
            "postcopy needs the target page size ({tps:#x}) to be no larger than the host page size ({hps:#x})"
        )));
    }
    let api = Userfaultfd::probe_features().map_err(Error::UffdUnavailable)?;
    let rc = notifiers.notify(NotifyReason::Probe, errp);
    if rc != 0 {
        return Err(Error::NotifierFailed {
            reason: "PROBE",
            rc,
        });
    }
    let blocks = host.ram_blocks();
    if blocks.iter().any(|b| b.page_size != hps)
        && api.features & uffd::FEATURE_MISSING_HUGETLBFS == 0
    {
        return Err(Error::Unsupported(
            "userfaultfd lacks huge page support (UFFD_FEATURE_MISSING_HUGETLBFS) and a RAM block uses huge pages".into(),
        ));
    }
    for b in &blocks {
        if b.page_size == 0 || b.used_length % b.page_size != 0 {
            return Err(Error::Unsupported(format!(
                "RAM block '{}' length {:#x} is not a multiple of its page size {:#x}",
                b.idstr, b.used_length, b.page_size
            )));
        }
        if b.fd >= 0 {
            let magic = mem::fs_magic(b.fd)
                .map_err(|e| Error::os(format!("fstatfs on RAM block '{}'", b.idstr), e))?;
            if magic != mem::TMPFS_MAGIC && magic != mem::HUGETLBFS_MAGIC {
                return Err(Error::Unsupported(format!(
                    "RAM block '{}' is backed by a file on a file system other than tmpfs or hugetlbfs (magic {magic:#x})",
                    b.idstr
                )));
            }
            if magic == mem::TMPFS_MAGIC && api.features & uffd::FEATURE_MISSING_SHMEM == 0 {
                return Err(Error::Unsupported(format!(
                    "RAM block '{}' is on tmpfs and userfaultfd lacks shared memory support",
                    b.idstr
                )));
            }
        }
    }
    // Registration fails on mlocked memory; QEMU unlocks for the same reason.
    mem::munlockall().map_err(|e| Error::os("munlockall", e))?;
    // The test registration goes through the userfaultfd crate's typed layer; kernel-mode
    // faults must be deliverable, so not user-mode-only.
    let uffd = userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .user_mode_only(false)
        .create()
        .map_err(|e| Error::UffdUnavailable(std::io::Error::other(e.to_string())))?;
    let page =
        AnonMapping::new(hps as usize).map_err(|e| Error::os("mmap of the probe page", e))?;
    let ioctls = uffd
        .register(page.as_ptr().cast(), hps as usize)
        .map_err(|e| Error::Unsupported(format!("UFFDIO_REGISTER of the probe page: {e}")))?;
    uffd.unregister(page.as_ptr().cast(), hps as usize)
        .map_err(|e| Error::Unsupported(format!("UFFDIO_UNREGISTER of the probe page: {e}")))?;
    use userfaultfd::IoctlFlags;
    for (bit, name) in [
        (IoctlFlags::WAKE, "UFFDIO_WAKE"),
        (IoctlFlags::COPY, "UFFDIO_COPY"),
        (IoctlFlags::ZEROPAGE, "UFFDIO_ZEROPAGE"),
    ] {
        if !ioctls.contains(bit) {
            return Err(Error::Unsupported(format!(
                "userfaultfd does not offer {name}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::PageRequest;
    use crate::standalone::StandaloneHost;
    use std::sync::atomic::AtomicU64;

    fn host_with_block(pages: usize) -> (Arc<StandaloneHost>, AnonMapping, BlockId) {
        let host = Arc::new(StandaloneHost::new(0));
        let ps = host_page_size();
        let mem = AnonMapping::new(pages * ps as usize).unwrap();
        let b = host
            .add_block("pc.ram", mem.addr(), (pages as u64) * ps, ps, -1, 0)
            .unwrap();
        (host, mem, b.id())
    }

    fn incoming(host: Arc<StandaloneHost>) -> Arc<Incoming> {
        Arc::new(Incoming::new(
            0x1000,
            host,
            Arc::new(NotifierList::new()),
            Arc::new(SharedUfdRegistry::new()),
        ))
    }

    #[test]
    fn block_table_finds_blocks_and_checks_addresses() {
        let (host, mem, id) = host_with_block(16);
        let ps = host_page_size();
        let table = BlockTable::from_host(&*host).unwrap();
        let start = mem.addr() as u64;
        assert_eq!(table.find_addr(start + 5 * ps + 17).unwrap().info.id, id);
        assert!(table.find_addr(start + 16 * ps).is_none());
        assert!(table.find_addr(start - 1).is_none());
        assert!(table.check(id, start + ps).is_ok());
        assert!(matches!(
            table.check(id, start + 1),
            Err(Error::Misaligned { .. })
        ));
        assert!(matches!(
            table.check(id, start + 16 * ps),
            Err(Error::OutsideRam { .. })
        ));
        assert!(matches!(
            table.check(BlockId(7), start),
            Err(Error::UnknownBlock(7))
        ));
    }

    #[test]
    fn duplicate_faults_are_requested_once_and_outside_faults_never() {
        let (host, mem, _id) = host_with_block(16);
        let sent = Arc::new(AtomicU64::new(0));
        let s = sent.clone();
        host.set_request_fn(Box::new(move |_, req| {
            assert_eq!(req.length, host_page_size());
            s.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }));
        host.set_log_fn(Box::new(|_, _| {}));
        let inc = incoming(host.clone());
        inc.init().unwrap();
        inc.setup().unwrap();
        let active = inc.active().unwrap();
        let ps = host_page_size();
        let addr = mem.addr() as u64 + 3 * ps;
        for i in 0..5 {
            inc.handle_fault(&active, addr + i * 8, 0);
        }
        inc.handle_fault(&active, mem.addr() as u64 + 100 * ps, 0);
        let c = inc.counters.snapshot();
        assert_eq!(
            (
                c.faults,
                c.requests_sent,
                c.duplicate_faults,
                c.faults_outside_ram
            ),
            (6, 1, 4, 1)
        );
        assert_eq!(sent.load(Ordering::SeqCst), 1);
        assert_eq!(inc.requests.lock().requested.len(), 1);
        // Placing the page clears the request; a later fault on it is "already received".
        let page = vec![7u8; ps as usize];
        inc.place_page(
            active.blocks.find_addr(addr).unwrap().info.id,
            addr,
            page.as_ptr() as usize,
        )
        .unwrap();
        assert!(inc.requests.lock().requested.is_empty());
        inc.handle_fault(&active, addr, 0);
        assert_eq!(inc.counters.snapshot().faults_already_received, 1);
        // SAFETY: the page was just placed, so reading it does not fault.
        assert_eq!(unsafe { *(addr as *const u8) }, 7);
        drop(active);
        inc.cleanup().unwrap();
        assert!(!inc.is_set_up());
    }

    /// The standalone host plus a restore_mlock that checks, from the kernel's view
    /// (/proc/self/smaps VmFlags: `um` = userfaultfd missing-mode registered, `lo` =
    /// locked), that guest RAM is no longer registered, then really locks it.
    struct MlockHost {
        inner: Arc<StandaloneHost>,
        range: (u64, u64),
        calls: AtomicU64,
        registered_when_called: AtomicU64,
        locked_after: AtomicU64,
    }

    fn vma_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no VMA holds {addr:#x}");
    }

    impl Host for MlockHost {
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn ram_blocks(&self) -> Vec<RamBlockInfo> {
            self.inner.ram_blocks()
        }
        fn recv_test(&self, b: BlockId, o: u64) -> bool {
            self.inner.recv_test(b, o)
        }
        fn recv_set_range(&self, b: BlockId, o: u64, l: u64) {
            self.inner.recv_set_range(b, o, l)
        }
        fn discard_range(&self, b: &RamBlockInfo, s: u64, l: u64) -> Result<()> {
            self.inner.discard_range(b, s, l)
        }
        fn request_page(
            &self,
            r: &PageRequest<'_>,
        ) -> std::result::Result<crate::host::RequestOutcome, i32> {
            self.inner.request_page(r)
        }
        fn send_discard(
            &self,
            ms: usize,
            n: &str,
            r: &[(u64, u64)],
        ) -> std::result::Result<(), i32> {
            self.inner.send_discard(ms, n, r)
        }
        fn restore_mlock(&self) -> std::result::Result<(), i32> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let (addr, len) = self.range;
            let flags = vma_flags(addr);
            if flags.split(' ').any(|f| f == "um") {
                self.registered_when_called.fetch_add(1, Ordering::SeqCst);
                return Err(libc::EBUSY);
            }
            // SAFETY: the range is the test's own mapping; mlock only pins it.
            if unsafe { libc::mlock(addr as *const libc::c_void, len as usize) } != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            if vma_flags(addr).split(' ').any(|f| f == "lo") {
                self.locked_after.fetch_add(1, Ordering::SeqCst);
            }
            // SAFETY: as above; undoes the lock so the test leaves the process as it was.
            unsafe { libc::munlock(addr as *const libc::c_void, len as usize) };
            Ok(())
        }
    }

    #[test]
    fn cleanup_lets_the_host_lock_memory_again_only_once_nothing_is_registered() {
        let (inner, mem, _id) = host_with_block(16);
        inner.set_log_fn(Box::new(|_, _| {}));
        let len = 16 * host_page_size();
        let host = Arc::new(MlockHost {
            inner,
            range: (mem.addr() as u64, len),
            calls: AtomicU64::new(0),
            registered_when_called: AtomicU64::new(0),
            locked_after: AtomicU64::new(0),
        });
        let inc = Arc::new(Incoming::new(
            0x2000,
            host.clone(),
            Arc::new(NotifierList::new()),
            Arc::new(SharedUfdRegistry::new()),
        ));
        inc.init().unwrap();
        inc.setup().unwrap();
        assert!(
            vma_flags(mem.addr() as u64).split(' ').any(|f| f == "um"),
            "setup registered the block"
        );
        inc.cleanup().unwrap();
        assert_eq!(host.calls.load(Ordering::SeqCst), 1);
        assert_eq!(host.registered_when_called.load(Ordering::SeqCst), 0);
        assert_eq!(host.locked_after.load(Ordering::SeqCst), 1);
        // A second cleanup (nothing set up) asks again, as QEMU re-locks on every cleanup.
        inc.cleanup().unwrap();
        assert_eq!(host.calls.load(Ordering::SeqCst), 2);
    }

    struct NoBlocksHost;
    impl Host for NoBlocksHost {
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
        fn ram_blocks(&self) -> Vec<RamBlockInfo> {
            vec![RamBlockInfo {
                id: BlockId(1),
                idstr: "odd".into(),
                host: 0x10_0000,
                offset: 0,
                used_length: 0x1800,
                page_size: 0x1000,
                fd: -1,
                fd_offset: 0,
            }]
        }
        fn recv_test(&self, _: BlockId, _: u64) -> bool {
            false
        }
        fn recv_set_range(&self, _: BlockId, _: u64, _: u64) {}
        fn discard_range(&self, _: &RamBlockInfo, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        fn request_page(
            &self,
            _: &PageRequest<'_>,
        ) -> std::result::Result<crate::host::RequestOutcome, i32> {
            Ok(crate::host::RequestOutcome::Sent)
        }
        fn send_discard(
            &self,
            _: usize,
            _: &str,
            _: &[(u64, u64)],
        ) -> std::result::Result<(), i32> {
            Ok(())
        }
    }

    #[test]
    fn probe_names_a_block_of_partial_pages() {
        let err = supported_by_host(&NoBlocksHost, &NotifierList::new(), ErrorSlot(0)).unwrap_err();
        assert!(
            err.to_string().contains(
                "RAM block 'odd' length 0x1800 is not a multiple of its page size 0x1000"
            ),
            "{err}"
        );
    }
}
