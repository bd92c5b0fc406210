//! userfaultfd(2): open, API handshake, register, UFFDIO_COPY / ZEROPAGE / WAKE, reads.
//!
//! Kernel structures and ioctl numbers come from the `userfaultfd` crate's raw layer; the
//! typed layer is ours because postcopy needs what the crate's does not give: the kernel's
//! feature mask, kernel-mode faults (no USER_MODE_ONLY), raw `uffd_msg` for shared fds'
//! handlers, and EEXIST/EAGAIN told apart from failures.
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use userfaultfd_sys as raw;

pub use raw::uffd_msg as UffdMsg;

pub const FEATURE_THREAD_ID: u64 = raw::UFFD_FEATURE_THREAD_ID;
pub const FEATURE_MISSING_HUGETLBFS: u64 = raw::UFFD_FEATURE_MISSING_HUGETLBFS;
pub const FEATURE_MISSING_SHMEM: u64 = raw::UFFD_FEATURE_MISSING_SHMEM;
pub const IOCTL_WAKE: u64 = 1 << raw::_UFFDIO_WAKE;
pub const IOCTL_COPY: u64 = 1 << raw::_UFFDIO_COPY;
pub const IOCTL_ZEROPAGE: u64 = 1 << raw::_UFFDIO_ZEROPAGE;
pub const EVENT_PAGEFAULT: u8 = raw::UFFD_EVENT_PAGEFAULT;
/// Size of one `struct uffd_msg`: the unit of every read from a userfaultfd.
pub const MSG_SIZE: usize = std::mem::size_of::<raw::uffd_msg>();

/// `_IO(USERFAULTFD_IOC, 0x00)`: /dev/userfaultfd's "new userfaultfd" ioctl.
const USERFAULTFD_IOC_NEW: libc::c_ulong = (raw::USERFAULTFD_IOC as libc::c_ulong) << 8;

/// EAGAIN retries before a placement gives up: the kernel returns EAGAIN while the
/// mapping changes under it (a concurrent MADV_REMOVE, say); it settles quickly.
const EAGAIN_RETRIES: u32 = 10_000;

/// What UFFDIO_API answered.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApiInfo {
    pub features: u64,
    pub ioctls: u64,
}

/// How a placement ended when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// The kernel filled the range and woke its waiters.
    Filled,
    /// The page was already present (EEXIST); its waiters were woken explicitly.
    AlreadyPresent,
}

/// How a run placement ([`Userfaultfd::copy_pages`]) ended.
#[derive(Debug, Default)]
pub struct RunOutcome {
    /// Bytes from the start of the run now in place (filled or already present).
    pub done: u64,
    /// Pages among them that were already present (EEXIST), woken explicitly.
    pub present: u64,
    /// Why the run stopped before its end.
    pub error: Option<io::Error>,
}

/// A userfaultfd owned by the library; closing it drops every registration it holds.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    api: ApiInfo,
}

fn open_raw(flags: libc::c_int) -> io::Result<OwnedFd> {
    // /dev/userfaultfd first: it works where the syscall is restricted by
    // vm.unprivileged_userfaultfd; fall back to the syscall as QEMU does.
    let dev_err = match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW on the device fd we just opened takes the flags as
            // its integer argument and touches no memory of ours; the result is checked.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if fd >= 0 {
                // SAFETY: the ioctl returned a new fd that nobody else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            io::Error::last_os_error()
        }
        Err(e) => e,
    };
    // SAFETY: the userfaultfd syscall takes only flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    if fd < 0 {
        let sys_err = io::Error::last_os_error();
        // Report the more telling of the two failures.
        return Err(if sys_err.raw_os_error() == Some(libc::ENOSYS) {
            dev_err
        } else {
            sys_err
        });
    }
    // SAFETY: the syscall returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn api_handshake(fd: RawFd, features: u64) -> io::Result<ApiInfo> {
    let mut api = raw::uffdio_api {
        api: raw::UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes the live uffdio_api we pass.
    super::cvt(unsafe { libc::ioctl(fd, raw::UFFDIO_API as _, &mut api) })?;
    Ok(ApiInfo {
        features: api.features,
        ioctls: api.ioctls,
    })
}

impl Userfaultfd {
    /// Asks the kernel which features a userfaultfd offers, using a throw-away fd (the API
    /// handshake can be made once per fd).
    pub fn probe_features() -> io::Result<ApiInfo> {
        let fd = open_raw(libc::O_CLOEXEC)?;
        api_handshake(fd.as_raw_fd(), 0)
    }

