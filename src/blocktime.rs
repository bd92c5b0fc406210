//! PLACEHOLDER until the blocktime module lands (same API, minimal semantics).
use std::sync::Arc;

pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;
}
pub struct MonotonicClock;
impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the live timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuInfo {
    pub index: u32,
    pub tid: u32,
}
pub const LATENCY_BUCKETS: usize = 24;
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    pub blocktime_ns: u64,
    pub faults: u64,
    pub latency_avg_ns: u64,
}
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlocktimeStats {
    pub total_blocktime_ns: u64,
    pub vcpus: Vec<VcpuStats>,
    pub latency_avg_ns: u64,
    pub faults: u64,
    pub resolved_faults: u64,
    pub non_vcpu_faults: u64,
    pub non_vcpu_latency_total_ns: u64,
    pub latency_histogram: [u64; LATENCY_BUCKETS],
    pub outstanding_faults: u64,
    pub max_outstanding_per_vcpu: u64,
}
impl BlocktimeStats {
    pub fn total_blocktime_ms_u32(&self) -> u32 {
        (self.total_blocktime_ns / 1_000_000).min(u32::MAX as u64) as u32
    }
    pub fn vcpu_blocktime_ms_u32(&self) -> Vec<u32> {
        self.vcpus
            .iter()
            .map(|v| (v.blocktime_ns / 1_000_000).min(u32::MAX as u64) as u32)
            .collect()
    }
}
pub struct Blocktime {
    vcpus: Vec<VcpuInfo>,
    _clock: Arc<dyn Clock>,
    stats: BlocktimeStats,
}
impl Blocktime {
    pub fn new(vcpus: &[VcpuInfo], clock: Arc<dyn Clock>) -> Self {
        Blocktime {
            vcpus: vcpus.to_vec(),
            _clock: clock,
            stats: BlocktimeStats {
                vcpus: vec![VcpuStats::default(); vcpus.len()],
                ..Default::default()
            },
        }
    }
    pub fn begin(&mut self, _page_addr: u64, tid: u32) {
        if tid != 0 {
            self.stats.faults += 1;
        }
    }
    pub fn end(&mut self, _page_addr: u64) {}
    pub fn stats(&self) -> BlocktimeStats {
        self.stats.clone()
    }
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }
}
