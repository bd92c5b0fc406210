//! What the library needs from the hypervisor, as a safe Rust trait.
//!
//! The hypervisor owns RAM blocks, the received bitmap, the return path to the source, the
//! vCPU list, errors and threads. C hypervisors reach this trait through the versioned
//! `PostcopyHostOps` table (`ffi::host_ops`); the standalone host (`standalone`) implements
//! it directly for VMMs and harnesses without QEMU's machinery.
use crate::blocktime::VcpuInfo;

/// Identifies a RAM block: the hypervisor's `RAMBlock *` as an address. Never dereferenced
/// by the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub usize);

/// A RAM block as the host describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlockInfo {
    pub id: BlockId,
    pub idstr: String,
    /// Host virtual address of the block's first byte.
    pub host: usize,
    /// The block's offset in the guest's ram_addr space (informational).
    pub offset: u64,
    /// Bytes in use; postcopy covers `[host, host + used_length)`.
    pub used_length: u64,
    /// The block's host page size (4 KiB, or a huge page size for hugetlbfs).
    pub page_size: u64,
    /// Backing file descriptor, or -1 for anonymous memory.
    pub fd: i32,
    /// Offset of `host` inside the backing file.
    pub fd_offset: u64,
}

/// One page the destination needs from the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest<'a> {
    pub block: BlockId,
    pub idstr: &'a str,
    /// Page-aligned offset inside the block.
    pub offset: u64,
    /// The block's page size: how many bytes are requested.
    pub len: u64,
    /// The faulting address as reported (guest-RAM address; not aligned).
    pub haddr: u64,
    /// Faulting thread id, 0 if unknown.
    pub tid: u32,
}

/// What the host did with a page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Sent to the source.
    Sent,
    /// Not sent: the page is discarded on the source side (QEMU: a RamDiscardManager
    /// range), so the library places a zero page for it.
    Discarded,
}

/// Log levels the host may filter on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum LogLevel {
    Error = 0,
    Warning = 1,
    Info = 2,
}

/// What the caller passed as `Error **errp`, kept as an address: only the host layer that
/// created the table knows how to set it. 0 means "no errp".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ErrorSlot(pub usize);

/// Outcome of asking the host to open the preempt channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreemptConnect {
    /// Connected before the call returned.
    Ready,
    /// Connecting; the host reports the result later (`postcopy_preempt_channel_result`).
    Pending,
    /// Failed with this errno.
    Failed(i32),
}

/// Hypervisor services. Every method is called from the thread named in its doc; none is
/// called with a library lock held except the two received-bitmap methods, which run under
/// the page-request lock exactly as QEMU's `page_request_mutex` covers its bitmap updates.
pub trait Host: Send + Sync + std::any::Any {
    /// For the C layer, to reach members only a C table has (thread_create).
    fn as_any(&self) -> &dyn std::any::Any;

    /// The RAM blocks postcopy covers (QEMU: every block not ignored). Main thread.
    fn ram_blocks(&self) -> Vec<RamBlockInfo>;

    /// One block by id. Any thread.
    fn ram_block(&self, id: BlockId) -> Option<RamBlockInfo> {
        self.ram_blocks().into_iter().find(|b| b.id == id)
    }

    /// The guest's target page size in bytes: discard ranges arrive in these units.
    fn target_page_size(&self) -> u64 {
        crate::sys::host_page_size()
    }

    /// Records whether UFFDIO_ZEROPAGE works on this block (QEMU: RAM_UF_ZEROPAGE). Main thread.
    fn set_uf_zeroable(&self, _block: BlockId, _zeroable: bool) {}

    /// Is the page at `offset` received? Called with the page-request lock held.
    fn recv_test(&self, block: BlockId, offset: u64) -> bool;

    /// Marks `[offset, offset + len)` received. Called with the page-request lock held.
    fn recv_set_range(&self, block: BlockId, offset: u64, len: u64);

    /// Discards `[start, start + len)` bytes of a block: clears its received bits and drops
    /// the memory so the next access faults. Main thread.
    fn discard_range(&self, block: &RamBlockInfo, start: u64, len: u64) -> crate::Result<()>;

    /// Called for each block at `postcopy_ram_incoming_init`, before its contents are
    /// discarded (QEMU: `rb->postcopy_length = used_length`). Main thread.
    fn block_incoming_init(&self, _block: BlockId) {}

