//! Postcopy blocktime and fault-latency accounting (issue 4).
//!
//! Operators judge a postcopy migration by how long the guest's vCPUs were
//! stuck on missing pages. This module keeps that account the way QEMU 10.1
//! does (nanoseconds, several in-flight faults per vCPU, non-vCPU faults
//! counted for latency only, a 24-bucket latency histogram), with storage that
//! costs O(1) per fault and allocates nothing per fault once warm.
//!
//! [`Blocktime`] is deliberately not synchronized: the incoming context calls
//! [`Blocktime::begin`] and [`Blocktime::end`] under the same mutex that guards
//! its requested-page set (the point of QEMU's "push blocktime start/end into
//! page req mutex"), so a second lock or atomics would only add cost. When the
//! capability is off the caller holds `None` instead of a `Blocktime`.
//!
//! # Semantics (QEMU 10.1, and where this module departs from it)
//!
//! * **begin** (tid ≠ 0): the fault gets a timestamp. A vCPU fault bumps that
//!   vCPU's fault count and its outstanding count; the vCPU's first
//!   outstanding fault makes it "down" and records `last_begin`. A fault from
//!   any other thread is a non-vCPU fault: counted, its latency tracked, no
//!   blocktime.
//! * **end(page)**: every outstanding fault on the page is resolved, newest
//!   first (QEMU prepends to a per-address list and walks it from the head; the
//!   order matters only for the quirk below). Each resolution feeds the latency
//!   histogram and averages. A vCPU whose outstanding count drops to zero is
//!   released and **its blocktime grows by the latency of the fault whose
//!   resolution released it** — exactly QEMU 10.1's accumulation. Consequence
//!   kept on purpose (issue 4 asks for QEMU 10.1's per-vCPU figure): when a
//!   vCPU has overlapping faults on different pages, only the last one
//!   resolved is added, so with one vCPU its blocktime can be lower than the
//!   system total.
//! * **total blocktime**: if every vCPU was down and this `end` releases at
//!   least one, the total grows by `now - last_begin`, i.e. from the moment
//!   the last vCPU became blocked until the first one is released. "Every
//!   vCPU" is every distinct index in the list given to [`Blocktime::new`]
//!   (QEMU: `smp.cpus`), taken once at setup like QEMU's tid → vCPU map.
//! * Histogram: bucket `i` counts latencies in `[2^i, 2^(i+1))` µs; bucket 0
//!   also takes 0 µs; bucket 23 takes everything from 2^23 µs up (QEMU's
//!   comment calls the last bucket "[2^24,2^25)", its code does what we do).
//!
//! Departures from QEMU 10.1, following issue 4:
//! * QEMU asserts that one vCPU never has more than 255 outstanding faults (a
//!   `u8` counter). Here the counter is a `u32`, and the high-water mark is
//!   reported as [`BlocktimeStats::max_outstanding_per_vcpu`] instead of
//!   crashing the destination.
//! * QEMU asserts the page is not yet received inside begin; here the caller
//!   checks the received bitmap under the same lock and simply does not call
//!   `begin` ("a fault on an already received page is ignored").
//! * QEMU asserts that time never goes backwards; here a negative interval
//!   counts as 0.
//! * Averages: [`BlocktimeStats::latency_avg_ns`] and
//!   [`VcpuStats::latency_avg_ns`] are true averages of per-fault latency over
//!   resolved faults. QEMU 10.1's `postcopy-latency` and
//!   `postcopy-vcpu-latency` instead divide the blocktime sum by the number of
//!   faults begun (resolved or not), which under-reports when a vCPU has
//!   overlapping faults; those QMP-compatible figures are available from
//!   [`BlocktimeStats::qmp_latency_ns`] and
//!   [`BlocktimeStats::qmp_vcpu_latency_ns`].
//! * QMP's 32-bit millisecond fields saturate at `u32::MAX` here; QEMU casts
//!   and so wraps after ~49.7 days.

use std::sync::Arc;

/// Monotonic nanoseconds; replaceable in tests.
pub trait Clock: Send + Sync {
    /// Current time in nanoseconds from an arbitrary, fixed origin.
    fn now_ns(&self) -> u64;
}

/// The production clock: `CLOCK_MONOTONIC` (what QEMU's `QEMU_CLOCK_REALTIME`
/// reads on Linux), so wall-clock steps do not distort latencies.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    #[inline]
    fn now_ns(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable `timespec` owned by this frame and
        // outlives the call; CLOCK_MONOTONIC is always available on Linux, so
        // the call cannot fail with a valid pointer.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        debug_assert_eq!(rc, 0);
        (ts.tv_sec as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(ts.tv_nsec as u64)
    }
}

/// One vCPU as the host describes it at setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuInfo {
    /// QEMU's `cpu_index`: the position in the per-vCPU statistics.
    pub index: u32,
    /// Linux thread id of the vCPU thread, as userfaultfd reports it in
    /// `feat.ptid`.
    pub tid: u32,
}

/// vCPU indices at or above this are ignored by [`Blocktime::new`].
pub const MAX_VCPU_INDEX: u32 = 1 << 20;

/// Number of latency histogram buckets (QEMU's `BLOCKTIME_LATENCY_BUCKET_N`).
pub const LATENCY_BUCKETS: usize = 24;

/// Per-vCPU figures of a [`BlocktimeStats`] snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// Blocktime as QEMU 10.1 accumulates it (see the module docs).
    pub blocktime_ns: u64,
    /// Faults begun by this vCPU.
    pub faults: u64,
    /// Average latency of this vCPU's resolved faults (0 if none).
    pub latency_avg_ns: u64,
}

/// A snapshot of the blocktime account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlocktimeStats {
    /// Time during which all vCPUs were blocked at once.
    pub total_blocktime_ns: u64,
    /// Indexed by vCPU index.
    pub vcpus: Vec<VcpuStats>,
    /// Average over all resolved faults (vCPU and non-vCPU).
    pub latency_avg_ns: u64,
    /// All tracked faults begun (vCPU and non-vCPU).
    pub faults: u64,
    /// Faults begun and then resolved by a page placement.
    pub resolved_faults: u64,
    /// Faults begun by threads that are not vCPUs.
    pub non_vcpu_faults: u64,
    /// Summed latency of resolved non-vCPU faults.
    pub non_vcpu_latency_total_ns: u64,
    /// Bucket i counts latencies in [2^i, 2^(i+1)) microseconds; bucket 0 also
    /// takes 0 µs; the last bucket takes everything longer.
    pub latency_histogram: [u64; LATENCY_BUCKETS],
    /// Faults begun but not yet ended.
    pub outstanding_faults: u64,
    /// High-water mark of outstanding faults on one vCPU, so "more than 255
    /// outstanding on one vCPU" is reported (QEMU asserts on a u8) instead of
    /// crashing.
    pub max_outstanding_per_vcpu: u64,
}

const NS_PER_MS: u64 = 1_000_000;

fn ns_to_ms_u32(ns: u64) -> u32 {
    u32::try_from(ns / NS_PER_MS).unwrap_or(u32::MAX)
}

impl BlocktimeStats {
    /// QMP `postcopy-blocktime`: milliseconds, 32-bit, saturating.
    pub fn total_blocktime_ms_u32(&self) -> u32 {
        ns_to_ms_u32(self.total_blocktime_ns)
    }

    /// QMP `postcopy-vcpu-blocktime`: milliseconds, 32-bit, saturating.
    pub fn vcpu_blocktime_ms_u32(&self) -> Vec<u32> {
        self.vcpus
            .iter()
            .map(|v| ns_to_ms_u32(v.blocktime_ns))
            .collect()
    }

