//! The standalone host: a ready `Host` for VMMs and harnesses without QEMU's machinery.
//! RAM blocks are added by call, the received bitmap is its own, page requests go to a
//! callback or are written to a file descriptor, discards to a callback.
use crate::blocktime::VcpuInfo;
use crate::error::{Error, Result};
use crate::host::{
    BlockId, ErrorSlot, Host, LogLevel, PageRequest, PreemptConnect, RamBlockInfo, RequestOutcome,
};
use crate::sync::{Mutex, Publish, RwLock};
use crate::sys::mem;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Blocks the per-page paths (the received bitmap) find without taking the table's lock:
/// blocks are only ever added, so the first ones are also kept in a fixed array filled in
/// order, with its length published after each fill.
const FAST_BLOCKS: usize = 64;

/// A page-granular atomic bitmap (the received map of one block).
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    pub fn new(bits: u64) -> Self {
        AtomicBitmap {
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }
    /// Sets one bit; a bit past the end is ignored.
    pub fn set(&self, bit: u64) {
        if bit < self.bits {
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::AcqRel);
        }
    }
    pub fn test(&self, bit: u64) -> bool {
        bit < self.bits
            && self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }
    /// Sets or clears `[first, first + count)`; bits past the end are ignored.
    pub fn assign_range(&self, first: u64, count: u64, value: bool) {
        let end = first.saturating_add(count).min(self.bits);
        let mut bit = first;
        while bit < end {
            let word = (bit / 64) as usize;
            let lo = bit % 64;
            let hi = (end - (bit - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if value {
                self.words[word].fetch_or(mask, Ordering::AcqRel);
            } else {
                self.words[word].fetch_and(!mask, Ordering::AcqRel);
            }
            bit += hi - lo;
        }
    }
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
    }
}

/// One RAM block of the standalone host. Its address is the `RAMBlock *` handed to C.
#[derive(Debug)]
pub struct StandaloneBlock {
    pub index: u32,
    pub idstr: String,
    pub idstr_c: CString,
    pub host: usize,
    pub len: u64,
    pub page_size: u64,
    pub fd: RawFd,
    pub fd_offset: u64,
    pub received: AtomicBitmap,
}

impl StandaloneBlock {
    pub fn id(&self) -> BlockId {
        BlockId(self as *const _ as usize)
    }
    /// log2 of the page size (a power of two: add_block checks it).
    fn page_shift(&self) -> u32 {
        self.page_size.trailing_zeros()
    }
    fn info(&self) -> RamBlockInfo {
        RamBlockInfo {
            id: self.id(),
            idstr: self.idstr.clone(),
            host: self.host,
            offset: 0,
            used_length: self.len,
            page_size: self.page_size,
            fd: self.fd,
            fd_offset: self.fd_offset,
        }
    }
}

/// A block found on a per-page path: borrowed from the lock-free array, or (past
/// FAST_BLOCKS blocks) a reference-counted copy taken under the table's lock.
enum BlockRef<'a> {
    Fast(&'a StandaloneBlock),
    Slow(Arc<StandaloneBlock>),
}

impl std::ops::Deref for BlockRef<'_> {
    type Target = StandaloneBlock;
    fn deref(&self) -> &StandaloneBlock {
        match self {
            BlockRef::Fast(b) => b,
            BlockRef::Slow(b) => b,
        }
    }
}

/// The record written to a request fd for each page request (32 bytes, one write(2)).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyPageRequest {
    /// Page-aligned offset inside the block.
    pub offset: u64,
    /// Bytes requested (the block's page size).
    pub length: u64,
    /// The faulting address.
    pub haddr: u64,
    /// Index of the block in the order blocks were added.
    pub block_index: u32,
    /// Faulting thread id, 0 when unknown.
    pub tid: u32,
}

type RequestFn =
    dyn Fn(&StandaloneBlock, &PostcopyPageRequest) -> std::result::Result<(), i32> + Send + Sync;
