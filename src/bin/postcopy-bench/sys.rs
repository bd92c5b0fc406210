//! The raw side of every comparison: the kernel calls a C program would make, written with
//! libc and the kernel's userfaultfd ABI and nothing of the library. Also the helpers both
//! sides share: mappings, warming, clocks, CPU pinning.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use userfaultfd_sys as raw;

pub const PAGE: usize = 4096;
pub const HUGE_PAGE: usize = 2 << 20;

/// CLOCK_MONOTONIC in ns (the vDSO: ~22 ns here).
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a writable timespec owned by this frame.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of the calling thread in ns: what a loop that never blocks is timed in, so
/// that other load on the machine (preempting it) does not count.
#[inline]
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a writable timespec owned by this frame.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of the whole process (every thread) in ns.
pub fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a writable timespec owned by this frame.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn gettid() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pins thread `tid` (0: the caller) to `cpu`, or lets it run anywhere (`None`).
pub fn pin(tid: u32, cpu: Option<usize>) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    match cpu {
        // SAFETY: as above; `c` is below CPU_SETSIZE for any machine this runs on.
        Some(c) => unsafe { libc::CPU_SET(c, &mut set) },
        None => {
            for c in 0..online_cpus() {
                // SAFETY: as above.
                unsafe { libc::CPU_SET(c, &mut set) };
            }
        }
    }
    // SAFETY: sched_setaffinity reads the live set; the kernel validates tid.
    let rc =
        unsafe { libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &set) };
    cvt(rc).map(|_| ())
}

/// The id of this process's thread named `name` (its comm), if there is one.
pub fn find_thread(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|e| {
        let e = e.ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim_end() == name)
            .then(|| e.file_name().to_str()?.parse().ok())
            .flatten()
    })
}

pub fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A mapping the benchmark owns, unmapped on drop: anonymous private memory with
/// MADV_NOHUGEPAGE (as QEMU advises for postcopy), or a hugetlbfs memfd mapped shared.
pub struct Mapping {
    addr: usize,
    len: usize,
    /// The hugetlbfs memfd backing the mapping, if any.
    pub fd: Option<OwnedFd>,
}

impl Mapping {
    pub fn anon(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh private anonymous mapping aliases nothing; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let m = Mapping {
            addr: p as usize,
            len,
            fd: None,
        };
        m.advise(0, len, libc::MADV_NOHUGEPAGE)?;
        Ok(m)
    }