    /// QEMU 10.1's `postcopy-vcpu-latency`: blocktime divided by faults begun,
    /// per vCPU. Kept for QMP compatibility; [`VcpuStats::latency_avg_ns`] is
    /// the true average.
    pub fn qmp_vcpu_latency_ns(&self) -> Vec<u64> {
        self.vcpus
            .iter()
            .map(|v| v.blocktime_ns.checked_div(v.faults).unwrap_or(0))
            .collect()
    }

    /// QEMU 10.1's `postcopy-latency`: (sum of vCPU blocktime + non-vCPU
    /// latency) divided by all faults begun. Kept for QMP compatibility;
    /// [`BlocktimeStats::latency_avg_ns`] is the true average.
    pub fn qmp_latency_ns(&self) -> u64 {
        let sum = self
            .vcpus
            .iter()
            .fold(self.non_vcpu_latency_total_ns, |acc, v| {
                acc.wrapping_add(v.blocktime_ns)
            });
        sum.checked_div(self.faults).unwrap_or(0)
    }

    /// QEMU 10.1's `postcopy-non-vcpu-latency`: non-vCPU latency divided by
    /// non-vCPU faults begun.
    pub fn non_vcpu_latency_avg_ns(&self) -> u64 {
        self.non_vcpu_latency_total_ns
            .checked_div(self.non_vcpu_faults)
            .unwrap_or(0)
    }
}

/// End of a list, no free entry, or "not a vCPU" (a non-vCPU fault).
const NIL: u32 = u32::MAX;

/// Fibonacci hashing: multiplying spreads page-aligned addresses and
/// consecutive tids over the high bits, which we keep.
const FIB: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn fib_hash(key: u64, shift: u32) -> usize {
    (key.wrapping_mul(FIB) >> shift) as usize
}

/// tid → vCPU index, built once in [`Blocktime::new`]: an open-addressing
/// table at most half full, so a lookup is one or two probes whatever the
/// vCPU count (QEMU 10.0 scanned every vCPU per fault).
struct TidMap {
    /// `(tid, index)`; tid 0 marks an empty slot (tid 0 is never looked up).
    slots: Box<[(u32, u32)]>,
    shift: u32,
}

impl TidMap {
    fn new(vcpus: &[VcpuInfo]) -> Self {
        let cap = (vcpus.len() * 2).next_power_of_two().max(8);
        let mut map = TidMap {
            slots: vec![(0, 0); cap].into_boxed_slice(),
            shift: 64 - cap.trailing_zeros(),
        };
        for v in vcpus {
            if v.tid != 0 {
                map.insert(v.tid, v.index);
            }
        }
        map
    }

