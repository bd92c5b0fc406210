//! Shared userfaultfds: userfaultfds owned by other processes (vhost-user backends) over
//! the same guest RAM. Their faults are read by our fault thread and handed to the
//! registrant's handler; their waiters are woken when we place a page.
//!
//! Unlike QEMU, which polls only the fds present when the fault thread starts, a
//! registration change kicks every running fault thread, which rebuilds its poll set.
use crate::host::BlockId;
use crate::sync::{Mutex, Publish};
use crate::sys::eventfd::EventFd;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

/// One registrant (the C `struct PostCopyFD`, copied).
pub trait SharedUfd: Send + Sync {
    fn fd(&self) -> RawFd;
    /// For messages.
    fn name(&self) -> String;
    /// A message read from the fd (one raw `struct uffd_msg`). Returns the handler's status.
    fn handle(&self, msg: &mut crate::sys::uffd::UffdMsg) -> i32;
    /// A page of `block` at `offset` was placed. Returns the waker's status.
    fn wake(&self, block: BlockId, offset: u64) -> i32;
}

#[derive(Default)]
pub struct SharedUfdRegistry {
    entries: Mutex<Vec<Arc<dyn SharedUfd>>>,
    /// `entries.len()`, written under its lock, read without it (every placement asks).
    count: AtomicUsize,
    generation: AtomicU64,
    listeners: Mutex<Vec<Weak<EventFd>>>,
}

impl SharedUfdRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers by fd. Returns false (and changes nothing) when the fd is already registered.
    pub fn register(&self, entry: Arc<dyn SharedUfd>) -> bool {
        {
            let mut entries = self.entries.lock();
            if entries.iter().any(|e| e.fd() == entry.fd()) {
                return false;
            }
            entries.push(entry);
            self.count.publish(entries.len());
        }
        self.changed();
        true
    }

    /// Removes the entry with this fd; false when none was registered.
    pub fn unregister(&self, fd: RawFd) -> bool {
        let removed = {
            let mut entries = self.entries.lock();
            let before = entries.len();
            entries.retain(|e| e.fd() != fd);
            self.count.publish(entries.len());
            entries.len() != before
        };
        if removed {
            self.changed();
        }
        removed
    }

    pub fn clear(&self) {
        {
            let mut entries = self.entries.lock();
            entries.clear();
            self.count.publish(0);
        }
        self.changed();
    }

    pub fn snapshot(&self) -> Vec<Arc<dyn SharedUfd>> {
        self.entries.lock().clone()
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bumped on every change, so pollers know to rebuild.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A fault thread's kick fd, kicked on every change while it lives.
    pub fn add_listener(&self, kick: &Arc<EventFd>) {
        let mut listeners = self.listeners.lock();
        listeners.retain(|w| w.strong_count() > 0);
        listeners.push(Arc::downgrade(kick));
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let listeners: Vec<Arc<EventFd>> = self
            .listeners
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for kick in listeners {
            // A failed kick only delays the rebuild to the next event.
            let _ = kick.kick();
        }
    }

    /// Calls every waker (no lock held); returns the first non-zero status, after calling all.
    pub fn notify_wake(&self, block: BlockId, offset: u64) -> i32 {
        let mut first = 0;
        for entry in self.snapshot() {
            let rc = entry.wake(block, offset);
            if rc != 0 && first == 0 {
                first = rc;
            }
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Fake {
        fd: RawFd,
        rc: i32,
        wakes: AtomicUsize,
    }

    impl SharedUfd for Fake {
        fn fd(&self) -> RawFd {
            self.fd
        }
        fn name(&self) -> String {
            format!("fake{}", self.fd)
        }
        fn handle(&self, _msg: &mut crate::sys::uffd::UffdMsg) -> i32 {
            0
        }
        fn wake(&self, _b: BlockId, _o: u64) -> i32 {
            self.wakes.fetch_add(1, Ordering::SeqCst);
            self.rc
        }
    }

    #[test]
    fn keyed_by_fd_and_first_nonzero_waker_status_propagates() {
        let reg = SharedUfdRegistry::new();
        let a = Arc::new(Fake {
            fd: 10,
            rc: 0,
            wakes: AtomicUsize::new(0),
        });
        let b = Arc::new(Fake {
            fd: 11,
            rc: -5,
            wakes: AtomicUsize::new(0),
        });
        let c = Arc::new(Fake {
            fd: 12,
            rc: -7,
            wakes: AtomicUsize::new(0),
        });
        assert!(reg.register(a.clone()));
        assert!(!reg.register(Arc::new(Fake {
            fd: 10,
            rc: 0,
            wakes: AtomicUsize::new(0)
        })));
        assert!(reg.register(b.clone()));
        assert!(reg.register(c.clone()));
        assert_eq!(reg.notify_wake(BlockId(1), 0), -5);
        // All wakers ran even after the first failure.
        assert_eq!(c.wakes.load(Ordering::SeqCst), 1);
        assert!(!reg.unregister(99));
        let g = reg.generation();
        assert!(reg.unregister(11));
        assert!(reg.generation() > g);
        assert_eq!(reg.notify_wake(BlockId(1), 0), -7);
    }

    #[test]
    fn changes_kick_listeners() {
        let reg = SharedUfdRegistry::new();
        let kick = Arc::new(EventFd::new().unwrap());
        reg.add_listener(&kick);
        reg.register(Arc::new(Fake {
            fd: 3,
            rc: 0,
            wakes: AtomicUsize::new(0),
        }));
        reg.unregister(3);
        assert_eq!(kick.drain(), 2);
    }
}
