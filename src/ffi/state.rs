//! State entrypoints: postcopy_state_get/set, postcopy_is_paused, postcopy_infrastructure_init.
use super::types::{MigrationStatusArg, PostcopyStateArg};
use super::{guard, host, log, NOTIFIERS, SHARED_UFDS};
use crate::host::{
    LogLevel, MIGRATION_STATUS_POSTCOPY_PAUSED, MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP,
};
use crate::state::{State, POSTCOPY_STATE};

/// Returns the current postcopy state (load-acquire).
///
/// Thread: any. Errors: none.
#[no_mangle]
pub extern "C" fn postcopy_state_get() -> PostcopyStateArg {
    guard("postcopy_state_get", PostcopyStateArg(0), || {
        PostcopyStateArg(POSTCOPY_STATE.get() as u32)
    })
}

/// Sets the state atomically and returns the old state.
///
/// Thread: any (in QEMU the main thread, then the listen thread).
/// Errors: a value outside PostcopyState leaves the state unchanged, is logged, and the
/// current state is returned.
#[no_mangle]
pub extern "C" fn postcopy_state_set(new_state: PostcopyStateArg) -> PostcopyStateArg {
    guard(
        "postcopy_state_set",
        PostcopyStateArg(0),
        || match State::from_raw(new_state.0) {
            Some(s) => PostcopyStateArg(POSTCOPY_STATE.set(s) as u32),
            None => {
                log(
                    LogLevel::Error,
                    &format!(
                        "postcopy_state_set: unknown PostcopyState value {}; state unchanged",
                        new_state.0
                    ),
                );
                PostcopyStateArg(POSTCOPY_STATE.get() as u32)
            }
        },
    )
}

/// True for the MigrationStatus values of postcopy-paused and postcopy-recover-setup, as
/// the registered host numbers them (default: the seed's 6 and 7).
///
/// Thread: any. Errors: none; unknown values are simply not paused.
#[no_mangle]
pub extern "C" fn postcopy_is_paused(status: MigrationStatusArg) -> bool {
    guard("postcopy_is_paused", false, || {
        let paused = host().map_or(
            [
                MIGRATION_STATUS_POSTCOPY_PAUSED,
                MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP,
            ],
            |h| h.paused_statuses(),
        );
        paused.contains(&status.0)
    })
}

/// Initialises the library's tables: empties the notifier list and the shared-userfaultfd
/// registry and sets the state to NONE. Call once at start, before any device
/// initialisation (QEMU: qemu_init_subsystems).
///
/// Thread: main thread. Errors: none. Calling it again resets the tables.
#[no_mangle]
pub extern "C" fn postcopy_infrastructure_init() {
    guard("postcopy_infrastructure_init", (), || {
        NOTIFIERS.clear();
        SHARED_UFDS.clear();
        POSTCOPY_STATE.set(State::None);
    })
}