    /// First registration of a tid wins; a repeated tid is ignored.
    fn insert(&mut self, tid: u32, index: u32) {
        let mask = self.slots.len() - 1;
        let mut i = fib_hash(u64::from(tid), self.shift);
        loop {
            let slot = &mut self.slots[i];
            if slot.0 == tid {
                return;
            }
            if slot.0 == 0 {
                *slot = (tid, index);
                return;
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    fn get(&self, tid: u32) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = fib_hash(u64::from(tid), self.shift);
        loop {
            let (k, v) = self.slots[i];
            if k == tid {
                return Some(v);
            }
            if k == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }
}

/// Slot marker for "empty" in [`PageSlot::vcpu`]; vCPU indices stay below it.
const EMPTY: u32 = NIL - 1;

/// An extra outstanding fault on a page that already has one, pooled.
#[derive(Clone, Copy)]
struct FaultEntry {
    start_ns: u64,
    /// vCPU index, or [`NIL`] for a non-vCPU fault.
    vcpu: u32,
    /// Next (older) extra entry on the same page, or the next free entry.
    next: u32,
}

/// A page-table slot. Almost every page has exactly one waiter, so the
/// oldest fault lives in the slot itself and only further faults on the same
/// page touch the pool.
#[derive(Clone, Copy)]
struct PageSlot {
    addr: u64,
    /// The page's oldest outstanding fault.
    start_ns: u64,
    /// vCPU index, [`NIL`] for a non-vCPU fault, [`EMPTY`] for a free slot
    /// (so page address 0 needs no special case).
    vcpu: u32,
    /// Newest extra fault on this page (list in the pool), or [`NIL`].
    more: u32,
}

const EMPTY_SLOT: PageSlot = PageSlot {
    addr: 0,
    start_ns: 0,
    vcpu: EMPTY,
    more: NIL,
};

/// Outstanding faults keyed by page address: a linear-probing table (kept at
/// most half full, backward-shift deletion so no tombstones accumulate) whose
/// slots hold a page's first fault, over a pool with a free list for the
/// rarer extra faults on the same page. Storage only grows when a new
/// high-water mark of outstanding faults is reached; in steady state begin
/// and end allocate nothing.
struct PendingFaults {
    slots: Vec<PageSlot>,
    shift: u32,
    pages: usize,
    entries: Vec<FaultEntry>,
    free: u32,
}

impl PendingFaults {
    fn with_capacity(pages: usize) -> Self {
        let cap = (pages * 2).next_power_of_two().max(16);
        PendingFaults {
            slots: vec![EMPTY_SLOT; cap],
            shift: 64 - cap.trailing_zeros(),
            pages: 0,
            entries: Vec::new(),
            free: NIL,
        }
    }

    #[inline]
    fn home(&self, addr: u64) -> usize {
        // Rotate the always-zero offset bits of a 4 KiB page out of the way so
        // consecutive pages keep the golden-ratio spread (`addr * K` alone
        // steps by a fraction near 1/2 and clusters).
        fib_hash(addr.rotate_right(12), self.shift)
    }

    /// Slot holding `addr`, or `Err(empty slot where it would go)`.
    #[inline]
    fn probe(&self, addr: u64) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(addr);
        loop {
            let s = &self.slots[i];
            if s.vcpu == EMPTY {
                return Err(i);
            }
            if s.addr == addr {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// Takes a pool entry, growing the pool only past its high-water mark.
    #[inline]
    fn alloc(&mut self, e: FaultEntry) -> u32 {
        if self.free == NIL {
            let i = self.entries.len();
            assert!(i < EMPTY as usize, "too many outstanding postcopy faults");
            self.entries.push(e);
            i as u32
        } else {
            let i = self.free;
            self.free = self.entries[i as usize].next;
            self.entries[i as usize] = e;
            i
        }
    }

    #[inline]
    fn release(&mut self, i: u32) {
        self.entries[i as usize].next = self.free;
        self.free = i;
    }

    /// Records a fault on `addr`; extra faults on a page are prepended, so a
    /// page's faults are later resolved newest first, in QEMU's order.
    /// `found` is `self.probe(addr)`, done by the caller ahead of time.
    #[inline]
    fn push(&mut self, found: Result<usize, usize>, addr: u64, vcpu: u32, start_ns: u64) {
        match found {
            Err(i) if (self.pages + 1) * 2 <= self.slots.len() => {
                self.slots[i] = PageSlot {
                    addr,
                    start_ns,
                    vcpu,
                    more: NIL,
                };
                self.pages += 1;
            }
            found => self.push_slow(found, addr, vcpu, start_ns),
        }
    }

    /// The rare cases of `push`, kept out of line so the common path stays
    /// short: a further fault on a page, or a table that must grow first.
    #[cold]
    #[inline(never)]
    fn push_slow(&mut self, found: Result<usize, usize>, addr: u64, vcpu: u32, start_ns: u64) {
        if let Ok(i) = found {
            let next = self.slots[i].more;
            self.slots[i].more = self.alloc(FaultEntry {
                start_ns,
                vcpu,
                next,
            });
            return;
        }
        self.grow();
        let i = self.probe(addr).unwrap_err();
        self.slots[i] = PageSlot {
            addr,
            start_ns,
            vcpu,
            more: NIL,
        };
        self.pages += 1;
    }

    /// Removes `addr` from the table and returns its slot; the caller walks
    /// and releases `more`.
    #[inline]
    fn take(&mut self, addr: u64) -> Option<PageSlot> {
        let i = self.probe(addr).ok()?;
        let slot = self.slots[i];
        self.remove_slot(i);
        Some(slot)
    }

    /// Backward-shift deletion: pull later members of the probe run into the
    /// hole so lookups never need tombstones.
    #[inline]
    fn remove_slot(&mut self, mut hole: usize) {
        let mask = self.slots.len() - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s.vcpu == EMPTY {
                break;
            }
            let k = self.home(s.addr);
            // `s` may move back into the hole unless its home lies cyclically
            // in (hole, j].
            let stays = if hole <= j {
                hole < k && k <= j
            } else {
                hole < k || k <= j
            };
            if !stays {
                self.slots[hole] = s;
                hole = j;
            }
        }
        // Only the marker matters in a free slot.
        self.slots[hole].vcpu = EMPTY;
        self.pages -= 1;
    }

    #[cold]
    fn grow(&mut self) {
        let cap = self.slots.len() * 2;
        let old = std::mem::replace(&mut self.slots, vec![EMPTY_SLOT; cap]);
        self.shift = 64 - cap.trailing_zeros();
        for s in old.into_iter().filter(|s| s.vcpu != EMPTY) {
            let i = self.probe(s.addr).unwrap_err();
            self.slots[i] = s;
        }
    }
}

/// Per-vCPU running account; one cache line touched per fault.
#[derive(Clone, Copy, Default)]
struct VcpuState {
    blocktime_ns: u64,
    faults: u64,
    latency_total_ns: u64,
    /// Outstanding faults (so resolved = faults - current); nonzero means
    /// the vCPU is "down".
    current: u32,
}

/// The blocktime context of one incoming migration (see the module docs).
///
/// Not internally synchronized: the caller serializes all calls under the
/// incoming context's mutex, the same one that guards the requested-page set.
pub struct Blocktime {
    clock: Arc<dyn Clock>,
    tids: TidMap,
    vcpus: Vec<VcpuState>,
    /// Distinct vCPU indices: "all vCPUs blocked" means this many are down.
    vcpus_registered: u32,
    vcpus_down: u32,
    /// When the most recent vCPU went from running to blocked.
    last_begin_ns: u64,
    total_blocktime_ns: u64,
    pending: PendingFaults,
    faults: u64,
    resolved: u64,
    latency_total_ns: u64,
    non_vcpu_faults: u64,
    non_vcpu_latency_total_ns: u64,
    histogram: [u64; LATENCY_BUCKETS],
    max_outstanding_per_vcpu: u32,
}

/// Histogram bucket for a latency: ⌊log2 µs⌋, 0 µs in bucket 0, capped.
/// Branch-free: `| 1` maps 0 µs to bucket 0 and changes no other ⌊log2⌋.
#[inline]
fn bucket(latency_ns: u64) -> usize {
    let us = latency_ns / 1_000;
    ((us | 1).ilog2() as usize).min(LATENCY_BUCKETS - 1)
}

impl Blocktime {
    /// Builds the context from the host's vCPU list (taken at LISTEN, when the
    /// topology is frozen, as QEMU 10.1 does).
    ///
    /// Statistics are sized by the highest `index` + 1; indices are expected
    /// to be dense (`cpu_index` 0..n). A vCPU with tid 0 (not started) is
    /// still counted for "all vCPUs blocked" but can never fault. An entry
    /// with an index of [`MAX_VCPU_INDEX`] or more is ignored (no hypervisor
    /// has that many vCPUs; it would only make the arrays huge).
    pub fn new(vcpus: &[VcpuInfo], clock: Arc<dyn Clock>) -> Self {
        let vcpus: Vec<VcpuInfo> = vcpus
            .iter()
            .copied()
            .filter(|v| v.index < MAX_VCPU_INDEX)
            .collect();
        let slots = vcpus
            .iter()
            .map(|v| v.index as usize + 1)
            .max()
            .unwrap_or(0);
        let mut seen = vec![false; slots];
        for v in &vcpus {
            seen[v.index as usize] = true;
        }
        let registered = seen.iter().filter(|&&s| s).count() as u32;
        Blocktime {
            clock,
            tids: TidMap::new(&vcpus),
            vcpus: vec![VcpuState::default(); slots],
            vcpus_registered: registered,
            vcpus_down: 0,
            last_begin_ns: 0,
            total_blocktime_ns: 0,
            // Room for 64 faulting pages; past that the table grows to the
            // high-water mark of outstanding pages (a few times at most, not
            // per fault). Starting small keeps it in cache.
            pending: PendingFaults::with_capacity(64),
            faults: 0,
            resolved: 0,
            latency_total_ns: 0,
            non_vcpu_faults: 0,
            non_vcpu_latency_total_ns: 0,
            histogram: [0; LATENCY_BUCKETS],
            max_outstanding_per_vcpu: 0,
        }
    }

    /// A fault began on the page at page-aligned host address `page_addr` by
    /// thread `tid`.
    ///
    /// tid == 0 is ignored (unknown thread, e.g. shared/vhost-user faults). A
    /// tid that is not a vCPU is a non-vCPU fault: counted and latency
    /// tracked, no vCPU blocktime. The caller guarantees the page is not yet
    /// received (it checks the received bitmap under the same lock).
    #[inline]
    pub fn begin(&mut self, page_addr: u64, tid: u32) {
        if tid == 0 {
            return;
        }
        // Look-ups first: their loads then overlap with the clock read.
        let cpu = self.tids.get(tid);
        let found = self.pending.probe(page_addr);
        let now = self.clock.now_ns();
        self.record(found, page_addr, cpu, now);
    }

    /// [`Blocktime::begin`] with a timestamp the caller already read from
    /// [`Blocktime::now_ns`], e.g. one read for a whole batch of faults taken
    /// from the userfaultfd at once; the clock read is most of a pair's cost.
    #[inline]
    pub fn begin_at(&mut self, page_addr: u64, tid: u32, now_ns: u64) {
        if tid == 0 {
            return;
        }
        let cpu = self.tids.get(tid);
        let found = self.pending.probe(page_addr);
        self.record(found, page_addr, cpu, now_ns);
    }

    /// Accounts a fault begun at `now`; `found` is the page's probe result.
    #[inline(always)]
    fn record(&mut self, found: Result<usize, usize>, page_addr: u64, cpu: Option<u32>, now: u64) {
        self.faults += 1;
        let vcpu = match cpu {
            Some(cpu) => {
                let v = &mut self.vcpus[cpu as usize];
                v.faults += 1;
                v.current += 1;
                if v.current == 1 {
                    self.vcpus_down += 1;
                    self.last_begin_ns = now;
                } else if v.current > self.max_outstanding_per_vcpu {
                    // The mark is raised only past 1 (the common case skips
                    // it); stats() reports at least 1 once a vCPU faulted.
                    self.max_outstanding_per_vcpu = v.current;
                }
                cpu
            }
            None => {
                self.non_vcpu_faults += 1;
                NIL
            }
        };
        self.pending.push(found, page_addr, vcpu, now);
    }

    /// The page at page-aligned `page_addr` was placed: resolves every
    /// outstanding fault on it (several vCPUs may wait on one page; one vCPU
    /// may have several outstanding faults on different pages). A page with
    /// no outstanding fault is a no-op and does not read the clock.
    #[inline]
    pub fn end(&mut self, page_addr: u64) {
        let Some(slot) = self.pending.take(page_addr) else {
            return;
        };
        let now = self.clock.now_ns();
        self.settle(slot, now);
    }

    /// [`Blocktime::end`] with a timestamp the caller already read from
    /// [`Blocktime::now_ns`] (see [`Blocktime::begin_at`]). A time earlier
    /// than a fault's begin counts as zero latency.
    #[inline]
    pub fn end_at(&mut self, page_addr: u64, now_ns: u64) {
        if let Some(slot) = self.pending.take(page_addr) {
            self.settle(slot, now_ns);
        }
    }

    /// The context's clock, for [`Blocktime::begin_at`] and
    /// [`Blocktime::end_at`].
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Resolves every fault of a page just taken out of the table.
    #[inline(always)]
    fn settle(&mut self, slot: PageSlot, now: u64) {
        let mut released = 0u32;
        if slot.more != NIL {
            // Extra faults first (newest to oldest), then the page's oldest.
            released = self.resolve_more(slot.more, now);
        }
        released += self.resolve(slot.vcpu, slot.start_ns, now);
        if released > 0 && self.vcpus_down == self.vcpus_registered {
            self.total_blocktime_ns = self
                .total_blocktime_ns
                .wrapping_add(now.saturating_sub(self.last_begin_ns));
        }
        self.vcpus_down -= released;
    }

    /// Resolves and frees a page's extra faults (rare: out of line).
    #[cold]
    #[inline(never)]
    fn resolve_more(&mut self, mut e: u32, now: u64) -> u32 {
        let mut released = 0;
        while e != NIL {
            let entry = self.pending.entries[e as usize];
            released += self.resolve(entry.vcpu, entry.start_ns, now);
            self.pending.release(e);
            e = entry.next;
        }
        released
    }

    /// Accounts one resolved fault; returns 1 if it released its vCPU.
    #[inline(always)]
    fn resolve(&mut self, vcpu: u32, start_ns: u64, now: u64) -> u32 {
        let latency = now.saturating_sub(start_ns);
        self.histogram[bucket(latency)] += 1;
        self.latency_total_ns = self.latency_total_ns.wrapping_add(latency);
        self.resolved += 1;
        if vcpu == NIL {
            self.non_vcpu_latency_total_ns = self.non_vcpu_latency_total_ns.wrapping_add(latency);
            return 0;
        }
        let v = &mut self.vcpus[vcpu as usize];
        v.latency_total_ns = v.latency_total_ns.wrapping_add(latency);
        v.current -= 1;
        if v.current == 0 {
            // QEMU 10.1: the releasing fault's latency is the blocktime.
            v.blocktime_ns = v.blocktime_ns.wrapping_add(latency);
            1
        } else {
            0
        }
    }

    /// A snapshot of the account (allocates; meant for queries, not the fault
    /// path).
    pub fn stats(&self) -> BlocktimeStats {
        BlocktimeStats {
            total_blocktime_ns: self.total_blocktime_ns,
            vcpus: self
                .vcpus
                .iter()
                .map(|v| VcpuStats {
                    blocktime_ns: v.blocktime_ns,
                    faults: v.faults,
                    latency_avg_ns: v
                        .latency_total_ns
                        .checked_div(v.faults - u64::from(v.current))
                        .unwrap_or(0),
                })
                .collect(),
            latency_avg_ns: self
                .latency_total_ns
                .checked_div(self.resolved)
                .unwrap_or(0),
            faults: self.faults,
            resolved_faults: self.resolved,
            non_vcpu_faults: self.non_vcpu_faults,
            non_vcpu_latency_total_ns: self.non_vcpu_latency_total_ns,
            latency_histogram: self.histogram,
            outstanding_faults: self.faults - self.resolved,
            max_outstanding_per_vcpu: if self.faults > self.non_vcpu_faults {
                u64::from(self.max_outstanding_per_vcpu.max(1))
            } else {
                0
            },
        }
    }

    /// Length of [`BlocktimeStats::vcpus`] (highest vCPU index + 1).
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Faults begun but not yet ended (cheap; no snapshot).
    pub fn outstanding_faults(&self) -> u64 {
        self.faults - self.resolved
    }
}

/// Debug output is a summary: a context may sit in a `#[derive(Debug)]`
/// struct, and its tables are not worth printing.
impl std::fmt::Debug for Blocktime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocktime")
            .field("vcpus", &self.vcpus.len())
            .field("faults", &self.faults)
            .field("outstanding_faults", &self.outstanding_faults())
            .field("total_blocktime_ns", &self.total_blocktime_ns)
            .finish_non_exhaustive()
    }
}

/// Benchmark (not a test): nanoseconds per `begin` + `end` pair with the real
/// [`MonotonicClock`], `vcpus` vCPUs taking turns, and `outstanding` faults in
/// flight (each pair begins a fault on a new page and ends the one begun
/// `outstanding - 1` pairs earlier).
pub fn bench_pairs(vcpus: usize, outstanding: usize, iters: u64) -> f64 {
    bench_pairs_with(Arc::new(MonotonicClock), vcpus, outstanding, iters)
}

/// [`bench_pairs`] with any clock, e.g. a constant one to separate the
/// bookkeeping from the two clock reads.
pub fn bench_pairs_with(
    clock: Arc<dyn Clock>,
    vcpus: usize,
    outstanding: usize,
    iters: u64,
) -> f64 {
    use std::hint::black_box;
    let outstanding = outstanding.max(1) as u64;
    assert!(outstanding < BENCH_RING);
    let (mut bt, mut tids) = bench_context(clock, vcpus);
    let lag = outstanding - 1;
    for i in 0..lag {
        bt.begin(bench_page(i), tids.next_tid());
    }
    let mut run = |bt: &mut Blocktime, from: u64, n: u64| {
        for i in from..from + n {
            bt.begin(black_box(bench_page(i + lag)), tids.next_tid());
            bt.end(black_box(bench_page(i)));
        }
    };
    let warm = iters.min(100_000);
    run(&mut bt, 0, warm);
    let t = thread_cpu_ns();
    run(&mut bt, warm, iters);
    let ns = (thread_cpu_ns() - t) as f64 / iters.max(1) as f64;
    black_box(bt.stats());
    ns
}

/// Benchmark (not a test): nanoseconds per page on which two vCPUs fault
/// (`begin` + `begin` + one `end`), with `vcpus` vCPUs taking turns.
pub fn bench_shared_page(vcpus: usize, iters: u64) -> f64 {
    use std::hint::black_box;
    let (mut bt, mut tids) = bench_context(Arc::new(MonotonicClock), vcpus.max(2));
    let mut run = |bt: &mut Blocktime, from: u64, n: u64| {
        for i in from..from + n {
            bt.begin(black_box(bench_page(i)), tids.next_tid());
            bt.begin(black_box(bench_page(i)), tids.next_tid());
            bt.end(black_box(bench_page(i)));
        }
    };
    let warm = iters.min(100_000);
    run(&mut bt, 0, warm);
    let t = thread_cpu_ns();
    run(&mut bt, warm, iters);
    let ns = (thread_cpu_ns() - t) as f64 / iters.max(1) as f64;
    black_box(bt.stats());
    ns
}

/// Benchmark (not a test): nanoseconds per begin + end site when blocktime is
/// disabled, i.e. the caller holds `None::<Blocktime>`.
pub fn bench_disabled(iters: u64) -> f64 {
    use std::hint::black_box;
    let mut ctx: Option<Blocktime> = None;
    let t = thread_cpu_ns();
    for i in 0..iters {
        if let Some(bt) = black_box(&mut ctx).as_mut() {
            bt.begin(bench_page(i), 1);
        }
        if let Some(bt) = black_box(&mut ctx).as_mut() {
            bt.end(bench_page(i));
        }
    }
    (thread_cpu_ns() - t) as f64 / iters.max(1) as f64
}

/// Benchmark (not a test): nanoseconds per [`MonotonicClock::now_ns`] call, the
/// floor under every begin and every end.
pub fn bench_clock(iters: u64) -> f64 {
    use std::hint::black_box;
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock);
    let t = thread_cpu_ns();
    let mut acc = 0u64;
    for _ in 0..iters {
        acc = acc.wrapping_add(black_box(&clock).now_ns());
    }
    black_box(acc);
    (thread_cpu_ns() - t) as f64 / iters.max(1) as f64
}

/// CPU time of the calling thread: benchmarks time with it so that being
/// preempted on a shared machine does not count as cost.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec` owned by this frame;
    // CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Distinct page addresses the benchmarks cycle through.
const BENCH_RING: u64 = 1 << 16;

fn bench_page(i: u64) -> u64 {
    0x7f00_0000_0000 + (i % BENCH_RING) * 4096
}

/// Round-robin vCPU tids without a division per step, so the harness does
/// not dominate what it measures.
struct BenchTids {
    next: u32,
    n: u32,
}

impl BenchTids {
    const TID0: u32 = 10_000;

