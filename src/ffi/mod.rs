//! The C boundary, in the manner of rustls-ffi: each `extern "C"` function checks its
//! pointers, decodes enum integers, runs inside a panic guard, converts errors to the
//! signature's channel, and calls safe Rust. Global tables live here and only here.
//!
//! Entrypoints are safe `extern "C" fn`s, as in rustls-ffi: their callers are C code that
//! the compiler cannot check anyway; each one checks for NULL and documents the pointer
//! contract it relies on beyond that, and each dereference carries a SAFETY comment.
#![allow(clippy::not_unsafe_ptr_arg_deref)]
pub mod blocktime;
pub mod discard;
pub mod host_ops;
pub mod incoming;
pub mod notifiers;
pub mod placement;
pub mod preempt;
pub mod shared_ufds;
pub mod standalone;
pub mod state;
pub mod types;

use crate::error::Error;
use crate::host::{default_log, ErrorSlot, Host, LogLevel};
use crate::incoming::Incoming;
use crate::notifiers::NotifierList;
use crate::shared_ufds::SharedUfdRegistry;
use crate::sync::{Publish, RwLock};
use once_cell::sync::Lazy;
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use types::ErrorRef;

/// The notifier list (`postcopy_add_notifier`).
pub(crate) static NOTIFIERS: Lazy<Arc<NotifierList>> = Lazy::new(|| Arc::new(NotifierList::new()));
/// The shared-userfaultfd registry (`postcopy_register_shared_ufd`).
pub(crate) static SHARED_UFDS: Lazy<Arc<SharedUfdRegistry>> =
    Lazy::new(|| Arc::new(SharedUfdRegistry::new()));
/// The registered host.
static HOST: RwLock<Option<Arc<dyn Host>>> = RwLock::new(None);
/// Incoming contexts keyed by `MigrationIncomingState *`.
static INCOMING: Lazy<RwLock<HashMap<usize, Arc<Incoming>>>> = Lazy::new(Default::default);
/// The `MigrationIncomingState *` most recently passed to init, prepare_discard, setup or
/// preempt_new_channel: what entrypoints without a `mis` argument use when no set-up
/// context lists the block they name.
static CURRENT_MIS: AtomicUsize = AtomicUsize::new(0);

/// Runs an entrypoint body; a panic is logged and turned into `on_panic`, never unwound
/// into C.
pub(crate) fn guard<R>(entry: &'static str, on_panic: R, body: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log(
                LogLevel::Error,
                &format!("internal error in {entry}: {msg}"),
            );
            on_panic
        }
    }
}

pub(crate) fn host() -> Option<Arc<dyn Host>> {
    HOST.read().clone()
}

pub(crate) fn require_host() -> Result<Arc<dyn Host>, Error> {
    host().ok_or(Error::NoHost)
}

/// Installs `new` as the host, unless an incoming context is set up.
pub(crate) fn install_host(new: Option<Arc<dyn Host>>) -> Result<(), Error> {
    let contexts = INCOMING.read();
    if contexts.values().any(|c| c.is_set_up()) {
        return Err(Error::HostBusy);
    }
    *HOST.write() = new;
    Ok(())
}

/// Logs through the host's hook when one is registered, else to stderr.
pub(crate) fn log(level: LogLevel, msg: &str) {
    match host() {
        Some(h) => h.log(level, msg),
        None => default_log(level, msg),
    }
}

/// Reports `err` from `entry`: into `*errp` when the host can set it, else to the log.
pub(crate) fn report(entry: &str, errp: *mut *mut ErrorRef, err: &Error) {
    let msg = err.to_string();
    let set =
        !errp.is_null() && host().is_some_and(|h| h.set_error(ErrorSlot(errp as usize), &msg));
    if !set {
        log(LogLevel::Error, &format!("{entry}: {msg}"));
    }
}

/// Logs `err` from an entrypoint whose signature has no error channel beyond a code.
pub(crate) fn log_err(entry: &str, err: &Error) {
    log(LogLevel::Error, &format!("{entry}: {err}"));
}

/// `-errno` for int-returning entrypoints, logged.
pub(crate) fn fail(entry: &str, err: Error) -> i32 {
    log_err(entry, &err);
    -err.errno()
}

/// 0 for success, else the logged `-errno` of the error.
pub(crate) fn status(entry: &str, result: Result<(), Error>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => fail(entry, e),
    }
}

