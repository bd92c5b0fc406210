//! Blocktime entrypoints: mark_postcopy_blocktime_begin and the stats query.
use super::types::{MigrationIncomingStateRef, RamBlockRef};
use super::{existing_incoming, guard, incoming_for_block, log_err};
use crate::blocktime::LATENCY_BUCKETS;
use crate::error::Error;
use crate::host::BlockId;
use std::ffi::c_int;

/// Buckets of `PostcopyBlocktimeInfo.latency_histogram`.
pub const POSTCOPY_LATENCY_BUCKETS: usize = 24;
const _: () = assert!(POSTCOPY_LATENCY_BUCKETS == LATENCY_BUCKETS);

/// Records that thread `ptid` faulted at `addr` in `rb` and the page was requested: the
/// start of its blocktime (QEMU 10.1's request path calls this itself). Ignored when
/// blocktime is off, `ptid` is 0, or the page is already received. The library's own fault
/// thread does the same internally, so a hypervisor using it need not call this.
///
/// A `ptid` of 0 returns before any check. Otherwise the arguments are checked whether or
/// not blocktime is on.
///
/// Thread: any (QEMU: the fault thread). Errors (logged): NULL `rb`, no set-up context,
/// `rb` not one of the set-up context's blocks, `addr` outside `rb`.
#[no_mangle]
pub extern "C" fn mark_postcopy_blocktime_begin(addr: usize, ptid: u32, rb: *mut RamBlockRef) {
    guard("mark_postcopy_blocktime_begin", (), || {
        if ptid == 0 {
            return;
        }
        let result = if rb.is_null() {
            Err(Error::NullPointer("rb"))
        } else {
            let block = BlockId(rb as usize);
            incoming_for_block(block).and_then(|inc| inc.blocktime_begin(addr as u64, ptid, block))
        };
        if let Err(e) = result {
            log_err("mark_postcopy_blocktime_begin", &e);
        }
    })
}

/// System-wide blocktime figures (not part of QEMU's header). QMP units (32-bit
/// milliseconds, as `postcopy-blocktime`) and nanoseconds side by side.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PostcopyBlocktimeInfo {
    /// Time during which every vCPU was blocked at once, ms (QMP postcopy-blocktime).
    pub total_blocktime_ms: u32,
    /// vCPUs tracked (the length of the per-vCPU arrays the library can fill).
    pub vcpu_count: u32,
    /// The same total in ns.
    pub total_blocktime_ns: u64,
    /// Average latency over all resolved faults, ns.
    pub latency_avg_ns: u64,
    /// QEMU 10.1's postcopy-latency: summed vCPU blocktime over faults begun, ns.
    pub qmp_latency_ns: u64,
    /// Faults begun (vCPU and non-vCPU).
    pub faults: u64,
    /// Faults resolved by a placement.
    pub resolved_faults: u64,
    /// Faults by threads that are not vCPUs.
    pub non_vcpu_faults: u64,
    /// Their summed latency, ns (QMP postcopy-non-vcpu-latency is this over their count).
    pub non_vcpu_latency_total_ns: u64,
    /// Faults begun and not yet resolved.
    pub outstanding_faults: u64,
    /// The most faults one vCPU had outstanding at once.
    pub max_outstanding_per_vcpu: u64,
    /// Bucket i counts fault latencies in [2^i, 2^(i+1)) µs; bucket 0 also takes 0 µs, the
    /// last takes everything longer (QMP postcopy-latency-dist).
    pub latency_histogram: [u64; POSTCOPY_LATENCY_BUCKETS],
}

/// Reads the blocktime figures of `mis` (not part of QEMU's header): live while set up, the
/// final ones after cleanup until the next setup. `*info` is filled; each per-vCPU array
/// that is not NULL receives up to `capacity` entries indexed by vCPU index:
/// blocktime in ms (QMP postcopy-vcpu-blocktime) and ns, fault counts, and average latency
/// in ns over that vCPU's resolved faults (QEMU's postcopy-vcpu-latency divides by faults begun).
///
/// Thread: any. Returns the number of vCPUs tracked (may exceed `capacity`); -EINVAL for a
/// NULL `mis` or `info`; -ENOENT when `mis` has no context; -ENODATA when blocktime was
/// not enabled.
#[no_mangle]
pub extern "C" fn postcopy_blocktime_query(
    mis: *mut MigrationIncomingStateRef,
    info: *mut PostcopyBlocktimeInfo,
    vcpu_blocktime_ms: *mut u32,
    vcpu_blocktime_ns: *mut u64,
    vcpu_faults: *mut u64,
    vcpu_latency_ns: *mut u64,
    capacity: libc::size_t,
) -> c_int {
    guard("postcopy_blocktime_query", -libc::EFAULT, || {
        if mis.is_null() || info.is_null() {
            return -libc::EINVAL;
        }
        let Some(inc) = existing_incoming(mis as usize) else {
            return -libc::ENOENT;
        };
        let Some(stats) = inc.blocktime_stats() else {
            return -libc::ENODATA;
        };
        let out = PostcopyBlocktimeInfo {
            total_blocktime_ms: stats.total_blocktime_ms_u32(),
            vcpu_count: stats.vcpus.len() as u32,
            total_blocktime_ns: stats.total_blocktime_ns,
            latency_avg_ns: stats.latency_avg_ns,
            qmp_latency_ns: stats.qmp_latency_ns(),
            faults: stats.faults,
            resolved_faults: stats.resolved_faults,
            non_vcpu_faults: stats.non_vcpu_faults,
            non_vcpu_latency_total_ns: stats.non_vcpu_latency_total_ns,
            outstanding_faults: stats.outstanding_faults,
            max_outstanding_per_vcpu: stats.max_outstanding_per_vcpu,
            latency_histogram: stats.latency_histogram,
        };
        let ms = stats.vcpu_blocktime_ms_u32();
        // SAFETY: info is non-NULL and writable; each array is NULL or has room for
        // `capacity` entries (caller's contract), and we write at most that many.
        unsafe {
            info.write(out);
            for (i, v) in stats.vcpus.iter().enumerate().take(capacity) {
                if !vcpu_blocktime_ms.is_null() {
                    *vcpu_blocktime_ms.add(i) = ms[i];
                }
                if !vcpu_blocktime_ns.is_null() {
                    *vcpu_blocktime_ns.add(i) = v.blocktime_ns;
                }
                if !vcpu_faults.is_null() {
                    *vcpu_faults.add(i) = v.faults;
                }
                if !vcpu_latency_ns.is_null() {
                    *vcpu_latency_ns.add(i) = v.latency_avg_ns;
                }
            }
        }
        stats.vcpus.len() as c_int
    })
}