    fn next_tid(&mut self) -> u32 {
        let t = Self::TID0 + self.next;
        self.next += 1;
        if self.next == self.n {
            self.next = 0;
        }
        t
    }
}

/// A context with `n` vCPUs (tids 10000..) and a round-robin tid picker.
fn bench_context(clock: Arc<dyn Clock>, n: usize) -> (Blocktime, BenchTids) {
    let n = n.max(1) as u32;
    let infos: Vec<VcpuInfo> = (0..n)
        .map(|i| VcpuInfo {
            index: i,
            tid: BenchTids::TID0 + i,
        })
        .collect();
    let bt = Blocktime::new(&infos, clock);
    (bt, BenchTids { next: 0, n })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;
    const PAGE: u64 = 4096;
    const A: u64 = 0x10_0000;
    const B: u64 = 0x20_0000;
    const C: u64 = 0x30_0000;
    const D: u64 = 0x40_0000;

    /// A clock the test sets by hand; it also counts reads so tests can check
    /// that the clock is read once per call and not at all on no-ops.
    #[derive(Default)]
    struct FakeClock {
        now: AtomicU64,
        reads: AtomicU64,
    }

    impl FakeClock {
        fn set(&self, ns: u64) {
            self.now.store(ns, Relaxed);
        }
        fn reads(&self) -> u64 {
            self.reads.load(Relaxed)
        }
    }

    impl Clock for FakeClock {
        fn now_ns(&self) -> u64 {
            self.reads.fetch_add(1, Relaxed);
            self.now.load(Relaxed)
        }
    }

    /// vCPU i has tid 100 + i.
    fn tid(i: u32) -> u32 {
        100 + i
    }

    fn setup(n: u32) -> (Arc<FakeClock>, Blocktime) {
        let clock = Arc::new(FakeClock::default());
        let infos: Vec<VcpuInfo> = (0..n)
            .map(|i| VcpuInfo {
                index: i,
                tid: tid(i),
            })
            .collect();
        let bt = Blocktime::new(&infos, clock.clone());
        (clock, bt)
    }

    fn hist(pairs: &[(usize, u64)]) -> [u64; LATENCY_BUCKETS] {
        let mut h = [0; LATENCY_BUCKETS];
        for &(i, n) in pairs {
            h[i] = n;
        }
        h
    }

    fn vs(blocktime_ns: u64, faults: u64, latency_avg_ns: u64) -> VcpuStats {
        VcpuStats {
            blocktime_ns,
            faults,
            latency_avg_ns,
        }
    }

    #[test]
    fn blocktime_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Blocktime>();
        assert_send_sync::<MonotonicClock>();
        let (_, bt) = setup(3);
        assert_eq!(
            format!("{bt:?}"),
            "Blocktime { vcpus: 3, faults: 0, outstanding_faults: 0, total_blocktime_ns: 0, .. }"
        );
    }

