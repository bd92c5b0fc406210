//! Notifier entrypoints: postcopy_add_notifier, postcopy_remove_notifier, postcopy_notify.
use super::types::{ErrorRef, NotifierWithReturnRef, PostcopyNotifyData, PostcopyNotifyReasonArg};
use super::{guard, log, report, NOTIFIERS};
use crate::error::Error;
use crate::host::{ErrorSlot, LogLevel};
use crate::notifiers::{Notifier, NotifyReason};
use std::ffi::c_int;
use std::sync::Arc;

/// A C NotifierWithReturn, called through its `notify` member.
struct CNotifier(usize);

impl Notifier for CNotifier {
    fn key(&self) -> usize {
        self.0
    }

    fn notify(&self, reason: NotifyReason, errp: ErrorSlot) -> i32 {
        let n = self.0 as *mut NotifierWithReturnRef;
        // SAFETY: the registrant keeps the notifier alive until it removes it, and the list
        // skips removed entries; `notify` is read at call time as QEMU does.
        let Some(f) = (unsafe { (*n).notify }) else {
            return 0;
        };
        let mut data = PostcopyNotifyData {
            reason: PostcopyNotifyReasonArg(reason as u32),
        };
        // SAFETY: a registered C callback, given the notifier itself, a live data struct and
        // the caller's errp (or NULL).
        unsafe {
            f(
                n,
                (&mut data as *mut PostcopyNotifyData).cast(),
                errp.0 as *mut *mut ErrorRef,
            )
        }
    }
}

/// Adds a notifier, called (newest first) with a `PostcopyNotifyData *` at PROBE,
/// INBOUND_ADVISE, INBOUND_LISTEN and INBOUND_END. The notifier must stay valid until
/// removed.
///
/// Thread: main thread. Errors (logged, list unchanged): NULL `nn`, a notifier already added.
#[no_mangle]
pub extern "C" fn postcopy_add_notifier(nn: *mut NotifierWithReturnRef) {
    guard("postcopy_add_notifier", (), || {
        if nn.is_null() {
            return log(
                LogLevel::Error,
                "postcopy_add_notifier: nn must not be NULL",
            );
        }
        if !NOTIFIERS.add(Arc::new(CNotifier(nn as usize))) {
            log(
                LogLevel::Warning,
                "postcopy_add_notifier: notifier already added; ignored",
            );
        }
    })
}

/// Removes a notifier. Safe from inside a notifier callback.
///
/// Thread: main thread. Errors (logged, harmless): NULL `n`, a notifier never added.
#[no_mangle]
pub extern "C" fn postcopy_remove_notifier(n: *mut NotifierWithReturnRef) {
    guard("postcopy_remove_notifier", (), || {
        if n.is_null() {
            return log(
                LogLevel::Error,
                "postcopy_remove_notifier: n must not be NULL",
            );
        }
        if !NOTIFIERS.remove(n as usize) {
            log(
                LogLevel::Warning,
                "postcopy_remove_notifier: notifier was not added; ignored",
            );
        }
    })
}

/// Calls every notifier with `reason`, newest first, passing `errp` through; stops at the
/// first non-zero return and returns it (a failing notifier sets `*errp` itself). A callback
/// may add or remove notifiers.
///
/// Thread: main thread. Errors: an unknown `reason` returns -EINVAL with an errp message
/// and calls nobody.
#[no_mangle]
pub extern "C" fn postcopy_notify(
    reason: PostcopyNotifyReasonArg,
    errp: *mut *mut ErrorRef,
) -> c_int {
    guard(
        "postcopy_notify",
        -libc::EFAULT,
        || match NotifyReason::from_raw(reason.0) {
            Some(r) => NOTIFIERS.notify(r, ErrorSlot(errp as usize)),
            None => {
                let err = Error::InvalidEnum {
                    kind: "PostcopyNotifyReason",
                    value: reason.0 as i64,
                };
                report("postcopy_notify", errp, &err);
                -libc::EINVAL
            }
        },
    )
}
