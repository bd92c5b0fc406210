//! The destination's vCPU threads: started before switchover (their thread ids go to the
//! library for blocktime), released right after postcopy_ram_incoming_setup, they touch the
//! guest's RAM in a pattern and fault on every page that has not arrived yet.
use crate::ram::{Layout, TARGET_PAGE};
use crate::Pattern;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Holds the vCPUs until switchover.
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum GateState {
    #[default]
    Closed,
    Open,
    Abort,
}

impl Gate {
    pub fn open(&self) {
        *self.state.lock() = GateState::Open;
        self.cv.notify_all();
    }
    /// The migration failed before switchover: the vCPUs end without running.
    pub fn abort(&self) {
        *self.state.lock() = GateState::Abort;
        self.cv.notify_all();
    }
    fn wait(&self) -> bool {
        let mut s = self.state.lock();
        while *s == GateState::Closed {
            self.cv.wait(&mut s);
        }
        *s == GateState::Open
    }
}

/// Where the RAM blocks are, in 4 KiB pages.
#[derive(Clone)]
pub struct RamView {
    /// Keeps the mappings alive while any vCPU runs (also when the migration fails and
    /// the vCPUs are never joined).
    _keep: Arc<dyn Send + Sync>,
    /// (host address, length) of each block.
    blocks: Vec<(usize, u64)>,
    /// Global 4 KiB page index of each block's first page.
    first: Vec<u64>,
    total: u64,
}

impl RamView {
    pub fn new(layout: &Layout, addrs: &[usize], keep: Arc<dyn Send + Sync>) -> RamView {
        let mut first = Vec::new();
        let mut total = 0;
        for b in &layout.blocks {
            first.push(total);
            total += b.len / TARGET_PAGE;
        }
        RamView {
            _keep: keep,
            blocks: addrs
                .iter()
                .zip(&layout.blocks)
                .map(|(&a, b)| (a, b.len))
                .collect(),
            first,
            total,
        }
    }

    fn addr(&self, sub: u64) -> usize {
        let b = self.first.partition_point(|&f| f <= sub) - 1;
        self.blocks[b].0 + ((sub - self.first[b]) * TARGET_PAGE) as usize
    }
}

pub struct VcpuDone {
    pub index: u32,
    pub tid: u32,
    pub touches: u64,
    pub run_ns: u64,
}

pub struct Vcpu {
    pub index: u32,
    pub tid: u32,
    handle: JoinHandle<VcpuDone>,
}

impl Vcpu {
    pub fn join(self) -> Option<VcpuDone> {
        self.handle.join().ok()
    }
}

fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// Starts vCPU `index` of `count`; it waits at `gate`. Returns once its thread id is known.
pub fn spawn(
    index: u32,
    count: u32,
    pattern: Pattern,
    ram: RamView,
    gate: Arc<Gate>,
    complete: Arc<AtomicBool>,
) -> std::io::Result<Vcpu> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            let tid = gettid();
            let _ = tx.send(tid);
            if !gate.wait() {
                return VcpuDone {
                    index,
                    tid,
                    touches: 0,
                    run_ns: 0,
                };
            }
            let t = Instant::now();
            let touches = run(index, count, pattern, &ram, &complete);
            VcpuDone {
                index,
                tid,
                touches,
                run_ns: t.elapsed().as_nanos() as u64,
            }
        })?;
    let tid = rx
        .recv()
        .map_err(|_| std::io::Error::other("a vCPU thread died at start"))?;
    Ok(Vcpu { index, tid, handle })
}

/// The workload: touches (a read and a write back of the same word, so the guest's content
/// stays the source's), at most one per 4 KiB page of this vCPU's share of RAM, until the
/// migration is complete.
fn run(index: u32, count: u32, pattern: Pattern, ram: &RamView, complete: &AtomicBool) -> u64 {
    let total = ram.total;
    let slice = (total / count as u64).max(1);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(index as u64 + 1) | 1;
    let hot_lo = total / 10;
    let hot_len = (total / 20).max(1);
    let mut n = 0;
    for k in 0..slice {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let sub = match pattern {
            Pattern::Random => rng % total,
            Pattern::Sequential => (index as u64 * slice + k).min(total - 1),
            Pattern::Hotset => {
                if rng % 10 < 9 {
                    hot_lo + (rng >> 8) % hot_len
                } else {
                    (rng >> 8) % total
                }
            }
        };
        let word = (rng >> 40) as usize % (TARGET_PAGE as usize / 8);
        let p = (ram.addr(sub) + word * 8) as *mut u64;
        // SAFETY: `p` is an aligned word inside a live RAM block. Guest RAM is only touched
        // through atomics while vCPUs run (other vCPUs may touch the same word; the kernel
        // fills missing pages before the access completes), and read plainly only after
        // every vCPU has been joined.
        let a = unsafe { AtomicU64::from_ptr(p) };
        let v = a.load(Ordering::Relaxed);
        a.store(v, Ordering::Relaxed);
        n += 1;
        if n % 64 == 0 && complete.load(Ordering::Relaxed) {
            break;
        }
    }
    n
}