    /// QEMU's worked example (comment above mark_postcopy_blocktime_end):
    ///
    /// ```text
    ///      S1        E1           S1               E1
    /// -----***********------------xxx***************------------> CPU1
    ///             S2                E2
    /// ------------****************xxx---------------------------> CPU2
    ///                         S3            E3
    /// ------------------------****xxx********-------------------> CPU3
    /// ```
    ///
    /// Reading one column as 1 ms: S1@5 (page A), S2@12 (B), E1@16 (A),
    /// S3@24 (C), S1@28 (D), E2@31 (B), E3@39 (C), E1@46 (D).
    /// * CPU1 (index 0): (16-5) + (46-28) = 11 + 18 = 29 ms, 2 faults.
    /// * CPU2 (index 1): 31-12 = 19 ms. CPU3 (index 2): 39-24 = 15 ms.
    /// * All three are down only from S1@28 (last_begin) until E2@31 releases
    ///   CPU2: total = 3 ms (the "xxx").
    /// * Latencies 11, 19, 15, 18 ms: average 63/4 = 15.75 ms; CPU1 average
    ///   (11+18)/2 = 14.5 ms. 11000 µs and 15000 µs fall in bucket 13
    ///   ([8192, 16384) µs), 19000 µs and 18000 µs in bucket 14.
    #[test]
    fn qemu_worked_example_three_vcpus() {
        let (clock, mut bt) = setup(3);
        let step = |bt: &mut Blocktime, t_ms: u64, f: &dyn Fn(&mut Blocktime)| {
            clock.set(t_ms * MS);
            f(bt);
        };
        step(&mut bt, 5, &|b| b.begin(A, tid(0)));
        step(&mut bt, 12, &|b| b.begin(B, tid(1)));
        step(&mut bt, 16, &|b| b.end(A));
        step(&mut bt, 24, &|b| b.begin(C, tid(2)));
        step(&mut bt, 28, &|b| b.begin(D, tid(0)));
        assert_eq!(bt.stats().total_blocktime_ns, 0);
        step(&mut bt, 31, &|b| b.end(B));
        assert_eq!(bt.stats().total_blocktime_ns, 3 * MS);
        step(&mut bt, 39, &|b| b.end(C));
        step(&mut bt, 46, &|b| b.end(D));

        let s = bt.stats();
        assert_eq!(
            s,
            BlocktimeStats {
                total_blocktime_ns: 3 * MS,
                vcpus: vec![
                    vs(29 * MS, 2, 14_500_000),
                    vs(19 * MS, 1, 19 * MS),
                    vs(15 * MS, 1, 15 * MS),
                ],
                latency_avg_ns: 15_750_000,
                faults: 4,
                resolved_faults: 4,
                non_vcpu_faults: 0,
                non_vcpu_latency_total_ns: 0,
                latency_histogram: hist(&[(13, 2), (14, 2)]),
                outstanding_faults: 0,
                max_outstanding_per_vcpu: 1,
            }
        );
        assert_eq!(s.total_blocktime_ms_u32(), 3);
        assert_eq!(s.vcpu_blocktime_ms_u32(), vec![29, 19, 15]);
        // No overlapping faults on one vCPU, so QEMU's QMP latencies agree.
        assert_eq!(s.qmp_vcpu_latency_ns(), vec![14_500_000, 19 * MS, 15 * MS]);
        assert_eq!(s.qmp_latency_ns(), 15_750_000);
        // One clock read per begin and per end.
        assert_eq!(clock.reads(), 8);
    }

