//! The host-ops table: how a C hypervisor gives the library its services.
//!
//! Versioned by `size` and `version` so members can be appended. Required members are
//! checked at registration; each optional member documents what happens without it.
use super::types::{
    ErrorRef, MigrationIncomingStateRef, MigrationStateRef, QemuFileRef, QemuThreadRef, RamBlockRef,
};
use super::{guard, install_host};
use crate::blocktime::VcpuInfo;
use crate::error::{Error, Result};
use crate::host::RequestOutcome;
use crate::host::{
    self, BlockId, ErrorSlot, Host, LogLevel, PageRequest, PreemptConnect, RamBlockInfo,
};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Arc;

/// The table version this library implements.
pub const POSTCOPY_HOST_OPS_VERSION: u32 = 1;

/// Log levels passed to `PostcopyHostOps.log`.
#[allow(non_camel_case_types)]
#[repr(C)]
pub enum PostcopyLogLevel {
    POSTCOPY_LOG_ERROR = 0,
    POSTCOPY_LOG_WARNING = 1,
    POSTCOPY_LOG_INFO = 2,
}

/// A RAM block as the host describes it (`PostcopyHostOps.ram_block_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PostcopyRamBlockInfo {
    /// The block's name (QEMU: idstr); must stay valid while the block exists.
    pub idstr: *const c_char,
    /// Host address of the block's first byte.
    pub host: *mut c_void,
    /// Offset in the guest's ram_addr space (informational).
    pub offset: u64,
    /// Bytes postcopy covers.
    pub used_length: u64,
    /// The block's page size (host page size, or the huge page size).
    pub page_size: u64,
    /// Backing file descriptor, or -1 for anonymous memory.
    pub fd: c_int,
    /// Offset of `host` inside the backing file.
    pub fd_offset: u64,
}

/// A vCPU (`PostcopyHostOps.vcpus`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PostcopyVcpu {
    /// QEMU's cpu_index.
    pub index: u32,
    /// The vCPU thread's kernel thread id.
    pub tid: u32,
}

/// Callback of `ram_block_foreach`: return non-zero to stop.
pub type PostcopyRamBlockFn =
    Option<unsafe extern "C" fn(rb: *mut RamBlockRef, ctx: *mut c_void) -> c_int>;

