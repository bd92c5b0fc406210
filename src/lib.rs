//! postcopy-ram: QEMU's postcopy RAM migration module (`migration/postcopy-ram.c`),
//! re-implemented in Rust behind the identical C ABI.
//!
//! Layers (see DESIGN.md): `ffi` is the thin `extern "C"` boundary; the modules named after
//! the sections of QEMU's header are safe Rust that knows nothing of C; `sys` wraps each
//! kernel call; `host` is what the hypervisor provides.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod blocktime;
pub mod discard;
pub mod error;
pub mod fault_thread;
pub mod ffi;
pub mod host;
pub mod incoming;
pub mod notifiers;
pub mod placement;
pub mod preempt;
pub mod requests;
pub mod shared_ufds;
pub mod standalone;
pub mod state;
pub mod sync;
pub mod sys;

pub use error::{Error, Result};
