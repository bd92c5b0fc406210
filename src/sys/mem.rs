//! Anonymous mappings, madvise, and the file-system checks postcopy makes on RAM backends.
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

/// An anonymous private read-write mapping, unmapped on drop.
#[derive(Debug)]
pub struct AnonMapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the raw pointer is only an
// address and carries no thread affinity.
unsafe impl Send for AnonMapping {}
// SAFETY: shared references only expose the address; writes go through the kernel.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases
        // no existing memory; the result is checked against MAP_FAILED.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AnonMapping {
            addr: NonNull::new(addr.cast()).expect("mmap never returns NULL on success"),
            len,
        })
    }

    pub fn addr(&self) -> usize {
        self.addr.as_ptr() as usize
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: addr/len describe a mapping this value created and still owns.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// madvise(2) over `[addr, addr + len)`.
pub fn madvise(addr: usize, len: u64, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: madvise validates the range itself; the advices used here (NOHUGEPAGE,
    // HUGEPAGE, DONTNEED, REMOVE) never create dangling Rust references because guest RAM
    // is only ever touched through raw addresses.
    super::cvt(unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) })
        .map(|_| ())
}

/// Drops the contents of `[addr, addr + len)` so the next access faults as missing.
/// Anonymous memory: MADV_DONTNEED. File-backed (shared memfd, tmpfs, hugetlbfs): punch a
/// hole in the file at `file_offset` so every mapping of it loses the page.
pub fn discard(addr: usize, len: u64, fd: RawFd, file_offset: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if fd >= 0 {
        // SAFETY: fallocate on a caller-provided fd touches only the file, not our memory.
        let rc = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                file_offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // Private file mappings cannot be punched through the file; fall back to the mapping.
        return madvise(addr, len, libc::MADV_REMOVE)
            .or_else(|_| madvise(addr, len, libc::MADV_DONTNEED));
    }
    madvise(addr, len, libc::MADV_DONTNEED)
}

/// The file-system magic number of the file behind `fd` (fstatfs `f_type`).
pub fn fs_magic(fd: RawFd) -> io::Result<i64> {
    // SAFETY: statfs is plain data; all-zero is a valid value for it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into the live struct we pass; fd validity is checked by the kernel.
    super::cvt(unsafe { libc::fstatfs(fd, &mut st) })?;
    Ok(st.f_type as i64)
}

pub const TMPFS_MAGIC: i64 = 0x0102_1994;
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// munlockall(2): userfaultfd registration fails on mlocked memory.
pub fn munlockall() -> io::Result<()> {
    // SAFETY: munlockall has no memory-safety preconditions.
    super::cvt(unsafe { libc::munlockall() }).map(|_| ())
}