/// The hypervisor's services. Zero-initialise it, set `size = sizeof(PostcopyHostOps)`,
/// `version = POSTCOPY_HOST_OPS_VERSION`, fill what you have, and pass it to
/// `postcopy_host_register`, which copies it. Every function receives `opaque` first.
/// Unless noted, a member is called on the thread of the library call that needs it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PostcopyHostOps {
    /// sizeof(PostcopyHostOps) as the host compiled it.
    pub size: u32,
    /// POSTCOPY_HOST_OPS_VERSION.
    pub version: u32,
    /// Passed back to every member.
    pub opaque: *mut c_void,

    /// Required. Calls `fn(rb, ctx)` for every RAM block postcopy covers (QEMU:
    /// foreach_not_ignored_block), stopping at and returning the first non-zero.
    pub ram_block_foreach: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            func: PostcopyRamBlockFn,
            ctx: *mut c_void,
        ) -> c_int,
    >,
    /// Required. Describes `rb`; returns 0 or a negative errno.
    pub ram_block_info: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            rb: *mut RamBlockRef,
            info: *mut PostcopyRamBlockInfo,
        ) -> c_int,
    >,
    /// Optional. Records whether UFFDIO_ZEROPAGE works on `rb` (QEMU: qemu_ram_set_uf_zeroable).
    pub ram_block_set_uf_zeroable:
        Option<unsafe extern "C" fn(opaque: *mut c_void, rb: *mut RamBlockRef, zeroable: bool)>,
    /// Optional. Discards `[start, start + length)` bytes of `rb`: clears its received bits
    /// and drops the memory (QEMU: ram_discard_range). Without it the library drops the
    /// memory itself (MADV_DONTNEED, or a hole punched in the backing file) and leaves the
    /// received bitmap alone.
    pub ram_discard_range: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            rb: *mut RamBlockRef,
            start: u64,
            length: u64,
        ) -> c_int,
    >,

    /// Required. Is the page at byte `offset` of `rb` received? Called with the library's
    /// page-request lock held: must not call back into the library.
    pub recv_bitmap_test: Option<
        unsafe extern "C" fn(opaque: *mut c_void, rb: *mut RamBlockRef, offset: u64) -> bool,
    >,
    /// Required. Marks `[offset, offset + length)` bytes of `rb` received. Called with the
    /// page-request lock held: must not call back into the library.
    pub recv_bitmap_set_range: Option<
        unsafe extern "C" fn(opaque: *mut c_void, rb: *mut RamBlockRef, offset: u64, length: u64),
    >,

    /// Required for setup. Sends a request for `length` bytes at page-aligned `offset` of
    /// `rb` (named `idstr`) to the source; `haddr` is the faulting address, `tid` the
    /// faulting thread (0 if unknown). Fault thread only. Returns 0 when sent; 1 when the
    /// page is discarded on the source side and will never be sent (the library then places
    /// a zero page); or a negative errno (the request is sent again after recovery).
    pub request_page: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            rb: *mut RamBlockRef,
            idstr: *const c_char,
            offset: u64,
            length: u64,
            haddr: u64,
            tid: u32,
        ) -> c_int,
    >,
    /// Optional. A page of `rb` was placed, after the received bitmap was updated (QEMU's
    /// adapter drops it from its own requested-page tree here). Placing thread.
    pub page_placed: Option<
        unsafe extern "C" fn(opaque: *mut c_void, rb: *mut RamBlockRef, offset: u64, length: u64),
    >,
    /// Optional. Is the return path to the source usable? Without it: always. While false,
    /// the fault thread records faults without sending them; the host calls
    /// `postcopy_fault_thread_notify` after changing the answer.
    pub return_path_ok: Option<unsafe extern "C" fn(opaque: *mut c_void) -> bool>,
    /// Required for the discard_send functions (source). Sends one discard command for
    /// block `name`: `n` (start, length) pairs in bytes. Migration thread. 0 or negative errno.
    pub send_discard: PostcopySendDiscardFn,
    /// The guest's target page size in bytes; 0 means the host page size.
    pub target_page_size: u64,

    /// Optional. Writes up to `capacity` vCPUs to `out` and returns how many exist. Read
    /// once per setup, for blocktime. Without it, blocktime counts every fault as non-vCPU.
    pub vcpus: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            out: *mut PostcopyVcpu,
            capacity: libc::size_t,
        ) -> libc::size_t,
    >,
    /// Optional. Is the postcopy-blocktime capability on? Without it: off.
    pub blocktime_enabled: Option<unsafe extern "C" fn(opaque: *mut c_void) -> bool>,
    /// Optional. Is the postcopy-preempt capability on? Without it: off.
    pub preempt_enabled: Option<unsafe extern "C" fn(opaque: *mut c_void) -> bool>,

    /// Optional. Creates a thread for `postcopy_thread_create` the hypervisor's way (QEMU:
    /// qemu_thread_create and the thread_sync handshake) and returns once it has started.
    /// Without it: a pthread, started with a library-side handshake.
    pub thread_create: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            mis: *mut MigrationIncomingStateRef,
            thread: *mut QemuThreadRef,
            name: *const c_char,
            func: Option<unsafe extern "C" fn(arg: *mut c_void) -> *mut c_void>,
            joinable: c_int,
        ),
    >,
    /// Optional. First call on every thread the library starts (QEMU: rcu_register_thread).
    pub thread_enter: Option<unsafe extern "C" fn(opaque: *mut c_void, name: *const c_char)>,
    /// Optional. Last call on every thread the library starts (QEMU: rcu_unregister_thread).
    pub thread_exit: Option<unsafe extern "C" fn(opaque: *mut c_void)>,

    /// Optional. Sets `*errp` to `msg` (QEMU: error_setg). Without it, messages go to the log.
    pub set_error: Option<
        unsafe extern "C" fn(opaque: *mut c_void, errp: *mut *mut ErrorRef, msg: *const c_char),
    >,
    /// Optional. Logs `msg` (QEMU: error_report / warn_report / info_report). Without it: stderr.
    pub log: Option<unsafe extern "C" fn(opaque: *mut c_void, level: c_int, msg: *const c_char)>,

    /// The hypervisor's MigrationStatus value for postcopy-paused; 0 means the seed's 6.
    pub status_postcopy_paused: u32,
    /// The value for postcopy-recover-setup; 0 means the seed's 7.
    pub status_postcopy_recover_setup: u32,

    /// Optional (source, preempt). Starts connecting the preempt channel of `ms`. Returns 0
    /// when connected, 1 when connecting (then the host calls
    /// `postcopy_preempt_channel_result` later), or a negative errno.
    pub preempt_connect:
        Option<unsafe extern "C" fn(opaque: *mut c_void, ms: *mut MigrationStateRef) -> c_int>,
    /// Optional (destination, preempt). Loads urgent pages from `file` until it ends or
    /// fails (QEMU: ram_load_postcopy on RAM_CHANNEL_POSTCOPY). Preempt thread. Returns 0 at
    /// a clean end, a negative errno on failure.
    pub preempt_load: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            mis: *mut MigrationIncomingStateRef,
            file: *mut QemuFileRef,
        ) -> c_int,
    >,
    /// Optional (destination, preempt). Shuts `file` down so a blocked `preempt_load` returns.
    pub preempt_shutdown: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            mis: *mut MigrationIncomingStateRef,
            file: *mut QemuFileRef,
        ),
    >,

    /// Optional. Called for each block at postcopy_ram_incoming_init, before its contents
    /// are discarded (QEMU: `rb->postcopy_length = used_length`); the block is described
    /// again afterwards. Main thread.
    pub ram_block_incoming_init:
        Option<unsafe extern "C" fn(opaque: *mut c_void, rb: *mut RamBlockRef)>,
    /// Optional. Blocks the fault thread until the host has recovered the return path
    /// (QEMU 10.0: `qemu_sem_wait(&mis->postcopy_pause_sem_fault)`); called on the fault
    /// thread when it finds return_path_ok false. Every outstanding request is sent again
    /// when it returns. The host must make it return before cleanup joins the fault thread.
    /// Without it: the fault thread keeps recording faults and resumes when kicked
    /// (postcopy_fault_thread_notify) with the return path up.
    pub wait_for_recovery: Option<
        unsafe extern "C" fn(opaque: *mut c_void, mis: *mut MigrationIncomingStateRef) -> c_int,
    >,
    /// Optional. At the end of setup (before the preempt thread starts): the `channels`
    /// temp pages and the zero page, each of the largest block page size, for a host whose
    /// own code assembles pages in them (QEMU: `mis->postcopy_tmp_pages`,
    /// `postcopy_tmp_zero_page`). At cleanup: channels 0 and NULLs. Main thread.
    pub publish_temp_pages: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            mis: *mut MigrationIncomingStateRef,
            channels: u32,
            tmp_pages: *const *mut c_void,
            zero_page: *mut c_void,
        ),
    >,
    /// Optional (destination, preempt). The source connected the preempt channel `file`
    /// (QEMU: set `mis->postcopy_qemufile_dst`, post `postcopy_qemufile_dst_done`). Called
    /// by postcopy_preempt_new_channel before the library's preempt thread is handed it.
    pub preempt_channel_arrived: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            mis: *mut MigrationIncomingStateRef,
            file: *mut QemuFileRef,
        ),
    >,
    /// Optional. At the end of every postcopy_ram_incoming_cleanup in which no block is
    /// left registered with the userfaultfd: lock guest memory again if the host keeps it
    /// locked (QEMU: `if (should_mlock(mlock_state)) os_mlock(...)`), since
    /// postcopy_ram_supported_by_host unlocked it. Returns 0 or -errno; a failure is logged
    /// and cleanup still returns 0. Never called while a block is registered: locking a
    /// registered missing page would wait for a fault thread that is gone. Main thread.
    /// Added after the first release of this table: a host that passes the older, shorter
    /// `size` registers and is treated as not having it.
    pub restore_mlock: Option<unsafe extern "C" fn(opaque: *mut c_void) -> c_int>,
}

