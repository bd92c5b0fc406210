//! Outgoing discard entrypoints (source): postcopy_discard_send_init/range/finish.
use super::types::MigrationStateRef;
use super::{c_str, guard, log, log_err, require_host};
use crate::discard::DiscardBatch;
use crate::error::Error;
use crate::host::LogLevel;
use crate::sync::Mutex;
use once_cell::sync::Lazy;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_ulong};

/// Per `MigrationState *`: the block being sent (None after finish) and running totals.
#[derive(Default)]
struct DiscardState {
    current: Option<DiscardBatch>,
    ranges: u64,
    commands: u64,
}

static DISCARDS: Lazy<Mutex<HashMap<usize, DiscardState>>> = Lazy::new(Default::default);

/// Starts the discards of RAM block `name` for the outgoing migration `ms`.
///
/// Thread: migration thread. Errors (logged; no batch is started): NULL `ms` or `name`, no
/// host registered. A batch still open for `ms` is abandoned with a warning.
#[no_mangle]
pub extern "C" fn postcopy_discard_send_init(ms: *mut MigrationStateRef, name: *const c_char) {
    guard("postcopy_discard_send_init", (), || {
        let start = || -> Result<(), Error> {
            if ms.is_null() {
                return Err(Error::NullPointer("ms"));
            }
            // SAFETY: the caller passes NULL or a NUL-terminated block name.
            let name = unsafe { c_str(name, "name") }?;
            let tps = require_host()?.target_page_size();
            let mut map = DISCARDS.lock();
            let state = map.entry(ms as usize).or_default();
            if let Some(old) = state.current.take() {
                log(LogLevel::Warning, &format!("postcopy_discard_send_init: discards of '{}' were never finished; abandoned", old.name()));
            }
            state.current = Some(DiscardBatch::new(&name, tps));
            Ok(())
        };
        if let Err(e) = start() {
            log_err("postcopy_discard_send_init", &e);
        }
    })
}

/// Queues `length` target pages from page `start` of the current block; sends a discard
/// command (through the host's send_discard) when 12 ranges are queued.
///
/// Thread: migration thread. Errors (logged; nothing queued): NULL `ms`, no init for `ms`,
/// length 0, a range whose byte size overflows, a failed send.
#[no_mangle]
pub extern "C" fn postcopy_discard_send_range(
    ms: *mut MigrationStateRef,
    start: c_ulong,
    length: c_ulong,
) {
    guard("postcopy_discard_send_range", (), || {
        if let Err(e) = with_batch(ms, false, |host, batch| {
            batch.add_range(start, length, |n, r| host.send_discard(ms as usize, n, r))
        }) {
            log_err("postcopy_discard_send_range", &e);
        }
    })
}

/// Sends whatever is queued for the current block and closes it.
///
/// Thread: migration thread. Errors (logged): NULL `ms`, no init for `ms`, a failed send.
#[no_mangle]
pub extern "C" fn postcopy_discard_send_finish(ms: *mut MigrationStateRef) {
    guard("postcopy_discard_send_finish", (), || {
        if let Err(e) = with_batch(ms, true, |host, batch| {
            batch.finish(|n, r| host.send_discard(ms as usize, n, r))
        }) {
            log_err("postcopy_discard_send_finish", &e);
        }
    })
}

/// Runs `f` on the open batch of `ms` with no library lock held (the host's send may
/// take its own locks), then puts the batch back unless `close`.
fn with_batch(
    ms: *mut MigrationStateRef,
    close: bool,
    f: impl FnOnce(&dyn crate::host::Host, &mut DiscardBatch) -> crate::Result<()>,
) -> crate::Result<()> {
    if ms.is_null() {
        return Err(Error::NullPointer("ms"));
    }
    let host = require_host()?;
    let mut batch = DISCARDS.lock().get_mut(&(ms as usize)).and_then(|s| s.current.take()).ok_or_else(|| {
        Error::InvalidArgument("no discard batch open for this MigrationState: call postcopy_discard_send_init first".into())
    })?;
    let (r0, c0) = (batch.ranges, batch.commands);
    let result = f(&*host, &mut batch);
    let mut map = DISCARDS.lock();
    let state = map.entry(ms as usize).or_default();
    state.ranges += batch.ranges - r0;
    state.commands += batch.commands - c0;
    if !close && state.current.is_none() {
        state.current = Some(batch);
    }
    result
}

/// Reads the discard totals of `ms` since its first init (not part of QEMU's header):
/// ranges queued and commands sent. Either output may be NULL.
///
/// Thread: any. Returns 0, or -ENOENT when `ms` never started a discard.
#[no_mangle]
pub extern "C" fn postcopy_discard_get_counts(
    ms: *mut MigrationStateRef,
    ranges: *mut u64,
    commands: *mut u64,
) -> c_int {
    guard("postcopy_discard_get_counts", -libc::EFAULT, || {
        let map = DISCARDS.lock();
        let Some(state) = map.get(&(ms as usize)) else {
            return -libc::ENOENT;
        };
        // SAFETY: each output is NULL or points to a writable u64 (caller's contract).
        unsafe {
            if !ranges.is_null() {
                *ranges = state.ranges;
            }
            if !commands.is_null() {
                *commands = state.commands;
            }
        }
        0
    })
}