    /// CASE 1 of QEMU's comment: a vCPU's second fault is recorded before the
    /// first one's end. A@0, B@10 on vCPU 0; end A@15 (vCPU still down),
    /// end B@40 releases it. QEMU 10.1 adds only the releasing fault's latency
    /// (40-10 = 30 µs), not 15 + 30. Latency average (15+30)/2 = 22.5 µs;
    /// buckets 3 (15 µs) and 4 (30 µs). vCPU 1 never blocks: total 0.
    #[test]
    fn two_faults_outstanding_on_one_vcpu() {
        let (clock, mut bt) = setup(2);
        clock.set(0);
        bt.begin(A, tid(0));
        clock.set(10 * US);
        bt.begin(B, tid(0));
        clock.set(15 * US);
        bt.end(A);
        let mid = bt.stats();
        assert_eq!(mid.vcpus[0], vs(0, 2, 15 * US));
        assert_eq!(mid.outstanding_faults, 1);
        assert_eq!(mid.max_outstanding_per_vcpu, 2);
        clock.set(40 * US);
        bt.end(B);
        assert_eq!(
            bt.stats(),
            BlocktimeStats {
                total_blocktime_ns: 0,
                vcpus: vec![vs(30 * US, 2, 22_500), vs(0, 0, 0)],
                latency_avg_ns: 22_500,
                faults: 2,
                resolved_faults: 2,
                latency_histogram: hist(&[(3, 1), (4, 1)]),
                outstanding_faults: 0,
                max_outstanding_per_vcpu: 2,
                ..Default::default()
            }
        );
        // QEMU's QMP latency: blocktime / faults = 15 µs.
        assert_eq!(bt.stats().qmp_vcpu_latency_ns(), vec![15 * US, 0]);
    }

    /// The same sequence with a single vCPU: the vCPU is down from 0 to 40 µs,
    /// so the system total is 40 µs while the per-vCPU figure stays 30 µs
    /// (QEMU 10.1's accumulation, kept as-is).
    #[test]
    fn overlapping_faults_single_vcpu_total_exceeds_vcpu_blocktime() {
        let (clock, mut bt) = setup(1);
        clock.set(0);
        bt.begin(A, tid(0));
        clock.set(10 * US);
        bt.begin(B, tid(0));
        clock.set(15 * US);
        bt.end(A);
        assert_eq!(bt.stats().total_blocktime_ns, 0);
        clock.set(40 * US);
        bt.end(B);
        let s = bt.stats();
        assert_eq!(s.total_blocktime_ns, 40 * US);
        assert_eq!(s.vcpus, vec![vs(30 * US, 2, 22_500)]);
    }

    /// vCPU 0 faults on A@0, vCPU 1 on A@4 µs; placing A@10 µs releases both:
    /// 10 and 6 µs of blocktime; both were down, last_begin = 4, so the total
    /// is 10 - 4 = 6 µs. Buckets 3 (10 µs) and 2 (6 µs).
    #[test]
    fn one_page_faulted_by_two_vcpus() {
        let (clock, mut bt) = setup(2);
        clock.set(0);
        bt.begin(A, tid(0));
        clock.set(4 * US);
        bt.begin(A, tid(1));
        assert_eq!(bt.outstanding_faults(), 2);
        clock.set(10 * US);
        bt.end(A);
        assert_eq!(
            bt.stats(),
            BlocktimeStats {
                total_blocktime_ns: 6 * US,
                vcpus: vec![vs(10 * US, 1, 10 * US), vs(6 * US, 1, 6 * US)],
                latency_avg_ns: 8 * US,
                faults: 2,
                resolved_faults: 2,
                latency_histogram: hist(&[(2, 1), (3, 1)]),
                outstanding_faults: 0,
                max_outstanding_per_vcpu: 1,
                ..Default::default()
            }
        );
        assert_eq!(clock.reads(), 3);
    }

    /// CASE 2 of QEMU's comment: one vCPU faults twice on the same page
    /// (A@0, A@3 µs), A placed @10 µs. Entries are resolved newest first, so
    /// the older one (10 µs) releases the vCPU and becomes the blocktime.
    #[test]
    fn same_vcpu_twice_on_one_page() {
        let (clock, mut bt) = setup(2);
        clock.set(0);
        bt.begin(A, tid(0));
        clock.set(3 * US);
        bt.begin(A, tid(0));
        clock.set(10 * US);
        bt.end(A);
        let s = bt.stats();
        assert_eq!(s.vcpus[0], vs(10 * US, 2, 8_500));
        assert_eq!(s.latency_histogram, hist(&[(2, 1), (3, 1)]));
        assert_eq!(s.max_outstanding_per_vcpu, 2);
        assert_eq!(s.outstanding_faults, 0);
    }

    /// A non-vCPU thread (tid 555) faults on A@0; vCPU 0 (the only vCPU)
    /// faults on B@1 µs. A@7 µs: 7 µs of non-vCPU latency, no blocktime and
    /// no effect on "all vCPUs down". B@9 µs: vCPU 0 blocked 8 µs; it was the
    /// only vCPU, so the total is 9 - 1 = 8 µs. Average (7+8)/2 = 7.5 µs.
    #[test]
    fn non_vcpu_fault() {
        let (clock, mut bt) = setup(1);
        clock.set(0);
        bt.begin(A, 555);
        clock.set(US);
        bt.begin(B, tid(0));
        clock.set(7 * US);
        bt.end(A);
        let mid = bt.stats();
        assert_eq!(mid.total_blocktime_ns, 0);
        assert_eq!(mid.vcpus, vec![vs(0, 1, 0)]);
        assert_eq!(mid.non_vcpu_latency_total_ns, 7 * US);
        clock.set(9 * US);
        bt.end(B);
        let s = bt.stats();
        assert_eq!(
            s,
            BlocktimeStats {
                total_blocktime_ns: 8 * US,
                vcpus: vec![vs(8 * US, 1, 8 * US)],
                latency_avg_ns: 7_500,
                faults: 2,
                resolved_faults: 2,
                non_vcpu_faults: 1,
                non_vcpu_latency_total_ns: 7 * US,
                latency_histogram: hist(&[(2, 1), (3, 1)]),
                outstanding_faults: 0,
                max_outstanding_per_vcpu: 1,
            }
        );
        assert_eq!(s.non_vcpu_latency_avg_ns(), 7 * US);
        assert_eq!(s.qmp_latency_ns(), 7_500);
    }