/// The size of the table before `restore_mlock` was appended: the smallest `size`
/// postcopy_host_register accepts.
const HOST_OPS_MIN_SIZE: usize = std::mem::offset_of!(PostcopyHostOps, restore_mlock);

/// Sends one discard command: `n` (start, length) byte pairs of block `name`.
pub type PostcopySendDiscardFn = Option<
    unsafe extern "C" fn(
        opaque: *mut c_void,
        ms: *mut MigrationStateRef,
        name: *const c_char,
        n: u16,
        starts: *const u64,
        lengths: *const u64,
    ) -> c_int,
>;

/// Calls a C discard sender with `ranges` split into the two arrays it takes.
///
/// # Safety
/// `f`, when present, is a valid function that accepts `opaque`.
pub(crate) unsafe fn call_send_discard(
    f: PostcopySendDiscardFn,
    opaque: *mut c_void,
    ms: usize,
    name: &str,
    ranges: &[(u64, u64)],
) -> std::result::Result<(), i32> {
    let f = f.ok_or(libc::ENOTCONN)?;
    let name = msg_cstring(name);
    let starts: Vec<u64> = ranges.iter().map(|r| r.0).collect();
    let lengths: Vec<u64> = ranges.iter().map(|r| r.1).collect();
    let n = ranges.len() as u16;
    // SAFETY: f accepts opaque (caller's contract); name and both arrays live across the call.
    let rc = unsafe {
        f(
            opaque,
            ms as *mut _,
            name.as_ptr(),
            n,
            starts.as_ptr(),
            lengths.as_ptr(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(rc.abs())
    }
}

/// The registered table, behind the safe `Host` trait.
pub struct CHost {
    ops: PostcopyHostOps,
}

// SAFETY: the table holds function pointers and an opaque pointer the host registered
// for use from any thread; the registration contract (header docs) says each member is
// callable from the threads named in its doc.
unsafe impl Send for CHost {}
// SAFETY: as above; the library never mutates the table after registration.
unsafe impl Sync for CHost {}

fn rb_ptr(id: BlockId) -> *mut RamBlockRef {
    id.0 as *mut RamBlockRef
}

pub(crate) fn msg_cstring(msg: &str) -> CString {
    CString::new(msg.replace('\0', " ")).unwrap_or_default()
}

impl CHost {
    /// Validates and copies a table.
    ///
    /// # Safety
    /// `ops` is NULL or points to at least `ops->size` readable bytes.
    pub unsafe fn from_raw(ops: *const PostcopyHostOps) -> Result<Self> {
        if ops.is_null() {
            return Err(Error::NullPointer("ops"));
        }
        // SAFETY: non-NULL; the first 8 bytes (size, version) exist in every version.
        let (size, version) = unsafe { ((*ops).size, (*ops).version) };
        let ours = std::mem::size_of::<PostcopyHostOps>();
        if version != POSTCOPY_HOST_OPS_VERSION {
            return Err(Error::InvalidArgument(format!(
                "host ops version {version} is not {POSTCOPY_HOST_OPS_VERSION}"
            )));
        }
        if (size as usize) < HOST_OPS_MIN_SIZE {
            return Err(Error::InvalidArgument(format!(
                "host ops size {size} is smaller than the smallest table, {HOST_OPS_MIN_SIZE} bytes"
            )));
        }
        // A table from an older header is shorter: the members it lacks stay zero (absent).
        let mut copy = std::mem::MaybeUninit::<PostcopyHostOps>::zeroed();
        // SAFETY: `ops` has at least `size` readable bytes (caller's contract) and we copy
        // no more than that, nor more than our table holds; the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                ops.cast::<u8>(),
                copy.as_mut_ptr().cast::<u8>(),
                (size as usize).min(ours),
            )
        };
        // SAFETY: every member is an integer, a raw pointer or an Option of a function
        // pointer, for which all-zero bytes are valid (0, NULL, None); the rest was copied
        // from a valid table.
        let ops = unsafe { copy.assume_init() };
        for (present, name) in [
            (ops.ram_block_foreach.is_some(), "ram_block_foreach"),
            (ops.ram_block_info.is_some(), "ram_block_info"),
            (ops.recv_bitmap_test.is_some(), "recv_bitmap_test"),
            (ops.recv_bitmap_set_range.is_some(), "recv_bitmap_set_range"),
        ] {
            if !present {
                return Err(Error::InvalidArgument(format!(
                    "host ops member {name} is required"
                )));
            }
        }
        Ok(CHost { ops })
    }

    pub fn ops(&self) -> &PostcopyHostOps {
        &self.ops
    }

    fn block_info(&self, rb: *mut RamBlockRef) -> Option<RamBlockInfo> {
        let f = self.ops.ram_block_info?;
        let mut info = PostcopyRamBlockInfo {
            idstr: std::ptr::null(),
            host: std::ptr::null_mut(),
            offset: 0,
            used_length: 0,
            page_size: 0,
            fd: -1,
            fd_offset: 0,
        };
        // SAFETY: a registered host function, called with its opaque and a live out-struct.
        if unsafe { f(self.ops.opaque, rb, &mut info) } != 0 {
            return None;
        }
        let idstr = if info.idstr.is_null() {
            format!("ramblock@{:#x}", rb as usize)
        } else {
            // SAFETY: the host's contract: idstr is a NUL-terminated string valid while the block exists.
            unsafe { CStr::from_ptr(info.idstr) }
                .to_string_lossy()
                .into_owned()
        };
        Some(RamBlockInfo {
            id: BlockId(rb as usize),
            idstr,
            host: info.host as usize,
            offset: info.offset,
            used_length: info.used_length,
            page_size: info.page_size,
            fd: info.fd,
            fd_offset: info.fd_offset,
        })
    }
}