/// The fd of a caller's `PostCopyFD` and the block id of `rb`, both required.
pub(crate) fn shared_fd_and_block(
    pcfd: *const types::PostCopyFdRef,
    rb: *const types::RamBlockRef,
) -> Result<(std::os::fd::RawFd, crate::host::BlockId), Error> {
    if pcfd.is_null() {
        return Err(Error::NullPointer("pcfd"));
    }
    if rb.is_null() {
        return Err(Error::NullPointer("rb"));
    }
    // SAFETY: non-NULL; reading the fd field of the caller's PostCopyFD.
    let fd = unsafe { (*pcfd).fd };
    Ok((fd, crate::host::BlockId(rb as usize)))
}

/// The C string at `p` as UTF-8 (lossy), or the NullPointer error naming `what`.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid for the call.
pub(crate) unsafe fn c_str(p: *const c_char, what: &'static str) -> Result<String, Error> {
    if p.is_null() {
        return Err(Error::NullPointer(what));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Records the context most recently used; written only when it changes (the common case
/// is one context).
fn set_current_mis(mis: usize) {
    if CURRENT_MIS.load(Ordering::Acquire) != mis {
        CURRENT_MIS.publish(mis);
    }
}

/// The incoming context of `mis`, created (with the current host) when absent or when it
/// belongs to a host that has since been replaced.
pub(crate) fn incoming_for(mis: usize) -> Result<Arc<Incoming>, Error> {
    let host = require_host()?;
    if let Some(c) = INCOMING.read().get(&mis) {
        if Arc::ptr_eq(&c.host, &host) {
            set_current_mis(mis);
            return Ok(c.clone());
        }
    }
    let mut map = INCOMING.write();
    let entry = map.entry(mis).or_insert_with(|| {
        Arc::new(Incoming::new(
            mis,
            host.clone(),
            NOTIFIERS.clone(),
            SHARED_UFDS.clone(),
        ))
    });
    if !Arc::ptr_eq(&entry.host, &host) && !entry.is_set_up() {
        *entry = Arc::new(Incoming::new(
            mis,
            host,
            NOTIFIERS.clone(),
            SHARED_UFDS.clone(),
        ));
    }
    // Under the write lock: per-thread caches of the map (with_existing_incoming) are stale.
    INCOMING_GENERATION.fetch_add(1, Ordering::AcqRel);
    set_current_mis(mis);
    Ok(entry.clone())
}

/// The existing incoming context of `mis`, without creating one.
pub(crate) fn existing_incoming(mis: usize) -> Option<Arc<Incoming>> {
    INCOMING.read().get(&mis).cloned()
}

/// Bumped whenever an entry of INCOMING is added or replaced.
static INCOMING_GENERATION: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The context this thread looked up last, with the generation it was valid in. Taken
    /// out while in use (a nested lookup on the same thread finds it empty and takes the
    /// slow path), so the fast path costs no atomic read-modify-write.
    static LAST_INCOMING: Cell<Option<(usize, u64, Arc<Incoming>)>> = const { Cell::new(None) };
}

/// `existing_incoming` for the per-page entrypoints (placement): a one-entry per-thread
/// cache instead of the table's lock, hash and reference count, which cost as much as a
/// quarter of a zero-page placement. The cache holds a context the table holds too (or
/// one replaced while not set up, which has nothing to release).
#[inline]
pub(crate) fn with_existing_incoming<R>(mis: usize, f: impl FnOnce(Option<&Incoming>) -> R) -> R {
    let generation = INCOMING_GENERATION.load(Ordering::Acquire);
    let mut f = Some(f);
    let cached = LAST_INCOMING.try_with(|cell| {
        let inc = match cell.take() {
            Some((m, g, inc)) if m == mis && g == generation => Some(inc),
            _ => existing_incoming(mis),
        };
        let f = f.take().expect("called once");
        let r = f(inc.as_deref());
        if let Some(inc) = inc {
            cell.set(Some((mis, generation, inc)));
        }
        r
    });
    match cached {
        Ok(r) => r,
        // This thread's cache is gone (the thread is exiting): the table itself.
        Err(_) => (f.take().expect("not called"))(existing_incoming(mis).as_deref()),
    }
}

/// The set-up context whose blocks include `block`, else the current one.
pub(crate) fn incoming_for_block(block: crate::host::BlockId) -> Result<Arc<Incoming>, Error> {
    let map = INCOMING.read();
    if let Some(c) = map
        .values()
        .find(|c| c.is_set_up() && c.blocks().is_some_and(|t| t.find_id(block).is_some()))
    {
        return Ok(c.clone());
    }
    map.get(&CURRENT_MIS.load(Ordering::Acquire))
        .cloned()
        .ok_or(Error::NotSetUp)
}
