//! The standalone host's C API (not part of QEMU's header): for C VMMs and harnesses
//! without QEMU's machinery.
use super::types::{
    ErrorRef, MigrationIncomingStateRef, MigrationStateRef, QemuFileRef, RamBlockRef,
};
use super::{c_str, existing_incoming, fail, guard, install_host, status};
use crate::error::Error;
use crate::host::{BlockId, Host, LogLevel, PreemptConnect};
use crate::standalone::{PostcopyPageRequest, StandaloneError, StandaloneHost};
use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

/// A standalone host (opaque). Created by postcopy_standalone_host_new.
pub struct PostcopyStandaloneHost {
    _private: [u8; 0],
}

/// Receives each page request: `rb` and its `idstr`, and the request record.
pub type PostcopyRequestFn = Option<
    unsafe extern "C" fn(
        opaque: *mut c_void,
        rb: *mut RamBlockRef,
        idstr: *const c_char,
        req: *const PostcopyPageRequest,
    ) -> c_int,
>;
/// Sends one discard command (source): `n` (start, length) pairs in bytes of block `name`.
pub type PostcopyDiscardFn = super::host_ops::PostcopySendDiscardFn;
/// Receives the library's log messages.
pub type PostcopyLogFn =
    Option<unsafe extern "C" fn(opaque: *mut c_void, level: c_int, msg: *const c_char)>;
/// Preempt hooks: connect (source; 0 connected, 1 pending, negative errno), load
/// (destination; 0 clean end, negative errno), shutdown (destination).
pub type PostcopyPreemptConnectFn =
    Option<unsafe extern "C" fn(opaque: *mut c_void, ms: *mut MigrationStateRef) -> c_int>;
pub type PostcopyPreemptLoadFn = Option<
    unsafe extern "C" fn(
        opaque: *mut c_void,
        mis: *mut MigrationIncomingStateRef,
        file: *mut QemuFileRef,
    ) -> c_int,
>;
pub type PostcopyPreemptShutdownFn = Option<
    unsafe extern "C" fn(
        opaque: *mut c_void,
        mis: *mut MigrationIncomingStateRef,
        file: *mut QemuFileRef,
    ),
>;

/// A caller's opaque pointer, carried into callbacks on other threads.
#[derive(Clone, Copy)]
struct Opaque(*mut c_void);
// SAFETY: the registration contract (doc comments) says callbacks are called from other
// threads with this pointer; the library never dereferences it.
unsafe impl Send for Opaque {}
// SAFETY: as above.
unsafe impl Sync for Opaque {}

/// # Safety
/// `p` is NULL or a pointer returned by postcopy_standalone_host_new, not yet freed.
unsafe fn host_ref<'a>(p: *const PostcopyStandaloneHost) -> Result<&'a StandaloneHost, Error> {
    if p.is_null() {
        return Err(Error::NullPointer("host"));
    }
    // SAFETY: p came from Arc::into_raw in postcopy_standalone_host_new and is still alive.
    Ok(unsafe { &*(p as *const StandaloneHost) })
}

/// Creates a standalone host with the guest's target page size in bytes (0: the host page
/// size). Free it with postcopy_standalone_host_free.
///
/// Thread: any. Returns NULL only on an internal error (logged).
#[no_mangle]
pub extern "C" fn postcopy_standalone_host_new(
    target_page_size: u64,
) -> *mut PostcopyStandaloneHost {
    guard("postcopy_standalone_host_new", std::ptr::null_mut(), || {
        Arc::into_raw(Arc::new(StandaloneHost::new(target_page_size)))
            as *mut PostcopyStandaloneHost
    })
}

/// Drops the caller's reference. An installed host stays alive (and registered) until
/// another host is registered or postcopy_host_unregister is called.
///
/// Thread: any. NULL is ignored.
#[no_mangle]
pub extern "C" fn postcopy_standalone_host_free(host: *mut PostcopyStandaloneHost) {
    guard("postcopy_standalone_host_free", (), || {
        if !host.is_null() {
            // SAFETY: host came from Arc::into_raw and the caller gives its reference up.
            drop(unsafe { Arc::from_raw(host as *const StandaloneHost) });
        }
    })
}