unsafe extern "C" fn collect_block(rb: *mut RamBlockRef, ctx: *mut c_void) -> c_int {
    // SAFETY: ctx is the &mut Vec passed by ram_blocks below, live for the foreach call.
    let out = unsafe { &mut *(ctx as *mut Vec<*mut RamBlockRef>) };
    out.push(rb);
    0
}

impl Host for CHost {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn ram_blocks(&self) -> Vec<RamBlockInfo> {
        let Some(foreach) = self.ops.ram_block_foreach else {
            return Vec::new();
        };
        let mut ptrs: Vec<*mut RamBlockRef> = Vec::new();
        // SAFETY: a registered host function; ctx is a live Vec that collect_block fills.
        unsafe {
            foreach(
                self.ops.opaque,
                Some(collect_block),
                (&mut ptrs as *mut Vec<_>).cast(),
            )
        };
        ptrs.into_iter()
            .filter_map(|rb| self.block_info(rb))
            .collect()
    }

    fn ram_block(&self, id: BlockId) -> Option<RamBlockInfo> {
        self.block_info(rb_ptr(id))
    }

    fn target_page_size(&self) -> u64 {
        if self.ops.target_page_size == 0 {
            crate::sys::host_page_size()
        } else {
            self.ops.target_page_size
        }
    }