    /// Opens a close-on-exec userfaultfd that also receives kernel-mode faults (KVM, vhost),
    /// and performs the API handshake asking for `wanted & offered` features.
    pub fn open(nonblocking: bool, wanted_features: u64) -> io::Result<Self> {
        let offered = if wanted_features == 0 {
            0
        } else {
            Self::probe_features()?.features
        };
        let mut flags = libc::O_CLOEXEC;
        if nonblocking {
            flags |= libc::O_NONBLOCK;
        }
        let fd = open_raw(flags)?;
        let api = api_handshake(fd.as_raw_fd(), wanted_features & offered)?;
        Ok(Userfaultfd { fd, api })
    }

    pub fn api(&self) -> ApiInfo {
        self.api
    }

    pub fn has_feature(&self, feature: u64) -> bool {
        self.api.features & feature == feature
    }

    /// Registers `[start, start + len)` for missing-page faults; returns the range ioctls.
    pub fn register_missing(&self, start: usize, len: u64) -> io::Result<u64> {
        let mut reg = raw::uffdio_register {
            range: raw::uffdio_range {
                start: start as u64,
                len,
            },
            mode: raw::UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes the live struct; the kernel validates the range.
        super::cvt(unsafe {
            libc::ioctl(self.fd.as_raw_fd(), raw::UFFDIO_REGISTER as _, &mut reg)
        })?;
        Ok(reg.ioctls)
    }

    pub fn unregister(&self, start: usize, len: u64) -> io::Result<()> {
        let mut range = raw::uffdio_range {
            start: start as u64,
            len,
        };
        // SAFETY: UFFDIO_UNREGISTER reads the live struct; the kernel validates the range.
        super::cvt(unsafe {
            libc::ioctl(self.fd.as_raw_fd(), raw::UFFDIO_UNREGISTER as _, &mut range)
        })
        .map(|_| ())
    }

    /// UFFDIO_COPY of `len` bytes from `src` to `dst`, waking waiters. EAGAIN is retried
    /// from where the kernel stopped; EEXIST means the range is already there, so its
    /// waiters are woken and the placement counts as done.
    ///
    /// The caller guarantees `src..src+len` is readable memory and `dst` lies in a range
    /// registered on this userfaultfd (the kernel checks the latter and fails otherwise).
    pub fn copy(&self, dst: usize, src: usize, len: u64) -> io::Result<Placed> {
        self.fill(dst, len, |done, rest| {
            let mut arg = raw::uffdio_copy {
                dst: (dst as u64) + done,
                src: (src as u64) + done,
                len: rest,
                mode: 0,
                copy: 0,
            };
            // SAFETY: the kernel reads `rest` bytes at src+done (readable by the caller's
            // guarantee) and writes only into the registered destination range.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), raw::UFFDIO_COPY as _, &mut arg) };
            (rc, arg.copy)
        })
    }

    /// UFFDIO_ZEROPAGE of `len` bytes at `dst`, with the same EAGAIN/EEXIST handling.
    pub fn zeropage(&self, dst: usize, len: u64) -> io::Result<Placed> {
        self.fill(dst, len, |done, rest| {
            let mut arg = raw::uffdio_zeropage {
                range: raw::uffdio_range {
                    start: (dst as u64) + done,
                    len: rest,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: the kernel maps zero pages only into the registered destination range.
            let rc =
                unsafe { libc::ioctl(self.fd.as_raw_fd(), raw::UFFDIO_ZEROPAGE as _, &mut arg) };
            (rc, arg.zeropage)
        })
    }

    fn fill(
        &self,
        dst: usize,
        len: u64,
        mut op: impl FnMut(u64, u64) -> (libc::c_int, i64),
    ) -> io::Result<Placed> {
        let mut done = 0u64;
        let mut retries = 0u32;
        loop {
            let (rc, progressed) = op(done, len - done);
            if rc == 0 {
                return Ok(Placed::Filled);
            }
            let err = io::Error::last_os_error();
            if progressed > 0 {
                done += progressed as u64;
                if done >= len {
                    return Ok(Placed::Filled);
                }
            }
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    self.wake(dst, len)?;
                    return Ok(Placed::AlreadyPresent);
                }
                Some(libc::EAGAIN) if retries < EAGAIN_RETRIES => {
                    retries += 1;
                    std::hint::spin_loop();
                }
                _ => return Err(err),
            }
        }
    }

    /// UFFDIO_COPY of a run of whole pages of `page_size` bytes from `src` to `dst`: one
    /// ioctl for the run while nothing is in the way. A page already present (EEXIST) is
    /// woken and skipped, page by page, and the copy resumes after it; EAGAIN resumes from
    /// where the kernel stopped. The kernel wakes the pages it filled.
    ///
    /// Returns how far the run got; `error` is set when it stopped early, every byte
    /// before `done` being in place (filled or already present) either way.
    ///
    /// The caller guarantees `src..src+len` is readable memory and `dst` lies in a range
    /// registered on this userfaultfd; `len` is a multiple of `page_size`.
    pub fn copy_pages(&self, dst: usize, src: usize, len: u64, page_size: u64) -> RunOutcome {
        let mut out = RunOutcome::default();
        let mut retries = 0u32;
        while out.done < len {
            let done = out.done;
            let mut arg = raw::uffdio_copy {
                dst: dst as u64 + done,
                src: src as u64 + done,
                len: len - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: the kernel reads `len - done` bytes at src+done (readable by the
            // caller's guarantee) and writes only into the registered destination range.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), raw::UFFDIO_COPY as _, &mut arg) };
            if rc == 0 {
                out.done = len;
                break;
            }
            let err = io::Error::last_os_error();
            if arg.copy > 0 {
                // A partial copy (the kernel reports it as EAGAIN): go on after it.
                out.done += (arg.copy as u64).min(len - done);
                continue;
            }
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    // The page at `done` is there already: wake its waiters, skip it.
                    if let Err(e) = self.wake(dst + done as usize, page_size) {
                        out.error = Some(e);
                        break;
                    }
                    out.present += 1;
                    out.done += page_size;
                }
                Some(libc::EAGAIN) if retries < EAGAIN_RETRIES => {
                    retries += 1;
                    std::hint::spin_loop();
                }
                _ => {
                    out.error = Some(err);
                    break;
                }
            }
        }
        out
    }

    /// UFFDIO_WAKE over `[start, start + len)` on this userfaultfd.
    pub fn wake(&self, start: usize, len: u64) -> io::Result<()> {
        wake_fd(self.fd.as_raw_fd(), start as u64, len)
    }

    /// Reads as many pending messages as fit in `buf` (one read(2) call). Returns 0 when
    /// none is pending on a non-blocking fd.
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        read_msgs_fd(self.fd.as_raw_fd(), buf)
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Userfaultfd {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

/// UFFDIO_WAKE on any userfaultfd (also a shared one another process owns).
pub fn wake_fd(fd: RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut range = raw::uffdio_range { start, len };
    // SAFETY: UFFDIO_WAKE reads the live struct; it only wakes threads, touching no memory.
    super::cvt(unsafe { libc::ioctl(fd, raw::UFFDIO_WAKE as _, &mut range) }).map(|_| ())
}

/// One read(2) of whole `uffd_msg`s from any userfaultfd.
pub fn read_msgs_fd(fd: RawFd, buf: &mut [UffdMsg]) -> io::Result<usize> {
    // SAFETY: reads at most size_of_val(buf) bytes into memory we own exclusively; any
    // byte pattern is a valid uffd_msg (plain integers and unions of them).
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), std::mem::size_of_val(buf)) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::WouldBlock {
            Ok(0)
        } else {
            Err(err)
        };
    }
    Ok(n as usize / MSG_SIZE)
}

/// The fault address and faulting thread id of a page-fault message (`tid` is 0 when
/// UFFD_FEATURE_THREAD_ID was not negotiated).
pub fn pagefault_of(msg: &UffdMsg, has_thread_id: bool) -> Option<(u64, u32)> {
    if msg.event != EVENT_PAGEFAULT {
        return None;
    }
    // SAFETY: for UFFD_EVENT_PAGEFAULT the kernel fills the `pagefault` member of the union.
    let pf = unsafe { msg.arg.pagefault };
    let tid = if has_thread_id {
        // SAFETY: `feat.ptid` is a plain u32 whatever the kernel wrote; it is meaningful
        // only when THREAD_ID was negotiated, and is reported as 0 otherwise.
        unsafe { pf.feat.ptid }
    } else {
        0
    };
    Some((pf.address, tid))
}

/// A zeroed message buffer of `n` entries.
pub fn msg_buffer(n: usize) -> Vec<UffdMsg> {
    // SAFETY: uffd_msg is plain integers and unions of them; all-zero is a valid value.
    vec![unsafe { std::mem::zeroed::<UffdMsg>() }; n]
}
