//! Page-request tracking: which pages the destination has asked for and not yet placed,
//! plus the counters a hypervisor reads to judge a migration.
use crate::blocktime::{Blocktime, BlocktimeStats};
use crate::host::BlockId;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A multiplicative hasher for page addresses: keys are already well spread in their
/// high bits, and SipHash would cost more than the rest of the fault path's bookkeeping.
#[derive(Default)]
pub struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, key: u64) {
        self.0 = (key >> 12)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(26);
    }
}

pub type PageMap<V> = HashMap<u64, V, BuildHasherDefault<PageHasher>>;

/// One outstanding request, keyed by the page-aligned guest-RAM address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub block: BlockId,
    pub offset: u64,
    pub len: u64,
    pub haddr: u64,
    pub tid: u32,
    /// False while the return path is down (or the send failed): sent on resume.
    pub sent: bool,
}

/// The state QEMU guards with page_request_mutex.
#[derive(Default)]
pub struct PageRequests {
    pub requested: PageMap<Pending>,
    /// The return path is down: new requests are recorded, not sent.
    pub paused: bool,
    pub blocktime: Option<Blocktime>,
    final_blocktime: Option<BlocktimeStats>,
}

impl PageRequests {
    pub fn new(blocktime: Option<Blocktime>) -> Self {
        PageRequests {
            requested: PageMap::default(),
            paused: false,
            blocktime,
            final_blocktime: None,
        }
    }

    /// At cleanup: keep the final blocktime figures, forget requests.
    pub fn finish(&mut self) {
        if let Some(bt) = self.blocktime.take() {
            self.final_blocktime = Some(bt.stats());
        }
        self.requested.clear();
        self.paused = false;
    }

    pub fn blocktime_stats(&self) -> Option<BlocktimeStats> {
        match &self.blocktime {
            Some(bt) => Some(bt.stats()),
            None => self.final_blocktime.clone(),
        }
    }
}

macro_rules! counters {
    ($(#[doc = $doc:literal] $name:ident,)*) => {
        /// Event counters, updated without locks.
        #[derive(Default, Debug)]
        pub struct Counters { $(#[doc = $doc] pub $name: AtomicU64,)* }

        /// A copy of the counters at one moment.
        #[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
        pub struct CounterSnapshot { $(#[doc = $doc] pub $name: u64,)* }

        impl Counters {
            pub fn snapshot(&self) -> CounterSnapshot {
                self.atomics_only();
                CounterSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
            pub fn reset(&self) {
                self.atomics_only();
                $(self.$name.store(0, Ordering::Relaxed);)*
            }
        }
    };
}

counters! {
    /// Page faults read from the userfaultfd.
    faults,
    /// Faults at addresses outside every RAM block (logged, never served).
    faults_outside_ram,
    /// Faults on pages already received by the time the fault thread looked.
    faults_already_received,
    /// Faults on pages already requested: not sent again.
    duplicate_faults,
    /// Page requests handed to the host.
    requests_sent,
    /// Page requests the host failed to send (sent again on resume).
    request_errors,
    /// Requests sent again after the return path came back.
    resent_after_resume,
    /// Times the fault thread paused because the return path was down.
    pauses,
    /// Pages placed with UFFDIO_COPY.
    pages_placed,
    /// Pages placed as zero pages.
    zero_pages_placed,
    /// Placements that found the page already present (EEXIST): woken, not failed.
    placed_already_present,
    /// Messages read from shared userfaultfds and handed to their handlers.
    shared_faults,
    /// Shared handlers that returned an error.
    shared_handler_errors,
    /// Requests made through postcopy_request_shared_page.
    shared_requests,
}

impl Counters {
    /// Tells a race checker (helgrind) that the counters are atomics read without a lock:
    /// `add_locked`'s plain stores and `snapshot`'s loads are not data races.
    fn atomics_only(&self) {
        crate::sys::valgrind::atomics_only(
            (self as *const Self).cast(),
            std::mem::size_of::<Self>(),
        );
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter that is only ever written with the request lock held (the
    /// placement counters): a plain load and store instead of a locked read-modify-write,
    /// which costs as much as the lock itself. Readers still see whole values.
    pub fn add_locked(counter: &AtomicU64, n: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
}