    /// Sends a page request to the source. Fault thread (or a shared handler's thread).
    fn request_page(&self, req: &PageRequest<'_>) -> Result<RequestOutcome, i32>;

    /// A page was placed (after the received bitmap was updated). Placing thread.
    fn page_placed(&self, _block: BlockId, _offset: u64, _len: u64) {}

    /// Is the return path to the source usable? `false` pauses the fault thread: faults are
    /// still recorded, and every outstanding request is sent again once this is `true`.
    fn return_path_ok(&self) -> bool {
        true
    }

    /// Blocks the fault thread until the host has recovered the return path (QEMU 10.0:
    /// `postcopy_pause_sem_fault`). `None`: the host has no such wait; the fault thread then
    /// keeps recording faults and resumes when kicked with the return path up.
    fn wait_for_recovery(&self, _mis: usize) -> Option<()> {
        None
    }

    /// The temp pages (one per channel) and the zero page exist (end of setup), or are gone
    /// (cleanup: empty slice, 0), for a host whose own code reads them (QEMU's
    /// `mis->postcopy_tmp_pages`). Main thread.
    fn publish_temp_pages(&self, _mis: usize, _tmp_pages: &[usize], _zero_page: usize) {}

    /// End of cleanup, once no block is registered with the userfaultfd any more: lock guest
    /// memory again if the host keeps it locked (QEMU: `-overcommit mem-lock`), since
    /// `supported_by_host` unlocked it for registration. Err(errno) is logged; cleanup
    /// still succeeds (the VM state is valid, as QEMU reasons). Main thread.
    fn restore_mlock(&self) -> Result<(), i32> {
        Ok(())
    }

    /// Sends one discard command (source side): `ranges` are (start, length) in bytes.
    fn send_discard(&self, ms: usize, name: &str, ranges: &[(u64, u64)]) -> Result<(), i32>;

    /// The vCPUs: index and kernel thread id. Read once per setup.
    fn vcpus(&self) -> Vec<VcpuInfo> {
        Vec::new()
    }

    /// Is the postcopy-blocktime capability on?
    fn blocktime_enabled(&self) -> bool {
        false
    }

    /// Is the postcopy-preempt capability on?
    fn preempt_enabled(&self) -> bool {
        false
    }

    /// Called first thing on every thread the library starts (QEMU: rcu_register_thread).
    fn thread_enter(&self, _name: &str) {}

    /// Called last thing on every thread the library starts (QEMU: rcu_unregister_thread).
    fn thread_exit(&self) {}

    /// A message for the hypervisor's log.
    fn log(&self, level: LogLevel, msg: &str) {
        default_log(level, msg)
    }

    /// Sets the caller's `Error **errp` to `msg`; does nothing when the slot is empty.
    /// Returns false when the host cannot set errors (the caller then logs the message).
    fn set_error(&self, _errp: ErrorSlot, _msg: &str) -> bool {
        false
    }

    /// `MigrationStatus` values counted as paused by `postcopy_is_paused`.
    fn paused_statuses(&self) -> [u32; 2] {
        [
            MIGRATION_STATUS_POSTCOPY_PAUSED,
            MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP,
        ]
    }

    /// Source: start opening the preempt channel for the outgoing migration `ms`.
    fn preempt_connect(&self, _ms: usize) -> PreemptConnect {
        PreemptConnect::Failed(libc::ENOTSUP)
    }

    /// Destination: load urgent pages from the preempt channel `file` until it ends or fails
    /// (QEMU: ram_load_postcopy on RAM_CHANNEL_POSTCOPY). Preempt thread. Returns 0 at a clean
    /// end of the channel, a negative errno on error.
    fn preempt_load(&self, _mis: usize, _file: usize) -> i32 {
        -libc::ENOTSUP
    }

    /// Destination: shut the preempt channel so a blocked `preempt_load` returns. Cleanup.
    fn preempt_shutdown(&self, _mis: usize, _file: usize) {}

    /// Destination: the source connected the preempt channel `file` (QEMU: store it in
    /// `mis->postcopy_qemufile_dst` and post `postcopy_qemufile_dst_done`). Main thread.
    fn preempt_channel_arrived(&self, _mis: usize, _file: usize) {}
}

/// The seed's QAPI numbering of `MigrationStatus` (QEMU 9.1 to 10.1).
pub const MIGRATION_STATUS_POSTCOPY_PAUSED: u32 = 6;
pub const MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP: u32 = 7;

/// Where messages go when the host gives no log hook: stderr, prefixed.
pub fn default_log(level: LogLevel, msg: &str) {
    let tag = match level {
        LogLevel::Error => "error",
        LogLevel::Warning => "warning",
        LogLevel::Info => "info",
    };
    eprintln!("postcopy-ram: {tag}: {msg}");
}