/// Registers the standalone host as the library's host (instead of a PostcopyHostOps table).
///
/// Thread: main thread. Returns 0; -EINVAL for NULL; -EBUSY while a context is set up.
#[no_mangle]
pub extern "C" fn postcopy_standalone_host_install(host: *mut PostcopyStandaloneHost) -> c_int {
    guard("postcopy_standalone_host_install", -libc::EFAULT, || {
        if host.is_null() {
            return fail(
                "postcopy_standalone_host_install",
                Error::NullPointer("host"),
            );
        }
        // SAFETY: host came from Arc::into_raw; take one more reference for the registration.
        let arc = unsafe {
            Arc::increment_strong_count(host as *const StandaloneHost);
            Arc::from_raw(host as *const StandaloneHost)
        };
        status("postcopy_standalone_host_install", install_host(Some(arc)))
    })
}

/// Adds a RAM block `idstr` of `length` bytes at `addr` with pages of `page_size` bytes,
/// backed by `fd` at `fd_offset` (fd -1: anonymous). Returns the block's `RAMBlock *`, valid
/// while the host lives.
///
/// Thread: main thread, before postcopy_ram_incoming_init. A block added later is accepted
/// but covered only from the next init or setup (placing into it fails with -EFAULT until
/// then). Returns NULL (logged) for NULL arguments (`addr` included), a name of 0 or more
/// than 255 bytes or already used, a misaligned, empty, partial-page, overlapping or
/// address-space-wrapping range, a page size that is not a power of two.
#[no_mangle]
pub extern "C" fn postcopy_standalone_add_ram_block(
    host: *mut PostcopyStandaloneHost,
    idstr: *const c_char,
    addr: *mut c_void,
    length: u64,
    page_size: u64,
    fd: c_int,
    fd_offset: u64,
) -> *mut RamBlockRef {
    guard(
        "postcopy_standalone_add_ram_block",
        std::ptr::null_mut(),
        || {
            // SAFETY: host is NULL or live (caller's contract); idstr NULL or a C string.
            let result = unsafe { host_ref(host) }
                .and_then(|h| Ok((h, unsafe { c_str(idstr, "idstr") }?)))
                .and_then(|(h, name)| {
                    h.add_block(&name, addr as usize, length, page_size, fd, fd_offset)
                });
            match result {
                Ok(b) => b.id().0 as *mut RamBlockRef,
                Err(e) => {
                    super::log_err("postcopy_standalone_add_ram_block", &e);
                    std::ptr::null_mut()
                }
            }
        },
    )
}

/// The block named `idstr`, or NULL.
///
/// Thread: any.
#[no_mangle]
pub extern "C" fn postcopy_standalone_block_by_name(
    host: *mut PostcopyStandaloneHost,
    idstr: *const c_char,
) -> *mut RamBlockRef {
    guard(
        "postcopy_standalone_block_by_name",
        std::ptr::null_mut(),
        || {
            // SAFETY: host is NULL or live; idstr NULL or a C string.
            let found = unsafe { host_ref(host) }
                .ok()
                .zip(unsafe { c_str(idstr, "idstr") }.ok())
                .and_then(|(h, n)| h.block_by_name(&n));
            found.map_or(std::ptr::null_mut(), |b| b.id().0 as *mut RamBlockRef)
        },
    )
}

/// The block added `index`-th (0-based; PostcopyPageRequest.block_index), or NULL.
///
/// Thread: any.
#[no_mangle]
pub extern "C" fn postcopy_standalone_block_at(
    host: *mut PostcopyStandaloneHost,
    index: u32,
) -> *mut RamBlockRef {
    guard("postcopy_standalone_block_at", std::ptr::null_mut(), || {
        // SAFETY: host is NULL or live.
        let found = unsafe { host_ref(host) }
            .ok()
            .and_then(|h| h.blocks().get(index as usize).cloned());
        found.map_or(std::ptr::null_mut(), |b| b.id().0 as *mut RamBlockRef)
    })
}