    fn set_uf_zeroable(&self, block: BlockId, zeroable: bool) {
        if let Some(f) = self.ops.ram_block_set_uf_zeroable {
            // SAFETY: a registered host function with its opaque and a block it listed.
            unsafe { f(self.ops.opaque, rb_ptr(block), zeroable) }
        }
    }

    fn recv_test(&self, block: BlockId, offset: u64) -> bool {
        match self.ops.recv_bitmap_test {
            // SAFETY: a registered host function with its opaque and a block it listed.
            Some(f) => unsafe { f(self.ops.opaque, rb_ptr(block), offset) },
            None => false,
        }
    }

    fn recv_set_range(&self, block: BlockId, offset: u64, len: u64) {
        if let Some(f) = self.ops.recv_bitmap_set_range {
            // SAFETY: a registered host function with its opaque and a block it listed.
            unsafe { f(self.ops.opaque, rb_ptr(block), offset, len) }
        }
    }

    fn discard_range(&self, block: &RamBlockInfo, start: u64, len: u64) -> Result<()> {
        if let Some(f) = self.ops.ram_discard_range {
            // SAFETY: a registered host function with its opaque and a block it listed.
            let rc = unsafe { f(self.ops.opaque, rb_ptr(block.id), start, len) };
            return if rc == 0 {
                Ok(())
            } else {
                Err(Error::Host {
                    what: "ram_discard_range",
                    errno: rc,
                })
            };
        }
        if start
            .checked_add(len)
            .is_none_or(|end| end > block.used_length)
        {
            return Err(Error::InvalidArgument(format!(
                "discard range runs past the end of RAM block '{}'",
                block.idstr
            )));
        }
        crate::sys::mem::discard(
            block.host + start as usize,
            len,
            block.fd,
            block.fd_offset + start,
        )
        .map_err(|e| {
            Error::os(
                format!("discarding {len:#x} bytes of RAM block '{}'", block.idstr),
                e,
            )
        })
    }

    fn block_incoming_init(&self, block: BlockId) {
        if let Some(f) = self.ops.ram_block_incoming_init {
            // SAFETY: a registered host function with its opaque and a block it listed.
            unsafe { f(self.ops.opaque, rb_ptr(block)) }
        }
    }