type DiscardFn = dyn Fn(usize, &str, &[(u64, u64)]) -> std::result::Result<(), i32> + Send + Sync;
type LogFn = dyn Fn(LogLevel, &str) + Send + Sync;
type PreemptConnectFn = dyn Fn(usize) -> PreemptConnect + Send + Sync;
type PreemptLoadFn = dyn Fn(usize, usize) -> i32 + Send + Sync;

/// Where page requests go.
enum RequestSink {
    None,
    Fd(RawFd),
    Func(Box<RequestFn>),
}

#[derive(Default)]
struct PreemptHooks {
    connect: Option<Box<PreemptConnectFn>>,
    load: Option<Box<PreemptLoadFn>>,
    shutdown: Option<Box<dyn Fn(usize, usize) + Send + Sync>>,
}

/// Errors the standalone host hands out through `Error **errp`.
#[derive(Debug)]
pub struct StandaloneError {
    pub message: CString,
}

pub struct StandaloneHost {
    blocks: RwLock<Vec<Arc<StandaloneBlock>>>,
    /// The first FAST_BLOCKS entries of `blocks`, readable without its lock.
    fast: [OnceLock<Arc<StandaloneBlock>>; FAST_BLOCKS],
    fast_len: AtomicUsize,
    target_page_size: u64,
    requests: RwLock<RequestSink>,
    discards: RwLock<Option<Box<DiscardFn>>>,
    log: RwLock<Option<Box<LogFn>>>,
    preempt_hooks: RwLock<PreemptHooks>,
    return_path_ok: AtomicBool,
    vcpus: Mutex<Vec<VcpuInfo>>,
    blocktime: AtomicBool,
    preempt: AtomicBool,
    paused_statuses: [u32; 2],
}

impl StandaloneHost {
    /// `target_page_size` 0 means the host page size.
    pub fn new(target_page_size: u64) -> Self {
        StandaloneHost {
            blocks: RwLock::new(Vec::new()),
            fast: std::array::from_fn(|_| OnceLock::new()),
            fast_len: AtomicUsize::new(0),
            target_page_size: if target_page_size == 0 {
                crate::sys::host_page_size()
            } else {
                target_page_size
            },
            requests: RwLock::new(RequestSink::None),
            discards: RwLock::new(None),
            log: RwLock::new(None),
            preempt_hooks: RwLock::new(PreemptHooks::default()),
            return_path_ok: AtomicBool::new(true),
            vcpus: Mutex::new(Vec::new()),
            blocktime: AtomicBool::new(false),
            preempt: AtomicBool::new(false),
            paused_statuses: [
                crate::host::MIGRATION_STATUS_POSTCOPY_PAUSED,
                crate::host::MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP,
            ],
        }
    }