/// Page requests go to `cb(opaque, rb, idstr, req)`, called on the fault thread; return 0
/// or a negative errno (the request is sent again after the return path comes back).
///
/// Thread: main thread, before setup. Returns 0, or -EINVAL for NULL host or cb.
#[no_mangle]
pub extern "C" fn postcopy_standalone_set_request_callback(
    host: *mut PostcopyStandaloneHost,
    cb: PostcopyRequestFn,
    opaque: *mut c_void,
) -> c_int {
    guard(
        "postcopy_standalone_set_request_callback",
        -libc::EFAULT,
        || {
            // SAFETY: host is NULL or live.
            let r = unsafe { host_ref(host) }.and_then(|h| {
                let cb = cb.ok_or(Error::NullPointer("cb"))?;
                let opaque = Opaque(opaque);
                h.set_request_fn(Box::new(move |block, req| {
                    let o = opaque;
                    // SAFETY: the caller's callback with its opaque, a live block name and record.
                    let rc = unsafe {
                        cb(
                            o.0,
                            block.id().0 as *mut RamBlockRef,
                            block.idstr_c.as_ptr(),
                            req,
                        )
                    };
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(rc.abs())
                    }
                }));
                Ok(())
            });
            status("postcopy_standalone_set_request_callback", r)
        },
    )
}

/// Page requests are written to `fd` as one 32-byte PostcopyPageRequest each (one write(2),
/// so a pipe or socket keeps records whole). The library does not close `fd`.
///
/// Thread: main thread, before setup. Returns 0, or -EINVAL for NULL host or a negative fd.
#[no_mangle]
pub extern "C" fn postcopy_standalone_set_request_fd(
    host: *mut PostcopyStandaloneHost,
    fd: c_int,
) -> c_int {
    guard("postcopy_standalone_set_request_fd", -libc::EFAULT, || {
        // SAFETY: host is NULL or live.
        let r = unsafe { host_ref(host) }.and_then(|h| {
            if fd < 0 {
                return Err(Error::InvalidArgument(format!("request fd {fd}")));
            }
            h.set_request_fd(fd);
            Ok(())
        });
        status("postcopy_standalone_set_request_fd", r)
    })
}

/// Discard commands (source side) go to `cb`, called on the migration thread.
///
/// Thread: main thread. Returns 0, or -EINVAL for NULL host or cb.
#[no_mangle]
pub extern "C" fn postcopy_standalone_set_discard_callback(
    host: *mut PostcopyStandaloneHost,
    cb: PostcopyDiscardFn,
    opaque: *mut c_void,
) -> c_int {
    guard(
        "postcopy_standalone_set_discard_callback",
        -libc::EFAULT,
        || {
            // SAFETY: host is NULL or live.
            let r = unsafe { host_ref(host) }.and_then(|h| {
                let cb = cb.ok_or(Error::NullPointer("cb"))?;
                let opaque = Opaque(opaque);
                h.set_discard_fn(Box::new(move |ms, name, ranges| {
                    let o = opaque;
                    // SAFETY: the caller's callback, registered with this opaque.
                    unsafe { super::host_ops::call_send_discard(Some(cb), o.0, ms, name, ranges) }
                }));
                Ok(())
            });
            status("postcopy_standalone_set_discard_callback", r)
        },
    )
}

/// The library's messages go to `cb(opaque, level, msg)` (level: PostcopyLogLevel) instead
/// of stderr. NULL `cb` restores stderr.
///
/// Thread: any. Returns 0, or -EINVAL for a NULL host.
#[no_mangle]
pub extern "C" fn postcopy_standalone_set_log_callback(
    host: *mut PostcopyStandaloneHost,
    cb: PostcopyLogFn,
    opaque: *mut c_void,
) -> c_int {
    guard(
        "postcopy_standalone_set_log_callback",
        -libc::EFAULT,
        || {
            // SAFETY: host is NULL or live.
            let r = unsafe { host_ref(host) }.map(|h| match cb {
                None => h.set_log_fn(Box::new(crate::host::default_log)),
                Some(cb) => {
                    let opaque = Opaque(opaque);
                    h.set_log_fn(Box::new(move |level: LogLevel, msg: &str| {
                        let o = opaque;
                        let msg =
                            std::ffi::CString::new(msg.replace('\0', " ")).unwrap_or_default();
                        // SAFETY: the caller's callback with a live message.
                        unsafe { cb(o.0, level as c_int, msg.as_ptr()) }
                    }))
                }
            });
            status("postcopy_standalone_set_log_callback", r)
        },
    )
}

