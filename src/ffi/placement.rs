//! Placement entrypoints: postcopy_place_page, postcopy_place_page_zero.
use super::types::{MigrationIncomingStateRef, RamBlockRef};
use super::{existing_incoming, guard, status};
use crate::error::Error;
use crate::host::BlockId;
use std::ffi::{c_int, c_void};

fn place(
    entry: &'static str,
    mis: *mut MigrationIncomingStateRef,
    rb: *mut RamBlockRef,
    f: impl FnOnce(&crate::incoming::Incoming, BlockId) -> crate::Result<()>,
) -> c_int {
    guard(entry, -libc::EFAULT, || {
        let ctx = if mis.is_null() {
            Err(Error::NullPointer("mis"))
        } else if rb.is_null() {
            Err(Error::NullPointer("rb"))
        } else {
            existing_incoming(mis as usize).ok_or(Error::NotSetUp)
        };
        status(entry, ctx.and_then(|inc| f(&inc, BlockId(rb as usize))))
    })
}

/// Places one page of `rb` atomically at `host` from `from` (UFFDIO_COPY of the block's
/// page size), which wakes the threads faulting on it; then marks it received, drops it
/// from the requested set, ends its blocktime, and runs the shared-userfaultfd wakers.
/// `from` needs no alignment. A page already present (EEXIST) is woken and counts as placed.
///
/// Thread: the hypervisor's loading threads (QEMU: listen thread, preempt thread).
/// Returns 0, or a negative errno with the cause logged: NULL argument (-EINVAL), not set up
/// (-ENODEV), `rb` unknown or `host` outside it (-EFAULT), `host` not page aligned
/// (-EINVAL), the ioctl's errno, or a shared waker's status.
#[no_mangle]
pub extern "C" fn postcopy_place_page(
    mis: *mut MigrationIncomingStateRef,
    host: *mut c_void,
    from: *mut c_void,
    rb: *mut RamBlockRef,
) -> c_int {
    place("postcopy_place_page", mis, rb, |inc, block| {
        inc.place_page(block, host as u64, from as usize)
    })
}

/// Places a zero page of `rb` at `host`: UFFDIO_ZEROPAGE, or a copy of the library's zero
/// page where the block cannot take zero pages (hugetlbfs). Same bookkeeping and errors as
/// postcopy_place_page.
///
/// Thread: the hypervisor's loading threads, or the fault thread.
#[no_mangle]
pub extern "C" fn postcopy_place_page_zero(
    mis: *mut MigrationIncomingStateRef,
    host: *mut c_void,
    rb: *mut RamBlockRef,
) -> c_int {
    place("postcopy_place_page_zero", mis, rb, |inc, block| {
        inc.place_zero_page(block, host as u64)
    })
}