    /// Adds a RAM block of `len` bytes at `host` (page aligned, `len` a multiple of
    /// `page_size`). `fd` is the backing file or -1.
    pub fn add_block(
        &self,
        idstr: &str,
        host: usize,
        len: u64,
        page_size: u64,
        fd: RawFd,
        fd_offset: u64,
    ) -> Result<Arc<StandaloneBlock>> {
        if idstr.is_empty() || idstr.len() > 255 {
            return Err(Error::InvalidArgument(format!(
                "RAM block name '{idstr}' must be 1 to 255 bytes"
            )));
        }
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "page size {page_size:#x} is not a power of two"
            )));
        }
        if host == 0 || host as u64 % page_size != 0 || len == 0 || len % page_size != 0 {
            return Err(Error::InvalidArgument(format!(
                "RAM block '{idstr}' at {host:#x} of {len:#x} bytes is not a non-empty whole number of {page_size:#x}-byte pages"
            )));
        }
        let Some(end) = (host as u64).checked_add(len) else {
            return Err(Error::InvalidArgument(format!(
                "RAM block '{idstr}' at {host:#x} of {len:#x} bytes is not a non-empty whole number of {page_size:#x}-byte pages inside the address space"
            )));
        };
        let mut blocks = self.blocks.write();
        if let Some(b) = blocks.iter().find(|b| {
            b.idstr == idstr || ((host as u64) < b.host as u64 + b.len && (b.host as u64) < end)
        }) {
            return Err(Error::InvalidArgument(format!(
                "RAM block '{idstr}' clashes with RAM block '{}' (same name or overlapping range)",
                b.idstr
            )));
        }
        let block = Arc::new(StandaloneBlock {
            index: blocks.len() as u32,
            idstr: idstr.to_owned(),
            idstr_c: CString::new(idstr)
                .map_err(|_| Error::InvalidArgument("RAM block name contains NUL".into()))?,
            host,
            len,
            page_size,
            fd,
            fd_offset,
            received: AtomicBitmap::new(len / page_size),
        });
        blocks.push(block.clone());
        let i = blocks.len() - 1;
        if i < FAST_BLOCKS && self.fast[i].set(block.clone()).is_ok() {
            self.fast_len.publish(i + 1);
        }
        Ok(block)
    }

    /// Block `id`, for the per-page paths (received bitmap, page requests): no lock and no
    /// reference count while the host has at most FAST_BLOCKS blocks.
    fn find_block(&self, id: BlockId) -> Option<BlockRef<'_>> {
        let n = self.fast_len.load(Ordering::Acquire);
        if let Some(b) = self.fast[..n]
            .iter()
            .filter_map(OnceLock::get)
            .find(|b| b.id() == id)
        {
            return Some(BlockRef::Fast(b));
        }
        if n < FAST_BLOCKS {
            return None;
        }
        self.block(id).map(BlockRef::Slow)
    }

    pub fn block(&self, id: BlockId) -> Option<Arc<StandaloneBlock>> {
        self.blocks.read().iter().find(|b| b.id() == id).cloned()
    }

    pub fn block_by_name(&self, idstr: &str) -> Option<Arc<StandaloneBlock>> {
        self.blocks
            .read()
            .iter()
            .find(|b| b.idstr == idstr)
            .cloned()
    }

    pub fn blocks(&self) -> Vec<Arc<StandaloneBlock>> {
        self.blocks.read().clone()
    }

    pub fn set_request_fd(&self, fd: RawFd) {
        *self.requests.write() = RequestSink::Fd(fd);
    }

    pub fn set_request_fn(&self, f: Box<RequestFn>) {
        *self.requests.write() = RequestSink::Func(f);
    }

    pub fn set_discard_fn(&self, f: Box<DiscardFn>) {
        *self.discards.write() = Some(f);
    }

    pub fn set_log_fn(&self, f: Box<LogFn>) {
        *self.log.write() = Some(f);
    }

    pub fn set_preempt_hooks(
        &self,
        connect: Option<Box<PreemptConnectFn>>,
        load: Option<Box<PreemptLoadFn>>,
        shutdown: Option<Box<dyn Fn(usize, usize) + Send + Sync>>,
    ) {
        *self.preempt_hooks.write() = PreemptHooks {
            connect,
            load,
            shutdown,
        };
    }

    pub fn set_return_path(&self, ok: bool) {
        self.return_path_ok.publish(ok);
    }

    pub fn add_vcpu(&self, index: u32, tid: u32) {
        self.vcpus.lock().push(VcpuInfo { index, tid });
    }

    pub fn clear_vcpus(&self) {
        self.vcpus.lock().clear();
    }

    pub fn set_capabilities(&self, blocktime: bool, preempt: bool) {
        self.blocktime.publish(blocktime);
        self.preempt.publish(preempt);
    }

    /// Has the page at `offset` of `block` been placed (or discarded back to missing)?
    pub fn page_received(&self, id: BlockId, offset: u64) -> Option<bool> {
        self.block(id)
            .map(|b| b.received.test(offset / b.page_size))
    }

    /// Marks a page received without placing it (precopy loaded it by plain write).
    /// Every page the byte range touches is marked; a range past the block's end is refused.
    pub fn mark_received(&self, id: BlockId, offset: u64, len: u64) -> Result<()> {
        let b = self.block(id).ok_or(Error::UnknownBlock(id.0))?;
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= b.len)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "marking {len:#x} bytes at {offset:#x} received runs past the end of RAM block '{}' ({:#x} bytes)",
                    b.idstr, b.len
                ))
            })?;
        let first = offset / b.page_size;
        b.received
            .assign_range(first, end.div_ceil(b.page_size) - first, true);
        Ok(())
    }
}