    #[test]
    fn histogram_edges() {
        let (clock, mut bt) = setup(0);
        let cases: &[(u64, usize)] = &[
            (0, 0),                     // 0 µs
            (999, 0),                   // rounds down to 0 µs
            (US, 0),                    // 1 µs: [1, 2)
            (2 * US - 1, 0),            // 1.999 µs is still 1 µs
            (2 * US, 1),                // [2, 4)
            (((1 << 23) - 1) * US, 22), // just under 2^23 µs
            ((1 << 23) * US, 23),       // 2^23 µs: the last bucket
            ((1 << 24) * US, 23),       // 2^24 µs
            (((1 << 24) + 1) * US, 23), // more than 2^24 µs
            ((1u64 << 40) * US, 23),    // far more
        ];
        let mut t = 1_000;
        let mut expect = [0u64; LATENCY_BUCKETS];
        let mut total = 0u64;
        for (i, &(lat, b)) in cases.iter().enumerate() {
            let page = i as u64 * PAGE;
            clock.set(t);
            bt.begin(page, 7);
            t += lat;
            clock.set(t);
            bt.end(page);
            expect[b] += 1;
            total += lat;
            assert_eq!(bt.stats().latency_histogram, expect, "latency {lat} ns");
        }
        let s = bt.stats();
        assert_eq!(
            s.latency_histogram,
            hist(&[(0, 4), (1, 1), (22, 1), (23, 4)])
        );
        assert_eq!(s.non_vcpu_faults, cases.len() as u64);
        assert_eq!(s.non_vcpu_latency_total_ns, total);
        assert_eq!(s.latency_avg_ns, total / cases.len() as u64);
        assert_eq!(s.vcpus, vec![]);
        assert_eq!(bt.vcpu_count(), 0);
    }

    #[test]
    fn tid_zero_is_ignored() {
        let (clock, mut bt) = setup(2);
        let fresh = bt.stats();
        clock.set(5 * US);
        bt.begin(A, 0);
        assert_eq!(bt.stats(), fresh);
        clock.set(9 * US);
        bt.end(A);
        assert_eq!(bt.stats(), fresh);
        assert_eq!(clock.reads(), 0);
    }

    /// 300 faults outstanding on vCPU 0 (QEMU would assert past 255). Page i
    /// begins at i µs and ends at 1000 + i µs, so every latency is 1000 µs
    /// (bucket 9: [512, 1024)); only the last end releases the vCPU, adding
    /// its 1000 µs as blocktime.
    #[test]
    fn three_hundred_outstanding_on_one_vcpu() {
        let (clock, mut bt) = setup(2);
        for i in 0..300u64 {
            clock.set(i * US);
            bt.begin(A + i * PAGE, tid(0));
        }
        let mid = bt.stats();
        assert_eq!(mid.outstanding_faults, 300);
        assert_eq!(mid.max_outstanding_per_vcpu, 300);
        assert_eq!(mid.vcpus[0], vs(0, 300, 0));
        for i in 0..300u64 {
            clock.set((1000 + i) * US);
            bt.end(A + i * PAGE);
            assert_eq!(bt.outstanding_faults(), 299 - i);
        }
        assert_eq!(
            bt.stats(),
            BlocktimeStats {
                total_blocktime_ns: 0,
                vcpus: vec![vs(1000 * US, 300, 1000 * US), vs(0, 0, 0)],
                latency_avg_ns: 1000 * US,
                faults: 300,
                resolved_faults: 300,
                latency_histogram: hist(&[(9, 300)]),
                outstanding_faults: 0,
                max_outstanding_per_vcpu: 300,
                ..Default::default()
            }
        );
    }

    #[test]
    fn end_without_fault_is_a_noop() {
        let (clock, mut bt) = setup(2);
        let fresh = bt.stats();
        clock.set(US);
        bt.end(A);
        assert_eq!(bt.stats(), fresh);
        assert_eq!(clock.reads(), 0);
        // Also with a fault outstanding on another page.
        bt.begin(B, tid(1));
        let before = bt.stats();
        clock.set(2 * US);
        bt.end(A);
        assert_eq!(bt.stats(), before);
        assert_eq!(clock.reads(), 1);
    }

    #[test]
    fn page_ended_twice() {
        let (clock, mut bt) = setup(2);
        clock.set(0);
        bt.begin(A, tid(0));
        clock.set(5 * US);
        bt.end(A);
        let once = bt.stats();
        assert_eq!(once.vcpus[0], vs(5 * US, 1, 5 * US));
        assert_eq!(once.resolved_faults, 1);
        clock.set(9 * US);
        bt.end(A);
        assert_eq!(bt.stats(), once);
        assert_eq!(clock.reads(), 2);
    }

    /// A batch stamped once: three faults read together at 10 µs (two vCPUs
    /// of two and one non-vCPU), placed at 25 µs and 30 µs with the caller's
    /// timestamps; the context's clock is never read. An end time before the
    /// begin counts as 0 latency.
    #[test]
    fn explicit_timestamps() {
        let (clock, mut bt) = setup(2);
        let now = 10 * US;
        bt.begin_at(A, tid(0), now);
        bt.begin_at(B, tid(1), now);
        bt.begin_at(C, 42, now);
        bt.begin_at(D, 0, now);
        bt.end_at(A, 25 * US);
        bt.end_at(B, 30 * US);
        bt.end_at(C, 5 * US);
        bt.end_at(D, 30 * US);
        assert_eq!(clock.reads(), 0);
        assert_eq!(
            bt.stats(),
            BlocktimeStats {
                // Both vCPUs down from 10 µs until A releases vCPU 0 at 25.
                total_blocktime_ns: 15 * US,
                vcpus: vec![vs(15 * US, 1, 15 * US), vs(20 * US, 1, 20 * US)],
                latency_avg_ns: 35 * US / 3,
                faults: 3,
                resolved_faults: 3,
                non_vcpu_faults: 1,
                non_vcpu_latency_total_ns: 0,
                latency_histogram: hist(&[(0, 1), (3, 1), (4, 1)]),
                outstanding_faults: 0,
                max_outstanding_per_vcpu: 1,
            }
        );
        clock.set(77);
        assert_eq!(bt.now_ns(), 77);
    }

    #[test]
    fn saturating_ms_and_unusual_vcpu_lists() {
        let s = BlocktimeStats {
            total_blocktime_ns: u64::MAX,
            vcpus: vec![vs(4_999_999, 0, 0), vs((u32::MAX as u64 + 1) * MS, 0, 0)],
            ..Default::default()
        };
        assert_eq!(s.total_blocktime_ms_u32(), u32::MAX);
        assert_eq!(s.vcpu_blocktime_ms_u32(), vec![4, u32::MAX]);

        // Out-of-order indices, a repeated tid (first wins) and a vCPU not yet
        // started (tid 0): sized by the highest index, three vCPUs must be
        // down for the total to run.
        let clock = Arc::new(FakeClock::default());
        let infos = [
            VcpuInfo { index: 2, tid: 30 },
            VcpuInfo { index: 0, tid: 10 },
            VcpuInfo { index: 1, tid: 0 },
            VcpuInfo { index: 1, tid: 10 },
        ];
        let mut bt = Blocktime::new(&infos, clock.clone());
        assert_eq!(bt.vcpu_count(), 3);
        bt.begin(A, 10);
        bt.begin(B, 30);
        clock.set(US);
        bt.end(A);
        bt.end(B);
        let s = bt.stats();
        assert_eq!(s.vcpus, vec![vs(US, 1, US), vs(0, 0, 0), vs(US, 1, US)]);
        assert_eq!(s.total_blocktime_ns, 0);
    }