/// Preempt hooks (see PostcopyHostOps.preempt_*): any may be NULL.
///
/// Thread: main thread. Returns 0, or -EINVAL for a NULL host.
#[no_mangle]
pub extern "C" fn postcopy_standalone_set_preempt_callbacks(
    host: *mut PostcopyStandaloneHost,
    connect: PostcopyPreemptConnectFn,
    load: PostcopyPreemptLoadFn,
    shutdown: PostcopyPreemptShutdownFn,
    opaque: *mut c_void,
) -> c_int {
    guard(
        "postcopy_standalone_set_preempt_callbacks",
        -libc::EFAULT,
        || {
            // SAFETY: host is NULL or live.
            let r = unsafe { host_ref(host) }.map(|h| {
                let opaque = Opaque(opaque);
                h.set_preempt_hooks(
                    connect.map(|f| {
                        Box::new(move |ms: usize| {
                            let o = opaque;
                            // SAFETY: the caller's callback with its opaque.
                            match unsafe { f(o.0, ms as *mut MigrationStateRef) } {
                                0 => PreemptConnect::Ready,
                                rc if rc > 0 => PreemptConnect::Pending,
                                rc => PreemptConnect::Failed(-rc),
                            }
                        })
                            as Box<dyn Fn(usize) -> PreemptConnect + Send + Sync>
                    }),
                    load.map(|f| {
                        Box::new(move |mis: usize, file: usize| {
                            let o = opaque;
                            // SAFETY: the caller's callback with its opaque and its own pointers.
                            unsafe { f(o.0, mis as *mut _, file as *mut _) }
                        }) as Box<dyn Fn(usize, usize) -> i32 + Send + Sync>
                    }),
                    shutdown.map(|f| {
                        Box::new(move |mis: usize, file: usize| {
                            let o = opaque;
                            // SAFETY: the caller's callback with its opaque and its own pointers.
                            unsafe { f(o.0, mis as *mut _, file as *mut _) }
                        }) as Box<dyn Fn(usize, usize) + Send + Sync>
                    }),
                )
            });
            status("postcopy_standalone_set_preempt_callbacks", r)
        },
    )
}

/// Adds a vCPU (index and kernel thread id) for blocktime. Read at setup; blocktime ignores
/// a vCPU whose index is 2^20 or more.
///
/// Thread: main thread. Returns 0, or -EINVAL for a NULL host.
#[no_mangle]
pub extern "C" fn postcopy_standalone_add_vcpu(
    host: *mut PostcopyStandaloneHost,
    index: u32,
    tid: u32,
) -> c_int {
    guard("postcopy_standalone_add_vcpu", -libc::EFAULT, || {
        // SAFETY: host is NULL or live.
        status(
            "postcopy_standalone_add_vcpu",
            unsafe { host_ref(host) }.map(|h| h.add_vcpu(index, tid)),
        )
    })
}

/// Turns the blocktime and preempt capabilities on or off. Read at setup.
///
/// Thread: main thread. Returns 0, or -EINVAL for a NULL host.
#[no_mangle]
pub extern "C" fn postcopy_standalone_set_capabilities(
    host: *mut PostcopyStandaloneHost,
    blocktime: bool,
    preempt: bool,
) -> c_int {
    guard(
        "postcopy_standalone_set_capabilities",
        -libc::EFAULT,
        || {
            // SAFETY: host is NULL or live.
            status(
                "postcopy_standalone_set_capabilities",
                unsafe { host_ref(host) }.map(|h| h.set_capabilities(blocktime, preempt)),
            )
        },
    )
}

/// Reports the return path to the source up (`ok`) or down, and kicks the fault thread of
/// `mis` (may be NULL) so it pauses, or resumes and sends every outstanding request again.
///
/// Thread: any. Returns 0, or -EINVAL for a NULL host. A `mis` without a set-up context is
/// ignored.
#[no_mangle]
pub extern "C" fn postcopy_standalone_set_return_path(
    host: *mut PostcopyStandaloneHost,
    mis: *mut MigrationIncomingStateRef,
    ok: bool,
) -> c_int {
    guard("postcopy_standalone_set_return_path", -libc::EFAULT, || {
        // SAFETY: host is NULL or live.
        let r = unsafe { host_ref(host) }.map(|h| {
            h.set_return_path(ok);
            if let Some(inc) = existing_incoming(mis as usize) {
                let _ = inc.kick_fault_thread();
            }
        });
        status("postcopy_standalone_set_return_path", r)
    })
}

