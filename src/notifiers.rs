//! The postcopy notifier list: devices (vhost-user) that must agree before postcopy can
//! run, and hear each step of it.
use crate::host::ErrorSlot;
use crate::sync::Mutex;
use std::sync::Arc;

/// Why the notifiers are called, numbered as QEMU's `enum PostcopyNotifyReason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum NotifyReason {
    Probe = 0,
    InboundAdvise = 1,
    InboundListen = 2,
    InboundEnd = 3,
}

impl NotifyReason {
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => NotifyReason::Probe,
            1 => NotifyReason::InboundAdvise,
            2 => NotifyReason::InboundListen,
            3 => NotifyReason::InboundEnd,
            _ => return None,
        })
    }
}

/// One registered notifier.
pub trait Notifier: Send + Sync {
    /// Identity for removal (the C `NotifierWithReturn *`).
    fn key(&self) -> usize;
    /// 0 to continue, non-zero (negative by convention) to stop and fail.
    fn notify(&self, reason: NotifyReason, errp: ErrorSlot) -> i32;
}

/// Newest first, as QEMU's head-inserted QLIST.
#[derive(Default)]
pub struct NotifierList {
    list: Mutex<Vec<Arc<dyn Notifier>>>,
}

impl NotifierList {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds at the head. Returns false (and changes nothing) when the key is already present.
    pub fn add(&self, notifier: Arc<dyn Notifier>) -> bool {
        let mut list = self.list.lock();
        if list.iter().any(|n| n.key() == notifier.key()) {
            return false;
        }
        list.insert(0, notifier);
        true
    }

    /// Removes by key; false when it was not registered.
    pub fn remove(&self, key: usize) -> bool {
        let mut list = self.list.lock();
        let before = list.len();
        list.retain(|n| n.key() != key);
        list.len() != before
    }

    pub fn clear(&self) {
        self.list.lock().clear();
    }

    pub fn len(&self) -> usize {
        self.list.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn contains(&self, key: usize) -> bool {
        self.list.lock().iter().any(|n| n.key() == key)
    }

    /// Calls every notifier, newest first, without holding the lock so a callback may add
    /// or remove notifiers. One removed by an earlier callback is skipped; one added during
    /// the walk is not called this time. Stops at the first non-zero return and returns it.
    pub fn notify(&self, reason: NotifyReason, errp: ErrorSlot) -> i32 {
        let snapshot: Vec<Arc<dyn Notifier>> = self.list.lock().clone();
        for notifier in snapshot {
            if !self.contains(notifier.key()) {
                continue;
            }
            let rc = notifier.notify(reason, errp);
            if rc != 0 {
                return rc;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Recorder {
        key: usize,
        calls: Arc<Mutex<Vec<(usize, NotifyReason)>>>,
        rc: i32,
        on_call: Option<Box<dyn Fn() + Send + Sync>>,
    }

    impl Notifier for Recorder {
        fn key(&self) -> usize {
            self.key
        }
        fn notify(&self, reason: NotifyReason, _errp: ErrorSlot) -> i32 {
            self.calls.lock().push((self.key, reason));
            if let Some(f) = &self.on_call {
                f();
            }
            self.rc
        }
    }

    fn rec(key: usize, calls: &Arc<Mutex<Vec<(usize, NotifyReason)>>>, rc: i32) -> Arc<Recorder> {
        Arc::new(Recorder {
            key,
            calls: calls.clone(),
            rc,
            on_call: None,
        })
    }

    #[test]
    fn newest_first_and_stops_at_first_failure() {
        let list = NotifierList::new();
        let calls = Arc::new(Mutex::new(Vec::new()));
        list.add(rec(1, &calls, 0));
        list.add(rec(2, &calls, -22));
        list.add(rec(3, &calls, 0));
        assert_eq!(list.notify(NotifyReason::Probe, ErrorSlot(0)), -22);
        assert_eq!(
            *calls.lock(),
            vec![(3, NotifyReason::Probe), (2, NotifyReason::Probe)]
        );
    }

    #[test]
    fn duplicate_add_and_unknown_remove_change_nothing() {
        let list = NotifierList::new();
        let calls = Arc::new(Mutex::new(Vec::new()));
        assert!(list.add(rec(1, &calls, 0)));
        assert!(!list.add(rec(1, &calls, 0)));
        assert_eq!(list.len(), 1);
        assert!(!list.remove(99));
        assert!(list.remove(1));
        assert!(list.is_empty());
    }

    #[test]
    fn callback_may_remove_a_later_notifier_and_add_new_ones() {
        let list = Arc::new(NotifierList::new());
        let calls = Arc::new(Mutex::new(Vec::new()));
        list.add(rec(1, &calls, 0));
        let added = Arc::new(AtomicUsize::new(0));
        let (l2, c2, a2) = (list.clone(), calls.clone(), added.clone());
        list.add(Arc::new(Recorder {
            key: 2,
            calls: calls.clone(),
            rc: 0,
            on_call: Some(Box::new(move || {
                l2.remove(1);
                l2.add(rec(10 + a2.fetch_add(1, Ordering::SeqCst), &c2, 0));
            })),
        }));
        assert_eq!(list.notify(NotifyReason::InboundEnd, ErrorSlot(0)), 0);
        // 2 ran, removed 1 (skipped) and added 10 (not called in this walk).
        assert_eq!(*calls.lock(), vec![(2, NotifyReason::InboundEnd)]);
        assert_eq!(list.len(), 2);
    }
}