impl Host for StandaloneHost {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn ram_blocks(&self) -> Vec<RamBlockInfo> {
        self.blocks.read().iter().map(|b| b.info()).collect()
    }

    fn ram_block(&self, id: BlockId) -> Option<RamBlockInfo> {
        self.block(id).map(|b| b.info())
    }

    fn target_page_size(&self) -> u64 {
        self.target_page_size
    }

    fn recv_test(&self, id: BlockId, offset: u64) -> bool {
        // Ids come from our own table (the incoming snapshot), so the pointer is one of
        // ours; still resolve through the table rather than dereference.
        self.find_block(id)
            .is_some_and(|b| b.received.test(offset >> b.page_shift()))
    }

    fn recv_set_range(&self, id: BlockId, offset: u64, len: u64) {
        // Called for every page placed: shifts rather than divisions, one atomic OR for
        // one page.
        if let Some(b) = self.find_block(id) {
            let shift = b.page_shift();
            let first = offset >> shift;
            if len == b.page_size {
                b.received.set(first);
            } else {
                let pages = (len >> shift) + u64::from(len & (b.page_size - 1) != 0);
                b.received.assign_range(first, pages, true);
            }
        }
    }

    fn discard_range(&self, block: &RamBlockInfo, start: u64, len: u64) -> Result<()> {
        let b = self
            .block(block.id)
            .ok_or(Error::UnknownBlock(block.id.0))?;
        if start.checked_add(len).is_none_or(|end| end > b.len) {
            return Err(Error::InvalidArgument(format!(
                "discard of {len:#x} bytes at {start:#x} runs past the end of RAM block '{}' ({:#x} bytes)",
                b.idstr, b.len
            )));
        }
        // Checked before the bitmap is touched: a discard madvise refuses would otherwise
        // leave pages present but marked missing.
        if start % b.page_size != 0 || len % b.page_size != 0 {
            return Err(Error::InvalidArgument(format!(
                "discard of {len:#x} bytes at {start:#x} of RAM block '{}' is not aligned to its {:#x}-byte pages",
                b.idstr, b.page_size
            )));
        }
        b.received
            .assign_range(start / b.page_size, len / b.page_size, false);
        mem::discard(b.host + start as usize, len, b.fd, b.fd_offset + start).map_err(|e| {
            Error::os(
                format!("discarding {len:#x} bytes of RAM block '{}'", b.idstr),
                e,
            )
        })
    }

    fn request_page(&self, req: &PageRequest<'_>) -> std::result::Result<RequestOutcome, i32> {
        let block = self.find_block(req.block).ok_or(libc::EFAULT)?;
        let record = PostcopyPageRequest {
            offset: req.offset,
            length: req.len,
            haddr: req.haddr,
            block_index: block.index,
            tid: req.tid,
        };
        match &*self.requests.read() {
            RequestSink::None => Err(libc::ENOTCONN),
            RequestSink::Func(f) => f(&block, &record),
            RequestSink::Fd(fd) => write_record(*fd, &record),
        }
        .map(|()| RequestOutcome::Sent)
    }

    fn return_path_ok(&self) -> bool {
        self.return_path_ok.load(Ordering::Acquire)
    }

    fn send_discard(
        &self,
        ms: usize,
        name: &str,
        ranges: &[(u64, u64)],
    ) -> std::result::Result<(), i32> {
        match &*self.discards.read() {
            Some(f) => f(ms, name, ranges),
            None => Err(libc::ENOTCONN),
        }
    }

