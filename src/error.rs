//! The library's error type. Core code returns `Result<T, Error>`; the C layer turns it
//! into the signature's channel (errp message, `-errno`, `false`).
use std::io;

/// Everything that can go wrong, with the message a hypervisor developer would want in
/// a log or an `Error **errp`.
///
/// cbindgen:ignore
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} must not be NULL")]
    NullPointer(&'static str),
    #[error("unknown {kind} value {value}")]
    InvalidEnum { kind: &'static str, value: i64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(
        "userfaultfd not available: {0} (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1 \
         for the syscall, or read/write access to /dev/userfaultfd)"
    )]
    UffdUnavailable(io::Error),
    #[error("{op}: {source}")]
    Os {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("address {addr:#x} is outside every RAM block registered for postcopy")]
    OutsideRam { addr: u64 },
    #[error(
        "address {addr:#x} is not aligned to the {page_size:#x}-byte pages of RAM block '{block}'"
    )]
    Misaligned {
        addr: u64,
        page_size: u64,
        block: String,
    },
    #[error("RAM block {0:#x} is not one the host listed for postcopy")]
    UnknownBlock(usize),
    #[error("postcopy incoming is not set up: call postcopy_ram_incoming_setup first")]
    NotSetUp,
    #[error("postcopy incoming is already set up for this MigrationIncomingState")]
    AlreadySetUp,
    #[error("no host ops registered: call postcopy_host_register or postcopy_standalone_host_install first")]
    NoHost,
    #[error("the host ops table is busy: an incoming postcopy context is still set up")]
    HostBusy,
    #[error("{what} failed in the host: {}", std::io::Error::from_raw_os_error(errno.abs()))]
    Host { what: &'static str, errno: i32 },
    #[error("a postcopy {reason} notifier failed with {rc}")]
    NotifierFailed { reason: &'static str, rc: i32 },
}

impl Error {
    /// Wraps the current `errno` with the name of the operation that failed.
    pub fn last_os(op: impl Into<String>) -> Self {
        Error::Os {
            op: op.into(),
            source: io::Error::last_os_error(),
        }
    }

    pub fn os(op: impl Into<String>, source: io::Error) -> Self {
        Error::Os {
            op: op.into(),
            source,
        }
    }

    /// The positive errno that best describes this error, for `-errno` returns.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NullPointer(_) | Error::InvalidEnum { .. } | Error::InvalidArgument(_) => {
                libc::EINVAL
            }
            Error::UffdUnavailable(e) | Error::Os { source: e, .. } => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::Unsupported(_) => libc::ENOSYS,
            Error::OutsideRam { .. } | Error::UnknownBlock(_) => libc::EFAULT,
            Error::Misaligned { .. } => libc::EINVAL,
            Error::NotSetUp | Error::NoHost => libc::ENODEV,
            Error::AlreadySetUp | Error::HostBusy => libc::EBUSY,
            Error::Host { errno, .. } => (*errno).abs().max(1),
            Error::NotifierFailed { rc, .. } => {
                if *rc < 0 {
                    -*rc
                } else {
                    libc::EIO
                }
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
