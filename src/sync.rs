//! The library's locks: parking_lot's, announced to helgrind.
//!
//! parking_lot parks threads on futex(2), which valgrind's helgrind does not see, so it
//! took every access to lock-guarded data for a race. These wrappers keep parking_lot's
//! speed and API (the subset the library uses) and report each acquire and release with a
//! valgrind client request (`sys::valgrind`), which costs one relaxed load and a branch when
//! not under valgrind. Under helgrind the library's locks then behave like pthread locks:
//! their happens-before edges are seen and their lock order is checked.
use crate::sys::valgrind;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// A Release store of a flag that other threads load without a lock. Done as a swap:
/// helgrind treats a read-modify-write as a read, so a plain store would be reported as
/// racing with those loads (it does not model atomics).
pub trait Publish<T> {
    fn publish(&self, value: T);
}

impl Publish<bool> for AtomicBool {
    fn publish(&self, value: bool) {
        self.swap(value, Ordering::Release);
    }
}

impl Publish<usize> for AtomicUsize {
    fn publish(&self, value: usize) {
        self.swap(value, Ordering::Release);
    }
}

/// Announces a lock to helgrind on first use and retires it when dropped, so a lock later
/// allocated at the same address starts with a clean history.
#[derive(Default)]
struct Announce(AtomicBool);

impl Announce {
    const fn new() -> Self {
        Announce(AtomicBool::new(false))
    }

    fn acquired(&self, lock: *const (), exclusive: bool) {
        if valgrind::enabled() {
            // compare_exchange, not a store: helgrind counts it as a read, so the flag
            // itself is not a race between the first two lockers.
            if !self.0.load(Ordering::Relaxed)
                && self
                    .0
                    .compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                valgrind::lock_created(lock);
            }
            valgrind::lock_acquired(lock, exclusive);
        }
    }

    fn released(&self, lock: *const ()) {
        if valgrind::enabled() {
            valgrind::lock_released(lock);
        }
    }

    fn retire(&mut self, lock: *const ()) {
        if *self.0.get_mut() {
            valgrind::lock_destroyed(lock);
        }
    }
}

/// A mutual-exclusion lock (parking_lot's `Mutex`, announced to helgrind).
#[derive(Default)]
pub struct Mutex<T> {
    announce: Announce,
    inner: parking_lot::Mutex<T>,
}

/// Holds a [`Mutex`]; releases it when dropped.
pub struct MutexGuard<'a, T> {
    lock: &'a Mutex<T>,
    inner: parking_lot::MutexGuard<'a, T>,
}

impl<T> Mutex<T> {
    pub const fn new(value: T) -> Self {
        Mutex {
            announce: Announce::new(),
            inner: parking_lot::Mutex::new(value),
        }
    }

    fn id(&self) -> *const () {
        (&self.inner as *const parking_lot::Mutex<T>).cast()
    }

    pub fn lock(&self) -> MutexGuard<'_, T> {
        let inner = self.inner.lock();
        self.announce.acquired(self.id(), true);
        MutexGuard { lock: self, inner }
    }

    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        let inner = self.inner.try_lock()?;
        self.announce.acquired(self.id(), true);
        Some(MutexGuard { lock: self, inner })
    }

    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }
}

impl<T> Drop for Mutex<T> {
    fn drop(&mut self) {
        let id = self.id();
        self.announce.retire(id);
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        // Announced before the real unlock, as helgrind's pthread wrappers do.
        self.lock.announce.released(self.lock.id());
    }
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// A condition variable for [`Mutex`] (parking_lot's `Condvar`).
#[derive(Default)]
pub struct Condvar(parking_lot::Condvar);

impl Condvar {
    pub const fn new() -> Self {
        Condvar(parking_lot::Condvar::new())
    }

    /// Releases the guard's lock, waits for a notification, re-acquires it.
    pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
        let lock = guard.lock;
        lock.announce.released(lock.id());
        self.0.wait(&mut guard.inner);
        lock.announce.acquired(lock.id(), true);
    }

    /// As [`Condvar::wait`], for at most `timeout`; true when it timed out.
    pub fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, timeout: Duration) -> bool {
        let lock = guard.lock;
        lock.announce.released(lock.id());
        let timed_out = self.0.wait_for(&mut guard.inner, timeout).timed_out();
        lock.announce.acquired(lock.id(), true);
        timed_out
    }

    pub fn notify_all(&self) -> usize {
        self.0.notify_all()
    }

    pub fn notify_one(&self) -> bool {
        self.0.notify_one()
    }
}

