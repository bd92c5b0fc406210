//! The C types of QEMU's `migration/postcopy-ram.h`, and the hypervisor's opaque types.
//!
//! Types QEMU's header defines are emitted inside `#if !defined(QEMU_POSTCOPY_RAM_H)` (the
//! `qemu_header` cfg below is a header-generation marker, never enabled), so a C file may
//! include QEMU's header and then ours. Hypervisor types are forward typedefs, which C11
//! lets both headers repeat. Enum parameters cross the boundary as `...Arg` integers that
//! cbindgen prints with the enum's name: a Rust enum received from C with an unknown value
//! would be undefined behaviour.
#![allow(non_camel_case_types)]
use std::ffi::{c_char, c_int, c_uint, c_void};

/// The hypervisor's incoming-migration state (QEMU: `MigrationIncomingState`). Opaque: the
/// library only uses its address as a key.
pub struct MigrationIncomingState {
    _private: [u8; 0],
}

/// The hypervisor's outgoing-migration state (QEMU: `MigrationState`). Opaque.
pub struct MigrationState {
    _private: [u8; 0],
}

/// A RAM block of the hypervisor (QEMU: `RAMBlock`). Opaque: described by the host ops.
pub struct RAMBlock {
    _private: [u8; 0],
}

/// A migration stream of the hypervisor (QEMU: `QEMUFile`). Opaque.
pub struct QEMUFile {
    _private: [u8; 0],
}

/// An error object of the hypervisor (QEMU: `Error`). Opaque; set through the host ops. The
/// standalone host's errors are read with `postcopy_error_message`.
pub struct Error {
    _private: [u8; 0],
}

pub type MigrationIncomingStateRef = MigrationIncomingState;
pub type MigrationStateRef = MigrationState;
pub type RamBlockRef = RAMBlock;
pub type QemuFileRef = QEMUFile;
pub type ErrorRef = Error;
pub type QemuThreadRef = QemuThread;
pub type NotifierWithReturnRef = NotifierWithReturn;
pub type PostCopyFdRef = PostCopyFD;

/// QEMU's POSIX `QemuThread`. The library writes the new thread's `pthread_t` into it when
/// the host has no thread hook.
#[cfg(not(feature = "qemu_thread_posix"))]
#[repr(C)]
pub struct QemuThread {
    pub thread: libc::pthread_t,
}

/// The notifier callback type: `int (*)(NotifierWithReturn *n, void *data, Error **errp)`.
#[cfg(not(feature = "qemu_notify"))]
pub type NotifierWithReturnFunc = Option<
    unsafe extern "C" fn(
        notifier: *mut NotifierWithReturnRef,
        data: *mut c_void,
        errp: *mut *mut ErrorRef,
    ) -> c_int,
>;

/// QEMU's QLIST_ENTRY(NotifierWithReturn). The library does not link notifiers through it.
#[cfg(not(feature = "qemu_notify"))]
#[repr(C)]
pub struct NotifierWithReturnNode {
    pub le_next: *mut NotifierWithReturnRef,
    pub le_prev: *mut *mut NotifierWithReturnRef,
}

/// QEMU's `NotifierWithReturn`; the library reads `notify` only.
#[cfg(not(feature = "qemu_notify"))]
#[repr(C)]
pub struct NotifierWithReturn {
    pub notify: NotifierWithReturnFunc,
    pub node: NotifierWithReturnNode,
}

/// QEMU's `MigrationStatus`, numbered as at the seed (QEMU 9.1 to 10.1). A host on another
/// QEMU gives its own numbers for the two paused states in the host ops.
#[cfg(not(any(feature = "qemu_header", feature = "qapi_migration")))]
#[repr(C)]
pub enum MigrationStatus {
    MIGRATION_STATUS_NONE = 0,
    MIGRATION_STATUS_SETUP = 1,
    MIGRATION_STATUS_CANCELLING = 2,
    MIGRATION_STATUS_CANCELLED = 3,
    MIGRATION_STATUS_ACTIVE = 4,
    MIGRATION_STATUS_POSTCOPY_ACTIVE = 5,
    MIGRATION_STATUS_POSTCOPY_PAUSED = 6,
    MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP = 7,
    MIGRATION_STATUS_POSTCOPY_RECOVER = 8,
    MIGRATION_STATUS_COMPLETED = 9,
    MIGRATION_STATUS_FAILED = 10,
    MIGRATION_STATUS_COLO = 11,
    MIGRATION_STATUS_PRE_SWITCHOVER = 12,
    MIGRATION_STATUS_DEVICE = 13,
    MIGRATION_STATUS_WAIT_UNPLUG = 14,
    MIGRATION_STATUS__MAX = 15,
}

/// Where the destination is in the postcopy protocol.
#[cfg(not(feature = "qemu_header"))]
#[repr(C)]
pub enum PostcopyState {
    /// Initial state - no postcopy
    POSTCOPY_INCOMING_NONE = 0,
    POSTCOPY_INCOMING_ADVISE,
    POSTCOPY_INCOMING_DISCARD,
    POSTCOPY_INCOMING_LISTENING,
    POSTCOPY_INCOMING_RUNNING,
    POSTCOPY_INCOMING_END,
}

/// Why the postcopy notifiers are called.
#[cfg(not(feature = "qemu_header"))]
#[repr(C)]
pub enum PostcopyNotifyReason {
    POSTCOPY_NOTIFY_PROBE = 0,
    POSTCOPY_NOTIFY_INBOUND_ADVISE,
    POSTCOPY_NOTIFY_INBOUND_LISTEN,
    POSTCOPY_NOTIFY_INBOUND_END,
}

/// What a postcopy notifier receives as `data`.
#[cfg(not(feature = "qemu_header"))]
#[repr(C)]
pub struct PostcopyNotifyData {
    pub reason: PostcopyNotifyReasonArg,
}

/// Called for each message read from a shared userfaultfd; `ufd` points to a
/// `struct uffd_msg`.
#[cfg(not(feature = "qemu_header"))]
pub type pcfdhandler =
    Option<unsafe extern "C" fn(pcfd: *mut PostCopyFdRef, ufd: *mut c_void) -> c_int>;

/// Called when a page of `rb` at `offset` arrived, to wake the shared client.
#[cfg(not(feature = "qemu_header"))]
pub type pcfdwake = Option<
    unsafe extern "C" fn(pcfd: *mut PostCopyFdRef, rb: *mut RamBlockRef, offset: u64) -> c_int,
>;

/// A userfaultfd owned by another process (vhost-user backend), registered for postcopy.
#[cfg(not(feature = "qemu_header"))]
#[repr(C)]
pub struct PostCopyFD {
    pub fd: c_int,
    /// Data to pass to handler
    pub data: *mut c_void,
    /// Handler to be called whenever we get a poll event
    pub handler: pcfdhandler,
    /// Notification to wake shared client
    pub waker: pcfdwake,
    /// A string to use in error messages
    pub idstr: *const c_char,
}

/// Migration channels when postcopy preempt is on.
#[cfg(not(feature = "qemu_header"))]
#[repr(C)]
pub enum PostcopyChannels {
    RAM_CHANNEL_PRECOPY = 0,
    RAM_CHANNEL_POSTCOPY = 1,
    RAM_CHANNEL_MAX,
}

/// `PostcopyState` as received from or returned to C.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostcopyStateArg(pub c_uint);

/// `enum PostcopyNotifyReason` as received from C.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostcopyNotifyReasonArg(pub c_uint);

/// `MigrationStatus` as received from C.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationStatusArg(pub c_uint);
