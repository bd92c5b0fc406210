//! Reserving 2 MiB huge pages for the hugetlbfs rows, and giving them back.
//!
//! As c-tests/hugetlb.c does: the pool is raised only by what is missing, the old size is
//! written back when the guard drops and on SIGINT/SIGTERM, and the same lock file
//! serialises us with that test.
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

const SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
const LOCK: &str = "/tmp/postcopy-ram-hugetlb.lock";

/// What a signal handler writes back: the pool file and the old size.
static RESTORE: OnceLock<(CString, Vec<u8>)> = OnceLock::new();
static RESTORED: AtomicBool = AtomicBool::new(true);

fn restore_pool() {
    if RESTORED.swap(true, Ordering::SeqCst) {
        return;
    }
    if let Some((path, value)) = RESTORE.get() {
        // SAFETY: open/write/close on a NUL-terminated path and a live buffer; all three
        // are async-signal-safe, so this may run in a signal handler.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, value.as_ptr().cast(), value.len());
                libc::close(fd);
            }
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    restore_pool();
    // SAFETY: back to the default action and re-raised, so the process ends as it would have.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn read_num(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Free 2 MiB pages guaranteed while this lives.
pub struct HugePool {
    _lock: OwnedFd,
}

impl HugePool {
    /// Makes `n` 2 MiB pages free, or says why not.
    pub fn reserve(n: u64) -> Result<HugePool, String> {
        let lock_path = CString::new(LOCK).expect("path");
        // SAFETY: open of a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                lock_path.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(format!(
                "lock file {LOCK}: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a new fd nobody else owns.
        let lock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: flock on our own fd.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!("flock {LOCK}: {}", std::io::Error::last_os_error()));
        }
        let pool = format!("{SYSFS}/nr_hugepages");
        let (Some(nr), Some(free)) = (
            read_num(&pool),
            read_num(&format!("{SYSFS}/free_hugepages")),
        ) else {
            return Err("no 2 MiB huge page pool".into());
        };
        if free < n {
            let old = format!("{nr}\n").into_bytes();
            if RESTORE
                .set((CString::new(pool.clone()).expect("path"), old))
                .is_err()
            {
                return Err("huge pages reserved twice in one run".into());
            }
            RESTORED.store(false, Ordering::SeqCst);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                // SAFETY: installs an async-signal-safe handler.
                unsafe {
                    libc::signal(
                        sig,
                        on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                    )
                };
            }
            if let Err(e) = std::fs::write(&pool, format!("{}\n", nr + (n - free))) {
                restore_pool();
                return Err(format!("raising {pool}: {e} (needs root)"));
            }
            let got = read_num(&format!("{SYSFS}/free_hugepages")).unwrap_or(0);
            if got < n {
                restore_pool();
                return Err(format!("only {got} of {n} 2 MiB pages could be allocated"));
            }
        }
        Ok(HugePool { _lock: lock })
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        restore_pool();
    }
}