    /// `len` bytes of 2 MiB hugetlbfs pages (a memfd), mapped shared.
    pub fn hugetlb(len: usize) -> io::Result<Mapping> {
        const MFD_HUGE_2MB: libc::c_uint = 21 << 26;
        // SAFETY: the name is a NUL-terminated literal; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"postcopy-bench".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_HUGETLB | MFD_HUGE_2MB,
            )
        };
        let fd = cvt(fd)?;
        // SAFETY: memfd_create returned a new fd that nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own fd.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
        // SAFETY: a fresh shared mapping of our own memfd; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: p as usize,
            len,
            fd: Some(fd),
        })
    }

    pub fn addr(&self) -> usize {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn advise(&self, off: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
        assert!(off + len <= self.len);
        // SAFETY: the range lies inside our own mapping; madvise changes no Rust-visible memory.
        cvt(unsafe { libc::madvise((self.addr + off) as *mut libc::c_void, len, advice) })
            .map(|_| ())
    }

    /// Writes one byte in every `step` bytes of `[off, off + len)`. Only for ranges whose
    /// pages are present or not registered with any userfaultfd (it would fault otherwise).
    pub fn touch(&self, off: usize, len: usize, step: usize) {
        assert!(off + len <= self.len);
        let mut a = self.addr + off;
        while a < self.addr + off + len {
            // SAFETY: inside our own read-write mapping; a volatile write of one byte.
            unsafe { std::ptr::write_volatile(a as *mut u8, 1) };
            a += step;
        }
    }

    /// Drops the pages of `[off, off + len)`: MADV_DONTNEED for anonymous memory, a hole
    /// punched in the memfd for hugetlbfs. The next access (or UFFDIO_COPY) finds them missing.
    pub fn drop_pages(&self, off: usize, len: usize) -> io::Result<()> {
        match &self.fd {
            None => self.advise(off, len, libc::MADV_DONTNEED),
            Some(fd) => {
                // SAFETY: fallocate on our own memfd; the range is inside the file.
                cvt(unsafe {
                    libc::fallocate(
                        fd.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off as libc::off_t,
                        len as libc::off_t,
                    )
                })
                .map(|_| ())
            }
        }
    }

    /// The memory warm-up every timed region gets right before timing: pages written
    /// (so the VM's host backs them), then dropped (so they are missing again, and the
    /// kernel's next allocations reuse the same, still-backed frames).
    pub fn warm_and_drop(&self, off: usize, len: usize, step: usize) -> io::Result<()> {
        self.touch(off, len, step);
        self.drop_pages(off, len)
    }

    pub fn fill(&self, byte: u8) {
        // SAFETY: the whole of our own read-write mapping.
        unsafe { std::ptr::write_bytes(self.addr as *mut u8, byte, self.len) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; nothing refers to it any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A userfaultfd opened and driven as a C program would: one fd, non-blocking, the
/// THREAD_ID feature (as the library asks for), MISSING registrations.
pub struct RawUffd {
    fd: OwnedFd,
}

impl RawUffd {
    pub fn open() -> io::Result<RawUffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // /dev/userfaultfd first, then the syscall, as the library (and QEMU) open it.
        let mut fd = -1;
        if let Ok(dev) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            // USERFAULTFD_IOC_NEW: _IO(0xAA, 0x00).
            let new: libc::c_ulong = (raw::USERFAULTFD_IOC as libc::c_ulong) << 8;
            // SAFETY: the device's "new userfaultfd" ioctl takes the flags as its integer
            // argument; the result is checked.
            fd = unsafe { libc::ioctl(dev.as_raw_fd(), new, flags) } as libc::c_long;
        }
        if fd < 0 {
            // SAFETY: the userfaultfd syscall takes only flags; the result is checked.
            fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
        }
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = raw::uffdio_api {
            api: raw::UFFD_API,
            features: raw::UFFD_FEATURE_THREAD_ID,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes the live struct.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), raw::UFFDIO_API as _, &mut api) })?;
        Ok(RawUffd { fd })
    }

    pub fn register(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut reg = raw::uffdio_register {
            range: raw::uffdio_range {
                start: addr as u64,
                len: len as u64,
            },
            mode: raw::UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes the live struct; the kernel checks the range.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), raw::UFFDIO_REGISTER as _, &mut reg) })
            .map(|_| ())
    }

    /// UFFDIO_COPY of `len` bytes; EEXIST (already there) wakes the range. The caller
    /// passes readable `src` and a registered `dst`.
    #[inline]
    pub fn copy(&self, dst: usize, src: usize, len: usize) -> io::Result<()> {
        let mut arg = raw::uffdio_copy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: the kernel reads `len` bytes at src (the caller's readable buffer) and
        // writes only into the registered destination range.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), raw::UFFDIO_COPY as _, &mut arg) };
        self.settle(rc, dst, len)
    }

    #[inline]
    pub fn zeropage(&self, dst: usize, len: usize) -> io::Result<()> {
        let mut arg = raw::uffdio_zeropage {
            range: raw::uffdio_range {
                start: dst as u64,
                len: len as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: the kernel maps zero pages only into the registered destination range.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), raw::UFFDIO_ZEROPAGE as _, &mut arg) };
        self.settle(rc, dst, len)
    }

    #[cold]
    fn settle_err(&self, dst: usize, len: usize) -> io::Result<()> {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            let mut range = raw::uffdio_range {
                start: dst as u64,
                len: len as u64,
            };
            // SAFETY: UFFDIO_WAKE reads the live struct and only wakes threads.
            cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), raw::UFFDIO_WAKE as _, &mut range) })?;
            return Ok(());
        }
        Err(e)
    }

    #[inline]
    fn settle(&self, rc: libc::c_int, dst: usize, len: usize) -> io::Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            self.settle_err(dst, len)
        }
    }

    /// One read(2) of up to `buf.len()` messages; 0 when none is pending.
    #[inline]
    pub fn read(&self, buf: &mut [raw::uffd_msg]) -> usize {
        // SAFETY: reads at most size_of_val(buf) bytes into memory we own; any bytes are a
        // valid uffd_msg (integers and unions of them).
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                std::mem::size_of_val(buf),
            )
        };
        if n < 0 {
            0
        } else {
            n as usize / std::mem::size_of::<raw::uffd_msg>()
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The faulting address of a page-fault message.
#[inline]
pub fn fault_addr(msg: &raw::uffd_msg) -> Option<u64> {
    if msg.event != raw::UFFD_EVENT_PAGEFAULT {
        return None;
    }
    // SAFETY: for UFFD_EVENT_PAGEFAULT the kernel fills the `pagefault` member.
    Some(unsafe { msg.arg.pagefault.address })
}

/// The raw baselines' loop, as small as a C handler gets: poll the userfaultfd and `quit`,
/// read up to 64 messages, call `on_fault` with each faulting page's address; returns when
/// `quit` is kicked.
#[inline]
pub fn raw_fault_loop(uffd: &RawUffd, quit: &EventFd, mut on_fault: impl FnMut(usize)) {
    let mut msgs = msg_buffer(64);
    let fds = [uffd.raw_fd(), quit.raw_fd()];
    let mut ready = [false; 2];
    loop {
        poll_in(&fds, &mut ready);
        if ready[1] {
            return;
        }
        let n = uffd.read(&mut msgs);
        for m in &msgs[..n] {
            if let Some(addr) = fault_addr(m) {
                on_fault(addr as usize & !(PAGE - 1));
            }
        }
    }
}

pub fn msg_buffer(n: usize) -> Vec<raw::uffd_msg> {
    // SAFETY: uffd_msg is integers and unions of them; all-zero is valid.
    vec![unsafe { std::mem::zeroed::<raw::uffd_msg>() }; n]
}

/// An eventfd to stop a polling thread.
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes an initial value and flags; the result is checked.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: a new fd nobody else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    pub fn kick(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// poll(2) on `fds` for input, forever; returns which are readable.
#[inline]
pub fn poll_in(fds: &[RawFd], ready: &mut [bool]) {
    let mut pfds: [libc::pollfd; 4] = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    for (p, &fd) in pfds.iter_mut().zip(fds) {
        p.fd = fd;
        p.events = libc::POLLIN;
    }
    loop {
        // SAFETY: the first fds.len() (≤ 4) entries of a live pollfd array.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc > 0 {
            break;
        }
    }
    for (r, p) in ready.iter_mut().zip(&pfds) {
        *r = p.revents != 0;
    }
}

/// Host facts for the report.
pub fn kernel() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a writable utsname.
    unsafe { libc::uname(&mut u) };
    let field = |f: &[libc::c_char]| {
        // SAFETY: uname NUL-terminates each field inside its array.
        unsafe { std::ffi::CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    format!(
        "{} {} {}",
        field(&u.sysname),
        field(&u.release),
        field(&u.machine)
    )
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}
