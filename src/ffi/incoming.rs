//! Incoming (destination) entrypoints: host probe, init, prepare_discard, setup, cleanup,
//! fault-thread notify, thread creation, and the stats the library adds.
use super::host_ops::CHost;
use super::types::{ErrorRef, MigrationIncomingStateRef, QemuThreadRef};
use super::{
    existing_incoming, fail, guard, host, incoming_for, log, report, require_host, status,
    NOTIFIERS,
};
use crate::error::Error;
use crate::host::{ErrorSlot, LogLevel};
use crate::incoming::supported_by_host;
use crate::requests::CounterSnapshot;
use std::ffi::{c_char, c_int, c_void, CStr};

/// Returns true if the host supports everything postcopy needs: target page size no larger
/// than the host's, userfaultfd available, every PROBE notifier agrees, huge-page support
/// when a block uses huge pages, block lengths whole pages, file-backed blocks only on tmpfs
/// or hugetlbfs, and a test registration offering WAKE, COPY and ZEROPAGE. Calls
/// munlockall() as QEMU does.
///
/// Thread: main thread. Errors: false, with `*errp` set to the cause (by the failing
/// notifier for PROBE); NULL `mis` is an error too. With no host registered there is no
/// way to set `*errp` (errors are a host service): false, the cause is logged and `*errp`
/// is left untouched; so is a NULL `errp`. Nothing leaks.
#[no_mangle]
pub extern "C" fn postcopy_ram_supported_by_host(
    mis: *mut MigrationIncomingStateRef,
    errp: *mut *mut ErrorRef,
) -> bool {
    guard("postcopy_ram_supported_by_host", false, || {
        let result = (|| {
            if mis.is_null() {
                return Err(Error::NullPointer("mis"));
            }
            let host = require_host()?;
            supported_by_host(&*host, &NOTIFIERS, ErrorSlot(errp as usize))
        })();
        match result {
            Ok(()) => true,
            Err(e @ Error::NotifierFailed { .. }) => {
                log(
                    LogLevel::Warning,
                    &format!("postcopy_ram_supported_by_host: {e}"),
                );
                false
            }
            Err(e) => {
                report("postcopy_ram_supported_by_host", errp, &e);
                false
            }
        }
    })
}

fn run(
    entry: &'static str,
    mis: *mut MigrationIncomingStateRef,
    f: impl FnOnce(&std::sync::Arc<crate::incoming::Incoming>) -> crate::Result<()>,
) -> c_int {
    guard(entry, -libc::EFAULT, || {
        if mis.is_null() {
            return fail(entry, Error::NullPointer("mis"));
        }
        status(entry, incoming_for(mis as usize).and_then(|inc| f(&inc)))
    })
}

/// Snapshots the host's RAM blocks (range, page size, length now) and discards their
/// contents so every page is missing. Call before any precopy RAM is loaded.
///
/// Calling it again before setup takes a new snapshot and discards again.
///
/// Thread: main thread. Returns 0, or a negative errno with the cause logged: NULL `mis`
/// (-EINVAL), no host (-ENODEV), invalid blocks (overlapping, misaligned: -EINVAL), a failed
/// discard (its errno), already set up (-EBUSY).
#[no_mangle]
pub extern "C" fn postcopy_ram_incoming_init(mis: *mut MigrationIncomingStateRef) -> c_int {
    run("postcopy_ram_incoming_init", mis, |inc| inc.init())
}

/// MADV_NOHUGEPAGE on every block (a transparent huge page would be half discarded), then
/// state DISCARD.
///
/// Needs no init (it reads the host's blocks when init has not run).
///
/// Thread: main thread. Returns 0, or a negative errno with the cause logged (NULL `mis`:
/// -EINVAL, no host: -ENODEV, madvise failure: its errno).
#[no_mangle]
pub extern "C" fn postcopy_ram_prepare_discard(mis: *mut MigrationIncomingStateRef) -> c_int {
    run("postcopy_ram_prepare_discard", mis, |inc| {
        inc.prepare_discard()
    })
}