    fn vcpus(&self) -> Vec<VcpuInfo> {
        self.vcpus.lock().clone()
    }

    fn blocktime_enabled(&self) -> bool {
        self.blocktime.load(Ordering::Acquire)
    }

    fn preempt_enabled(&self) -> bool {
        self.preempt.load(Ordering::Acquire)
    }

    fn log(&self, level: LogLevel, msg: &str) {
        match &*self.log.read() {
            Some(f) => f(level, msg),
            None => crate::host::default_log(level, msg),
        }
    }

    fn set_error(&self, errp: ErrorSlot, msg: &str) -> bool {
        if errp.0 == 0 {
            return false;
        }
        let slot = errp.0 as *mut *mut StandaloneError;
        // SAFETY: the C layer hands us the caller's `Error **` (non-NULL, checked above),
        // which the standalone host's contract makes a pointer to a pointer-sized slot.
        unsafe {
            if !(*slot).is_null() {
                // QEMU's rule: never overwrite an error already set; keep the first.
                return true;
            }
            let message = CString::new(msg.replace('\0', " ")).unwrap_or_default();
            *slot = Box::into_raw(Box::new(StandaloneError { message }));
        }
        true
    }

    fn paused_statuses(&self) -> [u32; 2] {
        self.paused_statuses
    }

    fn preempt_connect(&self, ms: usize) -> PreemptConnect {
        match &self.preempt_hooks.read().connect {
            Some(f) => f(ms),
            None => PreemptConnect::Failed(libc::ENOTSUP),
        }
    }

    fn preempt_load(&self, mis: usize, file: usize) -> i32 {
        match &self.preempt_hooks.read().load {
            Some(f) => f(mis, file),
            None => -libc::ENOTSUP,
        }
    }

    fn preempt_shutdown(&self, mis: usize, file: usize) {
        if let Some(f) = &self.preempt_hooks.read().shutdown {
            f(mis, file)
        }
    }
}

fn write_record(fd: RawFd, record: &PostcopyPageRequest) -> std::result::Result<(), i32> {
    let size = std::mem::size_of::<PostcopyPageRequest>();
    loop {
        // SAFETY: writes `size` bytes from a live repr(C) value; fd validity is the kernel's check.
        let n = unsafe { libc::write(fd, (record as *const PostcopyPageRequest).cast(), size) };
        if n == size as isize {
            return Ok(());
        }
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if n < 0 && errno == libc::EINTR {
            continue;
        }
        return Err(if n < 0 { errno } else { libc::EIO });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_ranges_cross_word_boundaries() {
        let bm = AtomicBitmap::new(200);
        bm.assign_range(60, 70, true);
        assert!(!bm.test(59));
        assert!(bm.test(60) && bm.test(129));
        assert!(!bm.test(130));
        assert_eq!(bm.count_ones(), 70);
        bm.assign_range(64, 64, false);
        assert_eq!(bm.count_ones(), 6);
        bm.assign_range(190, 100, true);
        assert_eq!(bm.count_ones(), 16);
        assert!(!bm.test(500));
    }

    #[test]
    fn blocks_are_validated() {
        let host = StandaloneHost::new(0);
        assert!(host.add_block("a", 0x1000, 0x3000, 0x1000, -1, 0).is_ok());
        assert!(
            host.add_block("a", 0x10000, 0x1000, 0x1000, -1, 0).is_err(),
            "same name"
        );
        assert!(
            host.add_block("b", 0x2000, 0x1000, 0x1000, -1, 0).is_err(),
            "overlap"
        );
        assert!(
            host.add_block("c", 0x10001, 0x1000, 0x1000, -1, 0).is_err(),
            "misaligned"
        );
        assert!(
            host.add_block("d", 0x10000, 0x1800, 0x1000, -1, 0).is_err(),
            "partial page"
        );
        assert!(
            host.add_block("e", 0x10000, 0x1000, 0x1800, -1, 0).is_err(),
            "page size"
        );
        assert_eq!(host.ram_blocks().len(), 1);
    }
}