/// Is the page at byte `offset` of `rb` received? Returns 1 or 0 (0 for an offset past the
/// block's end); -EINVAL for NULL host, -EFAULT for an unknown (or NULL) block. Not logged.
///
/// Thread: any.
#[no_mangle]
pub extern "C" fn postcopy_standalone_page_received(
    host: *mut PostcopyStandaloneHost,
    rb: *mut RamBlockRef,
    offset: u64,
) -> c_int {
    guard("postcopy_standalone_page_received", -libc::EFAULT, || {
        // SAFETY: host is NULL or live.
        match unsafe { host_ref(host) }.and_then(|h| {
            h.page_received(BlockId(rb as usize), offset)
                .ok_or(Error::UnknownBlock(rb as usize))
        }) {
            Ok(v) => v as c_int,
            Err(e) => -e.errno(),
        }
    })
}

/// Marks `[offset, offset + length)` bytes of `rb` received without placing them (precopy
/// wrote them directly): every page the range touches. A length of 0 marks nothing.
///
/// Thread: the loading thread. Returns 0, or (logged, nothing marked) -EINVAL for NULL host
/// or a range past the block's end, -EFAULT for an unknown block.
#[no_mangle]
pub extern "C" fn postcopy_standalone_mark_received(
    host: *mut PostcopyStandaloneHost,
    rb: *mut RamBlockRef,
    offset: u64,
    length: u64,
) -> c_int {
    guard("postcopy_standalone_mark_received", -libc::EFAULT, || {
        // SAFETY: host is NULL or live.
        status(
            "postcopy_standalone_mark_received",
            unsafe { host_ref(host) }
                .and_then(|h| h.mark_received(BlockId(rb as usize), offset, length)),
        )
    })
}

/// Discards `[start, start + length)` bytes of `rb` on the destination (an incoming discard
/// command): clears the received bits and drops the memory.
///
/// Thread: main thread. Returns 0, or a negative errno (logged; the received bits are left
/// alone): -EINVAL for NULL host, a range past the block's end, or a start or length that
/// is not a multiple of the block's page size; -EFAULT for an unknown block; the errno of
/// the madvise/fallocate that drops the memory.
#[no_mangle]
pub extern "C" fn postcopy_standalone_discard_range(
    host: *mut PostcopyStandaloneHost,
    rb: *mut RamBlockRef,
    start: u64,
    length: u64,
) -> c_int {
    guard("postcopy_standalone_discard_range", -libc::EFAULT, || {
        // SAFETY: host is NULL or live.
        let r = unsafe { host_ref(host) }.and_then(|h| {
            let info = h
                .ram_block(BlockId(rb as usize))
                .ok_or(Error::UnknownBlock(rb as usize))?;
            h.discard_range(&info, start, length)
        });
        status("postcopy_standalone_discard_range", r)
    })
}

/// The message of an error the standalone host stored in an `Error **errp`.
///
/// Thread: any. Returns NULL for NULL.
#[no_mangle]
pub extern "C" fn postcopy_error_message(err: *const ErrorRef) -> *const c_char {
    guard("postcopy_error_message", std::ptr::null(), || {
        if err.is_null() {
            return std::ptr::null();
        }
        // SAFETY: with the standalone host, every Error the library hands out is a boxed
        // StandaloneError (caller's contract: err came from such an errp).
        unsafe { (*(err as *const StandaloneError)).message.as_ptr() }
    })
}

/// Frees an error the standalone host stored in an `Error **errp`. NULL is ignored.
///
/// Thread: any.
#[no_mangle]
pub extern "C" fn postcopy_error_free(err: *mut ErrorRef) {
    guard("postcopy_error_free", (), || {
        if !err.is_null() {
            // SAFETY: err is a StandaloneError boxed by StandaloneHost::set_error, freed once.
            drop(unsafe { Box::from_raw(err as *mut StandaloneError) });
        }
    })
}