/// Makes all of RAM fault into the fault thread: opens the userfaultfd (kernel-mode faults
/// included; THREAD_ID when offered), the kick eventfd, registers every block (COPY
/// required; ZEROPAGE recorded per block through the host), maps the temp pages (two with
/// preempt) and the zero page, starts blocktime when the host enables it, and starts the
/// fault thread (and the preempt thread with preempt).
///
/// Without init it snapshots the host's blocks itself (and discards nothing).
///
/// Thread: main thread. Returns 0, or a negative errno with the cause logged: NULL `mis`
/// (-EINVAL), no host (-ENODEV), userfaultfd unavailable, a registration refused (the
/// ioctl's errno: -EBUSY when another userfaultfd, e.g. another `mis`, covers the range),
/// already set up (-EBUSY). A failed setup leaves nothing behind (no fd, thread or mapping);
/// cleanup after it is still safe.
#[no_mangle]
pub extern "C" fn postcopy_ram_incoming_setup(mis: *mut MigrationIncomingStateRef) -> c_int {
    run("postcopy_ram_incoming_setup", mis, |inc| inc.setup())
}

/// Ends postcopy on the destination: with preempt, waits for outstanding requests (not when
/// the return path is down); stops and joins the fault thread; notifies INBOUND_END; gives
/// transparent huge pages back and unregisters every block; closes the fds and unmaps the
/// temp pages; last, when no block is left registered, calls the host's `restore_mlock`
/// (QEMU re-locks guest memory there). Blocktime figures stay readable until the next setup.
///
/// Thread: the thread that ends postcopy (QEMU: the listen thread, or the main thread).
/// Returns 0, or a negative errno with the cause logged (NULL `mis`: -EINVAL, an INBOUND_END
/// notifier failed, an unregistration failed); teardown completes either way. Safe to call
/// twice, after a failed setup, without setup (then only INBOUND_END is owed, after init),
/// or for a `mis` never seen (0, nothing done); it needs no registered host.
#[no_mangle]
pub extern "C" fn postcopy_ram_incoming_cleanup(mis: *mut MigrationIncomingStateRef) -> c_int {
    guard("postcopy_ram_incoming_cleanup", -libc::EFAULT, || {
        if mis.is_null() {
            return fail("postcopy_ram_incoming_cleanup", Error::NullPointer("mis"));
        }
        match existing_incoming(mis as usize) {
            None => 0,
            Some(inc) => match inc.cleanup() {
                Ok(()) => 0,
                Err(e) => fail("postcopy_ram_incoming_cleanup", e),
            },
        }
    })
}

/// Kicks the fault thread: it re-checks whether to quit and whether the return path is up
/// (call it after the host's return_path_ok answer changes).
///
/// Thread: any. Errors (logged): NULL `mis`, not set up (also after cleanup).
#[no_mangle]
pub extern "C" fn postcopy_fault_thread_notify(mis: *mut MigrationIncomingStateRef) {
    guard("postcopy_fault_thread_notify", (), || {
        let result = if mis.is_null() {
            Err(Error::NullPointer("mis"))
        } else {
            existing_incoming(mis as usize)
                .ok_or(Error::NotSetUp)
                .and_then(|inc| inc.kick_fault_thread())
        };
        if let Err(e) = result {
            super::log_err("postcopy_fault_thread_notify", &e);
        }
    })
}

struct ThreadStart {
    func: unsafe extern "C" fn(*mut c_void) -> *mut c_void,
    arg: *mut c_void,
    /// At most 15 bytes, as Linux keeps.
    name: Option<std::ffi::CString>,
    started: std::sync::mpsc::SyncSender<()>,
}

