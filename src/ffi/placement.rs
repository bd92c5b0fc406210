//! Placement entrypoints: postcopy_place_page, postcopy_place_page_zero, postcopy_place_pages.
use super::types::{MigrationIncomingStateRef, RamBlockRef};
use super::{guard, status, with_existing_incoming};
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
        let r = if mis.is_null() {
            Err(Error::NullPointer("mis"))
        } else if rb.is_null() {
            Err(Error::NullPointer("rb"))
        } else {
            // Called per page: the cached lookup, not the table's lock and hash.
            with_existing_incoming(mis as usize, |inc| match inc {
                Some(inc) => f(inc, BlockId(rb as usize)),
                None => Err(Error::NotSetUp),
            })
        };
        status(entry, r)
    })
}

/// Places one page of `rb` atomically at `host` from `from` (UFFDIO_COPY of the block's
/// page size), which wakes the threads faulting on it; then marks it received, drops it
/// from the requested set, ends its blocktime, and runs the shared-userfaultfd wakers.
/// `from` needs no alignment. A page already present (EEXIST) is woken and counts as placed.
///
/// Thread: the hypervisor's loading threads (QEMU: listen thread, preempt thread).
/// Returns 0, or a negative errno with the cause logged: NULL `mis`, `rb` or `from`
/// (-EINVAL), not set up (no context, before setup, after cleanup: -ENODEV), `rb` not one of
/// the blocks snapshotted at setup (a block added later included) or `host` outside it
/// (NULL included: -EFAULT), `host` not page aligned (-EINVAL), the ioctl's errno (-EFAULT
/// when `from` is unreadable), or a shared waker's status. Nothing outside `rb`'s range is
/// ever written.
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

/// Places `npages` contiguous pages of `rb` at `host` from `from` (`npages` times the
/// block's page size, contiguous too) with one UFFDIO_COPY for the whole run, which wakes
/// the threads faulting on any of them; then, for every page, what postcopy_place_page
/// does: marks it received, drops it from the requested set, ends its blocktime (one
/// clock read for the run), and runs the shared-userfaultfd wakers. A page already present
/// (EEXIST) is woken, counted as placed, and skipped; the rest of the run is still copied.
/// Not part of QEMU's header: for a loading thread that receives runs of contiguous pages
/// (one ioctl per run is cheaper per page than one per page). `npages` 0 places nothing
/// and returns 0 once the arguments are checked.
///
/// Thread: the hypervisor's loading threads (QEMU: listen thread, preempt thread).
/// Returns 0, or a negative errno with the cause logged: NULL `mis`, `rb` or `from`
/// (-EINVAL), not set up (-ENODEV), `rb` not one of the blocks snapshotted at setup or
/// `host` outside it (-EFAULT), a run that would pass the block's end (-EFAULT, nothing
/// placed), `host` not page aligned (-EINVAL), the ioctl's errno (-EFAULT when part of
/// `from` is unreadable: the pages before the failure are placed and accounted for, the
/// rest are not), or a shared waker's status. Nothing outside `rb`'s range is ever written.
#[no_mangle]
pub extern "C" fn postcopy_place_pages(
    mis: *mut MigrationIncomingStateRef,
    host: *mut c_void,
    from: *mut c_void,
    npages: u64,
    rb: *mut RamBlockRef,
) -> c_int {
    place("postcopy_place_pages", mis, rb, |inc, block| {
        inc.place_pages(block, host as u64, from as usize, npages)
    })
}
