//! Valgrind client requests: how the library tells helgrind about synchronisation it cannot
//! see. Helgrind only intercepts pthread calls; parking_lot's locks park on futex(2) and
//! the library's flags are atomics, so without these annotations every access to
//! lock-guarded data looks like a race to it.
//!
//! A client request is a magic instruction sequence that does nothing on a real CPU and
//! that valgrind's JIT recognises. It costs a few cycles natively; `enabled()` reads a flag
//! probed once, so outside valgrind each annotation is one relaxed load and a branch.
//! Only x86-64 has the sequence here; elsewhere every annotation is a no-op.
use std::sync::atomic::{AtomicU8, Ordering};

/// `VG_USERREQ__RUNNING_ON_VALGRIND` (valgrind.h).
const RUNNING_ON_VALGRIND: usize = 0x1001;
/// Helgrind's requests are numbered from `VG_USERREQ_TOOL_BASE('H','G')` (helgrind.h).
const HG_BASE: usize = (b'H' as usize) << 24 | (b'G' as usize) << 16;
/// `_VG_USERREQ__HG_PTHREAD_RWLOCK_INIT_POST`, what ANNOTATE_RWLOCK_CREATE sends.
const HG_RWLOCK_CREATE: usize = HG_BASE + 0x10e;
/// `_VG_USERREQ__HG_PTHREAD_RWLOCK_DESTROY_PRE` (ANNOTATE_RWLOCK_DESTROY).
const HG_RWLOCK_DESTROY: usize = HG_BASE + 0x10f;
/// `_VG_USERREQ__HG_PTHREAD_RWLOCK_ACQUIRED` (ANNOTATE_RWLOCK_ACQUIRED).
const HG_RWLOCK_ACQUIRED: usize = HG_BASE + 0x111;
/// `_VG_USERREQ__HG_PTHREAD_RWLOCK_RELEASED` (ANNOTATE_RWLOCK_RELEASED).
const HG_RWLOCK_RELEASED: usize = HG_BASE + 0x112;
/// `_VG_USERREQ__HG_USERSO_SEND_PRE` (ANNOTATE_HAPPENS_BEFORE).
const HG_HAPPENS_BEFORE: usize = HG_BASE + 0x121;
/// `_VG_USERREQ__HG_USERSO_RECV_POST` (ANNOTATE_HAPPENS_AFTER).
const HG_HAPPENS_AFTER: usize = HG_BASE + 0x122;

/// `_VG_USERREQ__HG_ARANGE_MAKE_UNTRACKED` (ANNOTATE_BENIGN_RACE_SIZED).
const HG_UNTRACK: usize = HG_BASE + 0x127;

/// Sends one client request; returns `default` when not running under valgrind.
#[cfg(target_arch = "x86_64")]
fn client_request(default: usize, request: usize, a1: usize, a2: usize) -> usize {
    let args: [usize; 6] = [request, a1, a2, 0, 0, 0];
    let mut result = default;
    // SAFETY: valgrind.h's amd64 sequence. The four rotations of rdi add up to 128 bits,
    // so natively rdi is unchanged and `xchg rbx, rbx` is a no-op: the only native effect
    // is on the flags, which asm! assumes clobbered unless told otherwise. Under valgrind,
    // the tool reads the six words at rax (a live local array) and writes rdx.
    unsafe {
        std::arch::asm!(
            "rol rdi, 3",
            "rol rdi, 13",
            "rol rdi, 61",
            "rol rdi, 51",
            "xchg rbx, rbx",
            in("rax") args.as_ptr(),
            inout("rdx") result,
            out("rdi") _,
            options(nostack),
        );
    }
    result
}

#[cfg(not(target_arch = "x86_64"))]
fn client_request(default: usize, _request: usize, _a1: usize, _a2: usize) -> usize {
    default
}

/// 0: not probed yet, 1: native, 2: under valgrind.
static UNDER_VALGRIND: AtomicU8 = AtomicU8::new(0);

/// Whether the process runs under valgrind (probed once).
pub fn enabled() -> bool {
    match UNDER_VALGRIND.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = client_request(0, RUNNING_ON_VALGRIND, 0, 0) != 0;
            // A read-modify-write, not a store: helgrind treats it as a read, so the
            // probe itself is not reported as a race between the first callers.
            let _ = UNDER_VALGRIND.compare_exchange(
                0,
                if on { 2 } else { 1 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            on
        }
    }
}

fn request(request: usize, a1: usize, a2: usize) {
    if enabled() {
        client_request(0, request, a1, a2);
    }
}

/// The lock at `lock` exists (ANNOTATE_RWLOCK_CREATE).
pub fn lock_created(lock: *const ()) {
    request(HG_RWLOCK_CREATE, lock as usize, 0);
}

/// The lock at `lock` is about to be freed; helgrind forgets it, so a lock later
/// allocated at the same address is a new lock (ANNOTATE_RWLOCK_DESTROY).
pub fn lock_destroyed(lock: *const ()) {
    request(HG_RWLOCK_DESTROY, lock as usize, 0);
}

/// The calling thread now holds `lock`, exclusively or shared (ANNOTATE_RWLOCK_ACQUIRED).
pub fn lock_acquired(lock: *const (), exclusive: bool) {
    request(HG_RWLOCK_ACQUIRED, lock as usize, exclusive as usize);
}

/// The calling thread is about to release `lock` (ANNOTATE_RWLOCK_RELEASED).
pub fn lock_released(lock: *const ()) {
    request(HG_RWLOCK_RELEASED, lock as usize, 0);
}

/// Everything this thread did so far happens before whatever a later `happens_after(tag)`
/// follows (ANNOTATE_HAPPENS_BEFORE): for hand-offs through atomics.
pub fn happens_before(tag: *const ()) {
    request(HG_HAPPENS_BEFORE, tag as usize, 0);
}

/// The pairing half of `happens_before` (ANNOTATE_HAPPENS_AFTER).
pub fn happens_after(tag: *const ()) {
    request(HG_HAPPENS_AFTER, tag as usize, 0);
}

/// `len` bytes at `start` hold only atomics that are read without a lock (statistics):
/// helgrind, which does not model atomics, stops checking them until the memory is freed
/// (ANNOTATE_BENIGN_RACE_SIZED). Under the Rust memory model these accesses are not races.
pub fn atomics_only(start: *const (), len: usize) {
    request(HG_UNTRACK, start as usize, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natively_every_request_returns_its_default_and_leaves_registers_alone() {
        // `cargo test` does not run under valgrind: the magic sequence must be a no-op.
        assert!(!enabled());
        assert_eq!(client_request(7, RUNNING_ON_VALGRIND, 1, 2), 7);
        let x = 5u64;
        lock_created((&x as *const u64).cast());
        lock_acquired((&x as *const u64).cast(), true);
        lock_released((&x as *const u64).cast());
        lock_destroyed((&x as *const u64).cast());
        happens_before((&x as *const u64).cast());
        happens_after((&x as *const u64).cast());
        atomics_only((&x as *const u64).cast(), 8);
        assert_eq!(x, 5);
    }
}