    fn request_page(&self, req: &PageRequest<'_>) -> std::result::Result<RequestOutcome, i32> {
        let f = self.ops.request_page.ok_or(libc::ENOTCONN)?;
        let idstr = msg_cstring(req.idstr);
        let rb = rb_ptr(req.block);
        // SAFETY: a registered host function; idstr lives across the call.
        let rc = unsafe {
            f(
                self.ops.opaque,
                rb,
                idstr.as_ptr(),
                req.offset,
                req.len,
                req.haddr,
                req.tid,
            )
        };
        match rc {
            0 => Ok(RequestOutcome::Sent),
            1 => Ok(RequestOutcome::Discarded),
            rc => Err(rc.abs()),
        }
    }

    fn wait_for_recovery(&self, mis: usize) -> Option<()> {
        let f = self.ops.wait_for_recovery?;
        // SAFETY: a registered host function with its opaque and the caller's mis.
        unsafe { f(self.ops.opaque, mis as *mut _) };
        Some(())
    }

    fn publish_temp_pages(&self, mis: usize, tmp_pages: &[usize], zero_page: usize) {
        if let Some(f) = self.ops.publish_temp_pages {
            let ptrs: Vec<*mut c_void> = tmp_pages.iter().map(|&a| a as *mut c_void).collect();
            let list = if ptrs.is_empty() {
                std::ptr::null()
            } else {
                ptrs.as_ptr()
            };
            let n = ptrs.len() as u32;
            // SAFETY: a registered host function; the pointer array lives across the call.
            unsafe {
                f(
                    self.ops.opaque,
                    mis as *mut _,
                    n,
                    list,
                    zero_page as *mut c_void,
                )
            }
        }
    }

    fn restore_mlock(&self) -> std::result::Result<(), i32> {
        let Some(f) = self.ops.restore_mlock else {
            return Ok(());
        };
        // SAFETY: a registered host function with its opaque.
        match unsafe { f(self.ops.opaque) } {
            0 => Ok(()),
            rc => Err(rc.abs()),
        }
    }

    fn preempt_channel_arrived(&self, mis: usize, file: usize) {
        if let Some(f) = self.ops.preempt_channel_arrived {
            // SAFETY: a registered host function with the pointers the host gave us.
            unsafe { f(self.ops.opaque, mis as *mut _, file as *mut _) }
        }
    }

    fn page_placed(&self, block: BlockId, offset: u64, len: u64) {
        if let Some(f) = self.ops.page_placed {
            // SAFETY: a registered host function with its opaque and a block it listed.
            unsafe { f(self.ops.opaque, rb_ptr(block), offset, len) }
        }
    }

    fn return_path_ok(&self) -> bool {
        match self.ops.return_path_ok {
            // SAFETY: a registered host function with its opaque.
            Some(f) => unsafe { f(self.ops.opaque) },
            None => true,
        }
    }

    fn send_discard(
        &self,
        ms: usize,
        name: &str,
        ranges: &[(u64, u64)],
    ) -> std::result::Result<(), i32> {
        // SAFETY: a registered host function with its opaque.
        unsafe { call_send_discard(self.ops.send_discard, self.ops.opaque, ms, name, ranges) }
    }

    fn vcpus(&self) -> Vec<VcpuInfo> {
        let Some(f) = self.ops.vcpus else {
            return Vec::new();
        };
        // SAFETY: a registered host function; capacity 0 with a NULL buffer asks for the count.
        let n = unsafe { f(self.ops.opaque, std::ptr::null_mut(), 0) };
        let mut buf = vec![PostcopyVcpu::default(); n.min(1 << 16)];
        // SAFETY: buf has room for buf.len() entries.
        let got = unsafe { f(self.ops.opaque, buf.as_mut_ptr(), buf.len()) };
        buf.truncate(got.min(buf.len()));
        buf.into_iter()
            .map(|v| VcpuInfo {
                index: v.index,
                tid: v.tid,
            })
            .collect()
    }

    fn blocktime_enabled(&self) -> bool {
        // SAFETY: a registered host function with its opaque.
        self.ops
            .blocktime_enabled
            .is_some_and(|f| unsafe { f(self.ops.opaque) })
    }

    fn preempt_enabled(&self) -> bool {
        // SAFETY: a registered host function with its opaque.
        self.ops
            .preempt_enabled
            .is_some_and(|f| unsafe { f(self.ops.opaque) })
    }

