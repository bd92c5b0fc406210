//! Preempt-channel entrypoints.
use super::types::{MigrationIncomingStateRef, MigrationStateRef, QemuFileRef};
use super::{existing_incoming, guard, log, log_err, require_host};
use crate::error::Error;
use crate::host::LogLevel;
use crate::preempt::PreemptSrc;
use crate::sync::Mutex;
use once_cell::sync::Lazy;
use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::Arc;

/// Source-side channel state per `MigrationState *`.
static SOURCES: Lazy<Mutex<HashMap<usize, Arc<PreemptSrc>>>> = Lazy::new(Default::default);

fn source(ms: usize) -> Arc<PreemptSrc> {
    SOURCES.lock().entry(ms).or_default().clone()
}

/// Destination: the source connected the preempt channel `file`. The preempt thread loads
/// urgent pages from it (through the host's preempt_load); after a failure, a new channel
/// handed over here resumes it.
///
/// The incoming context of `mis` is created if it has none yet; a channel handed over
/// before setup is loaded once setup starts the preempt thread (with the capability on).
///
/// Thread: main thread. Errors (logged; nothing recorded): NULL arguments, no host
/// registered.
#[no_mangle]
pub extern "C" fn postcopy_preempt_new_channel(
    mis: *mut MigrationIncomingStateRef,
    file: *mut QemuFileRef,
) {
    guard("postcopy_preempt_new_channel", (), || {
        if mis.is_null() || file.is_null() {
            return log_err(
                "postcopy_preempt_new_channel",
                &Error::NullPointer(if mis.is_null() { "mis" } else { "file" }),
            );
        }
        match super::incoming_for(mis as usize) {
            Ok(inc) => {
                inc.host
                    .preempt_channel_arrived(mis as usize, file as usize);
                inc.preempt.new_channel(file as usize)
            }
            Err(e) => log_err("postcopy_preempt_new_channel", &e),
        }
    })
}

/// Source: start opening the preempt channel of `s` (through the host's preempt_connect,
/// which may finish later and report with postcopy_preempt_channel_result).
///
/// Thread: migration thread or main thread. Errors (logged): NULL `s`, no host; a failed
/// connect (a host without a connect hook fails with ENOTSUP) is recorded, not logged here,
/// and returned by postcopy_preempt_establish_channel.
#[no_mangle]
pub extern "C" fn postcopy_preempt_setup(s: *mut MigrationStateRef) {
    guard("postcopy_preempt_setup", (), || {
        if s.is_null() {
            return log_err("postcopy_preempt_setup", &Error::NullPointer("s"));
        }
        match require_host() {
            Ok(host) => source(s as usize).setup(&*host, s as usize),
            Err(e) => log_err("postcopy_preempt_setup", &e),
        }
    })
}

/// Source: returns 0 at once when preempt is off; otherwise starts the connect if nobody
/// has and waits until the channel exists (0) or failed (-1, reason logged).
///
/// A connect that reported "pending" blocks this call until the host calls
/// postcopy_preempt_channel_result for `s`. The outcome is consumed: the next call (a
/// resume) starts a new connect.
///
/// Thread: migration thread (it blocks). Errors: -1 for NULL `s`, no host, or a failed
/// connect, each logged.
#[no_mangle]
pub extern "C" fn postcopy_preempt_establish_channel(s: *mut MigrationStateRef) -> c_int {
    guard("postcopy_preempt_establish_channel", -1, || {
        if s.is_null() {
            log_err(
                "postcopy_preempt_establish_channel",
                &Error::NullPointer("s"),
            );
            return -1;
        }
        let result =
            require_host().and_then(|host| source(s as usize).establish(&*host, s as usize));
        match result {
            Ok(()) => 0,
            Err(e) => {
                log_err("postcopy_preempt_establish_channel", &e);
                -1
            }
        }
    })
}

/// Source: the host's asynchronous result of connecting the preempt channel of `s`: 0 for
/// connected, a negative errno for failed (not part of QEMU's header; any non-zero value is
/// a failure, logged, a positive one read as an errno). Wakes
/// postcopy_preempt_establish_channel. Calling postcopy_preempt_setup again starts over.
///
/// Thread: any (QEMU: the main loop's connect callback). Needs no host. Errors (logged):
/// NULL `s`.
#[no_mangle]
pub extern "C" fn postcopy_preempt_channel_result(s: *mut MigrationStateRef, rc: c_int) {
    guard("postcopy_preempt_channel_result", (), || {
        if s.is_null() {
            return log_err("postcopy_preempt_channel_result", &Error::NullPointer("s"));
        }
        if rc != 0 {
            log(
                LogLevel::Warning,
                &format!(
                    "postcopy preempt channel failed to connect: {}",
                    std::io::Error::from_raw_os_error(rc.abs())
                ),
            );
        }
        source(s as usize).complete(rc);
    })
}

/// Destination: how many preempt channels `mis` has been handed (not part of QEMU's
/// header); more than one means it reconnected after a failure.
///
/// Thread: any. Returns the count, or -ENOENT when `mis` is NULL or has no context. Not
/// logged.
#[no_mangle]
pub extern "C" fn postcopy_preempt_channels_seen(mis: *mut MigrationIncomingStateRef) -> i64 {
    guard(
        "postcopy_preempt_channels_seen",
        -libc::EFAULT as i64,
        || match existing_incoming(mis as usize) {
            Some(inc) => inc.preempt.channels_seen() as i64,
            None => -libc::ENOENT as i64,
        },
    )
}