/// A reader-writer lock (parking_lot's `RwLock`, announced to helgrind).
#[derive(Default)]
pub struct RwLock<T> {
    announce: Announce,
    inner: parking_lot::RwLock<T>,
}

/// Shared access to a [`RwLock`], or to part of what it guards (after [`RwLockReadGuard::try_map`]).
pub struct RwLockReadGuard<'a, T: ?Sized> {
    announce: &'a Announce,
    id: *const (),
    inner: parking_lot::MappedRwLockReadGuard<'a, T>,
}

/// Exclusive access to a [`RwLock`].
pub struct RwLockWriteGuard<'a, T> {
    lock: &'a RwLock<T>,
    inner: parking_lot::RwLockWriteGuard<'a, T>,
}

impl<T> RwLock<T> {
    pub const fn new(value: T) -> Self {
        RwLock {
            announce: Announce::new(),
            inner: parking_lot::RwLock::new(value),
        }
    }

    fn id(&self) -> *const () {
        (&self.inner as *const parking_lot::RwLock<T>).cast()
    }

    fn shared<'a>(&'a self, guard: parking_lot::RwLockReadGuard<'a, T>) -> RwLockReadGuard<'a, T> {
        self.announce.acquired(self.id(), false);
        RwLockReadGuard {
            announce: &self.announce,
            id: self.id(),
            inner: parking_lot::RwLockReadGuard::map(guard, |v| v),
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.shared(self.inner.read())
    }

    /// A read lock that never waits behind a queued writer (safe to take while this thread
    /// already holds a read lock on it).
    pub fn read_recursive(&self) -> RwLockReadGuard<'_, T> {
        self.shared(self.inner.read_recursive())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        let inner = self.inner.write();
        self.announce.acquired(self.id(), true);
        RwLockWriteGuard { lock: self, inner }
    }

    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }
}

impl<T> Drop for RwLock<T> {
    fn drop(&mut self) {
        let id = self.id();
        self.announce.retire(id);
    }
}

impl<'a, T: ?Sized> RwLockReadGuard<'a, T> {
    /// Narrows the guard to part of the data; `None` (and the lock released) when `f` does.
    pub fn try_map<U: ?Sized>(
        guard: Self,
        f: impl FnOnce(&T) -> Option<&U>,
    ) -> Option<RwLockReadGuard<'a, U>> {
        let guard = std::mem::ManuallyDrop::new(guard);
        let (announce, id) = (guard.announce, guard.id);
        // SAFETY: `guard` is never used or dropped again; its inner guard is moved out once
        // and its release is announced below (on failure) or by the new guard's drop.
        let inner = unsafe { std::ptr::read(&guard.inner) };
        match parking_lot::MappedRwLockReadGuard::try_map(inner, f) {
            Ok(inner) => Some(RwLockReadGuard {
                announce,
                id,
                inner,
            }),
            Err(inner) => {
                announce.released(id);
                drop(inner);
                None
            }
        }
    }
}

impl<T: ?Sized> Drop for RwLockReadGuard<'_, T> {
    fn drop(&mut self) {
        self.announce.released(self.id);
    }
}

impl<T: ?Sized> Deref for RwLockReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> Drop for RwLockWriteGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.announce.released(self.lock.id());
    }
}

impl<T> Deref for RwLockWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for RwLockWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn mutex_condvar_and_rwlock_behave_like_parking_lots() {
        let m = Arc::new((Mutex::new(0u32), Condvar::new()));
        let m2 = m.clone();
        let t = std::thread::spawn(move || {
            *m2.0.lock() = 7;
            m2.1.notify_all();
        });
        let mut g = m.0.lock();
        while *g != 7 {
            m.1.wait_for(&mut g, Duration::from_millis(50));
        }
        assert!(m.0.try_lock().is_none(), "held by this thread");
        drop(g);
        t.join().unwrap();
        assert_eq!(*m.0.try_lock().expect("free again"), 7);

        let rw = RwLock::new(Some(vec![1, 2, 3]));
        {
            let a = rw.read();
            let b = rw.read_recursive();
            assert_eq!(a.as_ref().unwrap().len() + b.as_ref().unwrap().len(), 6);
        }
        let mapped = RwLockReadGuard::try_map(rw.read(), |v| v.as_deref()).expect("some");
        assert_eq!(&*mapped, &[1, 2, 3]);
        drop(mapped);
        rw.write().take();
        assert!(RwLockReadGuard::try_map(rw.read(), |v| v.as_deref()).is_none());
        // The failed map released the read lock: a writer gets in.
        *rw.write() = Some(vec![4]);
        assert_eq!(rw.read().as_deref(), Some(&[4][..]));
    }
}