    fn thread_enter(&self, name: &str) {
        if let Some(f) = self.ops.thread_enter {
            let name = msg_cstring(name);
            // SAFETY: a registered host function; name lives across the call.
            unsafe { f(self.ops.opaque, name.as_ptr()) }
        }
    }

    fn thread_exit(&self) {
        if let Some(f) = self.ops.thread_exit {
            // SAFETY: a registered host function with its opaque.
            unsafe { f(self.ops.opaque) }
        }
    }

    fn log(&self, level: LogLevel, msg: &str) {
        match self.ops.log {
            Some(f) => {
                let msg = msg_cstring(msg);
                // SAFETY: a registered host function; msg lives across the call.
                unsafe { f(self.ops.opaque, level as c_int, msg.as_ptr()) }
            }
            None => host::default_log(level, msg),
        }
    }

    fn set_error(&self, errp: ErrorSlot, msg: &str) -> bool {
        let Some(f) = self.ops.set_error else {
            return false;
        };
        if errp.0 == 0 {
            return false;
        }
        let msg = msg_cstring(msg);
        // SAFETY: a registered host function; errp is the caller's non-NULL Error **.
        unsafe { f(self.ops.opaque, errp.0 as *mut *mut ErrorRef, msg.as_ptr()) };
        true
    }

    fn paused_statuses(&self) -> [u32; 2] {
        let pick = |v: u32, d: u32| if v == 0 { d } else { v };
        [
            pick(
                self.ops.status_postcopy_paused,
                host::MIGRATION_STATUS_POSTCOPY_PAUSED,
            ),
            pick(
                self.ops.status_postcopy_recover_setup,
                host::MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP,
            ),
        ]
    }

    fn preempt_connect(&self, ms: usize) -> PreemptConnect {
        let Some(f) = self.ops.preempt_connect else {
            return PreemptConnect::Failed(libc::ENOTSUP);
        };
        // SAFETY: a registered host function with its opaque and the caller's MigrationState.
        match unsafe { f(self.ops.opaque, ms as *mut _) } {
            0 => PreemptConnect::Ready,
            rc if rc > 0 => PreemptConnect::Pending,
            rc => PreemptConnect::Failed(-rc),
        }
    }

    fn preempt_load(&self, mis: usize, file: usize) -> i32 {
        match self.ops.preempt_load {
            // SAFETY: a registered host function with the pointers the host gave us.
            Some(f) => unsafe { f(self.ops.opaque, mis as *mut _, file as *mut _) },
            None => -libc::ENOTSUP,
        }
    }

    fn preempt_shutdown(&self, mis: usize, file: usize) {
        if let Some(f) = self.ops.preempt_shutdown {
            // SAFETY: a registered host function with the pointers the host gave us.
            unsafe { f(self.ops.opaque, mis as *mut _, file as *mut _) }
        }
    }
}

/// Registers the hypervisor's services (not part of QEMU's header). Copies `*ops`.
///
/// Thread: main thread, before any other postcopy call that needs the host (init,
/// setup, supported_by_host, discard_send, place_page).
///
/// Returns 0; -EINVAL when `ops` is NULL, `version` is not POSTCOPY_HOST_OPS_VERSION,
/// `size` is smaller than this library's table, or a required member is NULL; -EBUSY while
/// an incoming context is set up (the previous host stays registered).
#[no_mangle]
pub extern "C" fn postcopy_host_register(ops: *const PostcopyHostOps) -> c_int {
    guard("postcopy_host_register", -libc::EFAULT, || {
        // SAFETY: the caller's contract: ops is NULL or a table of at least ops->size bytes.
        let host = match unsafe { CHost::from_raw(ops) } {
            Ok(h) => h,
            Err(e) => return super::fail("postcopy_host_register", e),
        };
        match install_host(Some(Arc::new(host))) {
            Ok(()) => 0,
            Err(e) => super::fail("postcopy_host_register", e),
        }
    })
}

/// Forgets the registered host (a standalone host stays alive for its owner).
///
/// Thread: main thread. Returns 0, or -EBUSY while an incoming context is set up.
#[no_mangle]
pub extern "C" fn postcopy_host_unregister() -> c_int {
    guard(
        "postcopy_host_unregister",
        -libc::EFAULT,
        || match install_host(None) {
            Ok(()) => 0,
            Err(e) => super::fail("postcopy_host_unregister", e),
        },
    )
}