extern "C" fn thread_trampoline(p: *mut c_void) -> *mut c_void {
    // SAFETY: p is the Box<ThreadStart> leaked by postcopy_thread_create for this thread.
    let start = unsafe { Box::from_raw(p as *mut ThreadStart) };
    // The thread names itself, as QEMU's qemu_thread_start does: naming another thread
    // makes glibc open /proc/self/task/<tid>/comm (without O_CLOEXEC), naming oneself is
    // one prctl.
    if let Some(name) = &start.name {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
    let _ = start.started.send(());
    // SAFETY: the caller's thread function, with the argument it asked for (the mis).
    unsafe { (start.func)(start.arg) }
}

/// Creates a thread running `fn(mis)` named `name`, and returns once it has started.
/// With the host's thread_create hook the host does it its own way (QEMU: the thread
/// signals mis->thread_sync_event itself). Without it: a pthread whose `pthread_t` is
/// written to `thread->thread`. Despite its name, `joinable` carries QEMU's thread mode,
/// as QEMU's callers pass it: QEMU_THREAD_JOINABLE (0) keeps the thread joinable,
/// QEMU_THREAD_DETACHED (1) detaches it.
///
/// `name` may be NULL (the thread keeps its default name); a longer name is cut to the
/// 15 bytes Linux keeps. Needs no registered host.
///
/// Thread: main thread. Errors (logged; `*thread` untouched, nothing started): NULL `mis`,
/// `thread` or `fn`, pthread_create failure.
#[no_mangle]
pub extern "C" fn postcopy_thread_create(
    mis: *mut MigrationIncomingStateRef,
    thread: *mut QemuThreadRef,
    name: *const c_char,
    func: Option<unsafe extern "C" fn(arg: *mut c_void) -> *mut c_void>,
    joinable: c_int,
) {
    guard("postcopy_thread_create", (), || {
        let Some(func) = func else {
            return super::log_err("postcopy_thread_create", &Error::NullPointer("fn"));
        };
        if mis.is_null() || thread.is_null() {
            return super::log_err(
                "postcopy_thread_create",
                &Error::NullPointer(if mis.is_null() { "mis" } else { "thread" }),
            );
        }
        if let Some(h) = host() {
            if let Some(chost) = h.as_any().downcast_ref::<CHost>() {
                if let Some(create) = chost.ops().thread_create {
                    // SAFETY: the host's own thread hook, with the caller's arguments.
                    unsafe { create(chost.ops().opaque, mis, thread, name, Some(func), joinable) };
                    return;
                }
            }
        }
        let name = (!name.is_null()).then(|| {
            // SAFETY: name is a NUL-terminated string (caller's contract).
            let mut short = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
            short.truncate(15);
            std::ffi::CString::new(short).unwrap_or_default()
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let start = Box::into_raw(Box::new(ThreadStart {
            func,
            arg: mis.cast(),
            name,
            started: tx,
        }));
        // SAFETY: pthread_t is plain data; all-zero is a valid placeholder.
        let mut tid: libc::pthread_t = unsafe { std::mem::zeroed() };
        // SAFETY: tid is live; the trampoline takes ownership of `start` on success.
        let rc = unsafe {
            libc::pthread_create(&mut tid, std::ptr::null(), thread_trampoline, start.cast())
        };
        if rc != 0 {
            // SAFETY: the thread was not created, so `start` is still ours.
            drop(unsafe { Box::from_raw(start) });
            return log(
                LogLevel::Error,
                &format!(
                    "postcopy_thread_create: pthread_create failed: {}",
                    std::io::Error::from_raw_os_error(rc)
                ),
            );
        }
        // SAFETY: thread is non-NULL and points to the caller's QemuThread.
        unsafe { (*thread).thread = tid };
        if joinable != 0 {
            // SAFETY: tid is a live, not yet joined or detached thread.
            unsafe { libc::pthread_detach(tid) };
        }
        let _ = rx.recv();
    })
}

/// Counters of one incoming context (not part of QEMU's header).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PostcopyIncomingStats {
    /// Page faults read from the userfaultfd.
    pub faults: u64,
    /// Faults outside every RAM block (logged, never served).
    pub faults_outside_ram: u64,
    /// Faults on pages received by the time the fault thread looked.
    pub faults_already_received: u64,
    /// Faults on pages already requested (not sent again).
    pub duplicate_faults: u64,
    /// Page requests handed to the host.
    pub requests_sent: u64,
    /// Page requests the host failed to send.
    pub request_errors: u64,
    /// Requests sent again after the return path came back.
    pub resent_after_resume: u64,
    /// Times the fault thread paused for a broken return path.
    pub pauses: u64,
    /// Pages placed with UFFDIO_COPY.
    pub pages_placed: u64,
    /// Pages placed as zero pages.
    pub zero_pages_placed: u64,
    /// Placements that found the page present (EEXIST): woken, not failed.
    pub placed_already_present: u64,
    /// Messages from shared userfaultfds handed to their handlers.
    pub shared_faults: u64,
    /// Shared handlers that returned an error.
    pub shared_handler_errors: u64,
    /// Requests made through postcopy_request_shared_page.
    pub shared_requests: u64,
    /// Requests outstanding now.
    pub outstanding_requests: u64,
    /// 1 while the fault thread is paused for a broken return path.
    pub paused: u32,
    /// 1 while set up.
    pub set_up: u32,
}

impl PostcopyIncomingStats {
    fn from_parts(c: CounterSnapshot, outstanding: u64, paused: bool, set_up: bool) -> Self {
        PostcopyIncomingStats {
            faults: c.faults,
            faults_outside_ram: c.faults_outside_ram,
            faults_already_received: c.faults_already_received,
            duplicate_faults: c.duplicate_faults,
            requests_sent: c.requests_sent,
            request_errors: c.request_errors,
            resent_after_resume: c.resent_after_resume,
            pauses: c.pauses,
            pages_placed: c.pages_placed,
            zero_pages_placed: c.zero_pages_placed,
            placed_already_present: c.placed_already_present,
            shared_faults: c.shared_faults,
            shared_handler_errors: c.shared_handler_errors,
            shared_requests: c.shared_requests,
            outstanding_requests: outstanding,
            paused: paused as u32,
            set_up: set_up as u32,
        }
    }
}

/// Fills `*out` with the counters of `mis`'s incoming context (not part of QEMU's header).
/// Counters are reset by setup and stay readable after cleanup.
///
/// Thread: any. Returns 0; -EINVAL for NULL arguments; -ENOENT when `mis` has no context
/// (none of init, prepare_discard, setup or preempt_new_channel ran for it). Not logged.
#[no_mangle]
pub extern "C" fn postcopy_incoming_get_stats(
    mis: *mut MigrationIncomingStateRef,
    out: *mut PostcopyIncomingStats,
) -> c_int {
    guard("postcopy_incoming_get_stats", -libc::EFAULT, || {
        if mis.is_null() || out.is_null() {
            return -libc::EINVAL;
        }
        let Some(inc) = existing_incoming(mis as usize) else {
            return -libc::ENOENT;
        };
        let (outstanding, paused) = {
            let r = inc.requests.lock();
            (r.requested.len() as u64, r.paused)
        };
        let stats = PostcopyIncomingStats::from_parts(
            inc.counters.snapshot(),
            outstanding,
            paused,
            inc.is_set_up(),
        );
        // SAFETY: out is non-NULL and points to a writable PostcopyIncomingStats.
        unsafe { out.write(stats) };
        0
    })
}

/// The temp page of `channel` (RAM_CHANNEL_PRECOPY, or RAM_CHANNEL_POSTCOPY with preempt)
/// and the zero page, each of the largest block page size, for hosts that assemble a huge
/// page before placing it (QEMU's postcopy_tmp_pages[] / postcopy_tmp_zero_page). Not part
/// of QEMU's header.
///
/// Thread: any. Returns NULL (logged) when `mis` is NULL or not set up, or for a channel
/// without a temp page (RAM_CHANNEL_POSTCOPY without preempt, RAM_CHANNEL_MAX and above).
#[no_mangle]
pub extern "C" fn postcopy_incoming_temp_page(
    mis: *mut MigrationIncomingStateRef,
    channel: u32,
) -> *mut c_void {
    guard(
        "postcopy_incoming_temp_page",
        std::ptr::null_mut(),
        || match existing_incoming(mis as usize)
            .ok_or(Error::NotSetUp)
            .and_then(|i| i.temp_page(channel as usize))
        {
            Ok(p) => p as *mut c_void,
            Err(e) => {
                super::log_err("postcopy_incoming_temp_page", &e);
                std::ptr::null_mut()
            }
        },
    )
}

/// The zero page (see postcopy_incoming_temp_page). NULL (logged) when `mis` is NULL or not
/// set up.
#[no_mangle]
pub extern "C" fn postcopy_incoming_zero_page(mis: *mut MigrationIncomingStateRef) -> *mut c_void {
    guard(
        "postcopy_incoming_zero_page",
        std::ptr::null_mut(),
        || match existing_incoming(mis as usize)
            .ok_or(Error::NotSetUp)
            .and_then(|i| i.zero_page())
        {
            Ok(p) => p as *mut c_void,
            Err(e) => {
                super::log_err("postcopy_incoming_zero_page", &e);
                std::ptr::null_mut()
            }
        },
    )
}
