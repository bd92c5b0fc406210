//! Safe wrappers over each kernel call the library makes, in the manner of rust-vmm's
//! vmm-sys-util: one small type per kernel object, `// SAFETY:` on every unsafe line.
pub mod eventfd;
pub mod mem;
pub mod uffd;
pub mod valgrind;

use std::io;

/// The system page size (`sysconf(_SC_PAGESIZE)`).
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// The calling thread's kernel thread id.
pub fn gettid() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() as u32 }
}

pub(crate) fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
