//! Shared-userfaultfd entrypoints (vhost-user): register, unregister, notify wake, wake,
//! request a page.
use super::types::{PostCopyFdRef, RamBlockRef};
use super::{fail, guard, incoming_for_block, log, shared_fd_and_block, status, SHARED_UFDS};
use crate::error::Error;
use crate::host::{BlockId, LogLevel};
use crate::shared_ufds::SharedUfd;
use crate::sys::uffd::UffdMsg;
use std::ffi::{c_int, CStr};
use std::os::fd::RawFd;
use std::sync::Arc;

/// The registrant's PostCopyFD, copied by value as QEMU copies it into its array. The
/// handler and waker receive a pointer to this copy.
struct CSharedUfd {
    pcfd: Box<std::cell::UnsafeCell<PostCopyFdRef>>,
    name: String,
}

// SAFETY: the copy holds plain data plus C function and data pointers that the registrant
// declares callable from the fault thread and the placing threads (QEMU's contract).
unsafe impl Send for CSharedUfd {}
// SAFETY: as above; the library never writes the copy after registration.
unsafe impl Sync for CSharedUfd {}

impl CSharedUfd {
    fn ptr(&self) -> *mut PostCopyFdRef {
        self.pcfd.get()
    }
}

impl SharedUfd for CSharedUfd {
    fn fd(&self) -> RawFd {
        // SAFETY: reading a plain field of our own copy.
        unsafe { (*self.ptr()).fd }
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn handle(&self, msg: &mut UffdMsg) -> i32 {
        // SAFETY: reading a plain field of our own copy.
        match unsafe { (*self.ptr()).handler } {
            // SAFETY: the registrant's handler, given its PostCopyFD copy and a live uffd_msg.
            Some(h) => unsafe { h(self.ptr(), (msg as *mut UffdMsg).cast()) },
            None => 0,
        }
    }

    fn wake(&self, block: BlockId, offset: u64) -> i32 {
        // SAFETY: reading a plain field of our own copy.
        match unsafe { (*self.ptr()).waker } {
            // SAFETY: the registrant's waker, given its PostCopyFD copy and a listed block.
            Some(w) => unsafe { w(self.ptr(), block.0 as *mut RamBlockRef, offset) },
            None => 0,
        }
    }
}

/// Registers a userfaultfd owned by another process over guest RAM. `*pcfd` is copied; the
/// fault thread polls `pcfd->fd` from now on (also when it is already running) and hands
/// each message to `pcfd->handler`; placements call `pcfd->waker`.
///
/// A NULL `handler` drops the fd's messages; a NULL `waker` is skipped. An fd that is not
/// open, or fails, is logged by the fault thread and no longer polled.
///
/// Thread: main thread. Errors (logged; nothing registered): NULL `pcfd`, a negative fd, an
/// fd already registered.
#[no_mangle]
pub extern "C" fn postcopy_register_shared_ufd(pcfd: *mut PostCopyFdRef) {
    guard("postcopy_register_shared_ufd", (), || {
        if pcfd.is_null() {
            return log(
                LogLevel::Error,
                "postcopy_register_shared_ufd: pcfd must not be NULL",
            );
        }
        // SAFETY: non-NULL; the caller passes a valid PostCopyFD, copied by value here.
        let copy = unsafe { std::ptr::read(pcfd) };
        if copy.fd < 0 {
            return log(
                LogLevel::Error,
                &format!("postcopy_register_shared_ufd: invalid fd {}", copy.fd),
            );
        }
        let name = if copy.idstr.is_null() {
            format!("fd {}", copy.fd)
        } else {
            // SAFETY: idstr is a NUL-terminated string (QEMU's contract for PostCopyFD).
            unsafe { CStr::from_ptr(copy.idstr) }
                .to_string_lossy()
                .into_owned()
        };
        let fd = copy.fd;
        if !SHARED_UFDS.register(Arc::new(CSharedUfd {
            pcfd: Box::new(std::cell::UnsafeCell::new(copy)),
            name,
        })) {
            log(
                LogLevel::Warning,
                &format!("postcopy_register_shared_ufd: fd {fd} is already registered; ignored"),
            );
        }
    })
}

/// Unregisters the shared userfaultfd with `pcfd->fd`; the fault thread stops polling it.
///
/// Thread: main thread. Errors (logged, harmless): NULL `pcfd`, an fd never registered.
#[no_mangle]
pub extern "C" fn postcopy_unregister_shared_ufd(pcfd: *mut PostCopyFdRef) {
    guard("postcopy_unregister_shared_ufd", (), || {
        if pcfd.is_null() {
            return log(
                LogLevel::Error,
                "postcopy_unregister_shared_ufd: pcfd must not be NULL",
            );
        }
        // SAFETY: non-NULL; reading the fd field of the caller's PostCopyFD.
        let fd = unsafe { (*pcfd).fd };
        if !SHARED_UFDS.unregister(fd) {
            log(
                LogLevel::Warning,
                &format!("postcopy_unregister_shared_ufd: fd {fd} was not registered; ignored"),
            );
        }
    })
}

/// Calls every registered waker for the page of `rb` at `offset`. All wakers run; the first
/// non-zero status is returned (QEMU stops at the first failure, leaving later clients
/// asleep).
///
/// Thread: the placing thread. Errors: NULL `rb` returns -EINVAL (logged).
#[no_mangle]
pub extern "C" fn postcopy_notify_shared_wake(rb: *mut RamBlockRef, offset: u64) -> c_int {
    guard("postcopy_notify_shared_wake", -libc::EFAULT, || {
        if rb.is_null() {
            return fail("postcopy_notify_shared_wake", Error::NullPointer("rb"));
        }
        SHARED_UFDS.notify_wake(BlockId(rb as usize), offset)
    })
}

/// Wakes the shared client's threads waiting on the page of `rb` at `client_addr` (in the
/// client's address space): UFFDIO_WAKE of one page at the page-aligned address.
///
/// Thread: any. Returns 0, or a negative errno (logged): NULL arguments (-EINVAL), no
/// set-up context and no host (-ENODEV), `rb` unknown (-EFAULT), the ioctl's errno (-EBADF
/// for an fd that is not open, -ENOTTY/-EINVAL for one that is not a userfaultfd).
#[no_mangle]
pub extern "C" fn postcopy_wake_shared(
    pcfd: *mut PostCopyFdRef,
    client_addr: u64,
    rb: *mut RamBlockRef,
) -> c_int {
    guard("postcopy_wake_shared", -libc::EFAULT, || {
        let result =
            shared_fd_and_block(pcfd, rb).and_then(|(fd, block)| match incoming_for_block(block) {
                Ok(inc) => inc.wake_shared(fd, client_addr, block),
                Err(_) => {
                    let host = super::require_host()?;
                    let ps = host
                        .ram_block(block)
                        .ok_or(Error::UnknownBlock(block.0))?
                        .page_size;
                    crate::sys::uffd::wake_fd(fd, client_addr & !(ps - 1), ps)
                        .map_err(|e| Error::os("UFFDIO_WAKE", e))
                }
            });
        status("postcopy_wake_shared", result)
    })
}

/// Called by a shared fault handler: the client faulted at `client_addr`, which is
/// `offset` bytes into `rb`. A page already received wakes the client at once; otherwise
/// the page is requested from the source (once, tracked by its guest-RAM address so
/// placement clears it) and the client is woken by its waker when it arrives.
///
/// Thread: the fault thread (inside a handler) or any. Returns 0, or a negative errno
/// (logged): NULL arguments (-EINVAL), not set up (-ENODEV), `rb` not one of the set-up
/// context's blocks (-EFAULT), `offset` past the block (-EINVAL), or the wake's errno for a
/// page already received.
#[no_mangle]
pub extern "C" fn postcopy_request_shared_page(
    pcfd: *mut PostCopyFdRef,
    rb: *mut RamBlockRef,
    client_addr: u64,
    offset: u64,
) -> c_int {
    guard("postcopy_request_shared_page", -libc::EFAULT, || {
        let result = shared_fd_and_block(pcfd, rb).and_then(|(fd, block)| {
            incoming_for_block(block)?.request_shared_page(fd, block, client_addr, offset)
        });
        status("postcopy_request_shared_page", result)
    })
}

/// Number of registered shared userfaultfds (not part of QEMU's header).
///
/// Thread: any.
#[no_mangle]
pub extern "C" fn postcopy_shared_ufd_count() -> c_int {
    guard("postcopy_shared_ufd_count", 0, || {
        SHARED_UFDS.len() as c_int
    })
}