    /// After warm-up, a window of in-flight faults (every third page also
    /// faulted by a second vCPU, so the pool is used) churned many times over
    /// leaves every buffer's capacity unchanged: no allocation per fault.
    #[test]
    fn steady_state_does_not_grow_storage() {
        let (clock, mut bt) = setup(8);
        let window = 200u64;
        let mut t = 0;
        let mut churn = |bt: &mut Blocktime, from: u64, to: u64| {
            for i in from..to {
                t += 100;
                clock.set(t);
                let page = (i + window) * PAGE;
                bt.begin(page, tid((i % 9) as u32));
                if i % 3 == 0 {
                    bt.begin(page, tid(((i + 1) % 9) as u32));
                }
                bt.end(i * PAGE);
            }
        };
        churn(&mut bt, 0, 1_000);
        let sizes = |bt: &Blocktime| {
            (
                bt.pending.slots.len(),
                bt.pending.entries.capacity(),
                bt.pending.entries.len(),
                bt.outstanding_faults(),
            )
        };
        let warm = sizes(&bt);
        assert!(warm.2 > 0);
        churn(&mut bt, 1_000, 100_000);
        assert_eq!(sizes(&bt), warm);
    }

    /// Straightforward model of QEMU 10.1's algorithm (linear scans, a Vec of
    /// entries in insertion order) to check the hashed, pooled implementation
    /// against on a long pseudo-random sequence with page collisions, shared
    /// pages, non-vCPU and tid-0 faults.
    struct Model {
        tids: HashMap<u32, usize>,
        n: usize,
        entries: Vec<(u64, Option<usize>, u64)>,
        cur: Vec<u64>,
        s: BlocktimeStats,
        lat: Vec<(u64, u64)>,
        lat_all: u64,
        down: usize,
        last_begin: u64,
    }

    impl Model {
        fn new(n: usize) -> Self {
            Model {
                tids: (0..n).map(|i| (tid(i as u32), i)).collect(),
                n,
                entries: vec![],
                cur: vec![0; n],
                s: BlocktimeStats {
                    vcpus: vec![VcpuStats::default(); n],
                    ..Default::default()
                },
                lat: vec![(0, 0); n],
                lat_all: 0,
                down: 0,
                last_begin: 0,
            }
        }
        fn begin(&mut self, addr: u64, t: u32, now: u64) {
            if t == 0 {
                return;
            }
            self.s.faults += 1;
            self.s.outstanding_faults += 1;
            let cpu = self.tids.get(&t).copied();
            match cpu {
                Some(c) => {
                    self.s.vcpus[c].faults += 1;
                    self.cur[c] += 1;
                    if self.cur[c] == 1 {
                        self.down += 1;
                        self.last_begin = now;
                    }
                    self.s.max_outstanding_per_vcpu =
                        self.s.max_outstanding_per_vcpu.max(self.cur[c]);
                }
                None => self.s.non_vcpu_faults += 1,
            }
            self.entries.push((addr, cpu, now));
        }
        fn end(&mut self, addr: u64, now: u64) {
            let mut released = 0;
            // Newest first, as QEMU walks its prepended list.
            for i in (0..self.entries.len()).rev() {
                if self.entries[i].0 != addr {
                    continue;
                }
                let (_, cpu, start) = self.entries.remove(i);
                let l = now - start;
                self.s.latency_histogram[bucket(l)] += 1;
                self.s.resolved_faults += 1;
                self.s.outstanding_faults -= 1;
                self.lat_all += l;
                match cpu {
                    Some(c) => {
                        self.lat[c].0 += l;
                        self.lat[c].1 += 1;
                        self.cur[c] -= 1;
                        if self.cur[c] == 0 {
                            self.s.vcpus[c].blocktime_ns += l;
                            released += 1;
                        }
                    }
                    None => self.s.non_vcpu_latency_total_ns += l,
                }
            }
            if released > 0 && self.down == self.n {
                self.s.total_blocktime_ns += now - self.last_begin;
            }
            self.down -= released;
        }
        fn stats(&self) -> BlocktimeStats {
            let mut s = self.s.clone();
            for (v, &(sum, n)) in s.vcpus.iter_mut().zip(&self.lat) {
                v.latency_avg_ns = sum.checked_div(n).unwrap_or(0);
            }
            s.latency_avg_ns = self.lat_all.checked_div(s.resolved_faults).unwrap_or(0);
            s
        }
    }

    #[test]
    fn matches_reference_model_on_random_sequence() {
        let n = 4u32;
        let (clock, mut bt) = setup(n);
        let mut model = Model::new(n as usize);
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut now = 0u64;
        for step in 0..200_000 {
            now += next() % 2_000;
            clock.set(now);
            let r = next();
            // 40 pages (with a stride that makes probe runs collide), biased
            // towards begins so several faults pile up.
            let addr = 0x7000_0000 + (r % 40) * PAGE * 64;
            if (r >> 8) % 5 < 3 {
                let t = match (r >> 16) % 7 {
                    0 => 0,
                    1 => 999,
                    k => tid((k as u32 - 2) % n),
                };
                // The explicit-time variants must agree with the clocked ones.
                if r & (1 << 40) != 0 {
                    bt.begin_at(addr, t, now);
                } else {
                    bt.begin(addr, t);
                }
                model.begin(addr, t, now);
            } else {
                if r & (1 << 40) != 0 {
                    bt.end_at(addr, now);
                } else {
                    bt.end(addr);
                }
                model.end(addr, now);
            }
            if step % 997 == 0 {
                assert_eq!(bt.stats(), model.stats(), "step {step}");
            }
        }
        for p in 0..40 {
            bt.end(0x7000_0000 + p * PAGE * 64);
            model.end(0x7000_0000 + p * PAGE * 64, now);
        }
        let s = bt.stats();
        assert_eq!(s, model.stats());
        assert_eq!(s.outstanding_faults, 0);
        assert_eq!(s.resolved_faults, s.faults);
        assert!(s.total_blocktime_ns > 0);
        assert!(s.max_outstanding_per_vcpu > 1);
    }

    /// The page table alone against a HashMap, starting from the smallest
    /// table so growth and backward-shift deletion run on long probe runs.
    #[test]
    fn pending_table_matches_hashmap() {
        let mut p = PendingFaults::with_capacity(0);
        let mut model: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..100_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let addr = (rng % 48) * PAGE;
            if rng >> 60 < 9 {
                p.push(p.probe(addr), addr, 0, step);
                model.entry(addr).or_default().insert(0, step);
            } else {
                let mut got = vec![];
                if let Some(slot) = p.take(addr) {
                    let mut e = slot.more;
                    while e != NIL {
                        got.push(p.entries[e as usize].start_ns);
                        let next = p.entries[e as usize].next;
                        p.release(e);
                        e = next;
                    }
                    got.push(slot.start_ns);
                }
                assert_eq!(got, model.remove(&addr).unwrap_or_default());
            }
            assert_eq!(p.pages, model.len());
            for k in 0..48 {
                assert_eq!(p.probe(k * PAGE).is_ok(), model.contains_key(&(k * PAGE)));
            }
        }
        assert!(p.slots.len() > 16);
    }

    #[test]
    fn monotonic_clock_advances() {
        let c = MonotonicClock;
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn bench_functions_run() {
        assert!(bench_pairs(4, 3, 1_000) > 0.0);
        assert!(bench_shared_page(4, 1_000) > 0.0);
        assert!(bench_disabled(1_000) >= 0.0);
        assert!(bench_clock(1_000) > 0.0);
    }
}
