//! Guest RAM: the block layout both sides derive from (--ram, --page-size), deterministic
//! content with a realistic share of zero pages, mappings (anonymous or hugetlbfs), page
//! checksums, and the host's memory facts (free memory, huge pages).
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// The guest's target page (and the unit of content): 4 KiB.
pub const TARGET_PAGE: u64 = 4 * KIB;
pub const HUGE_PAGE: u64 = 2 * MIB;

/// One RAM block.
#[derive(Clone, Debug)]
pub struct BlockSpec {
    pub name: &'static str,
    pub len: u64,
    /// Percentage of 2 MiB regions that are entirely zero (never written by the guest).
    zero_region_pct: u64,
}

/// The guest's RAM blocks. Both sides derive it from (ram, page size) alone.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The transfer unit: the blocks' page size (4 KiB, or 2 MiB on hugetlbfs).
    pub page_size: u64,
    pub blocks: Vec<BlockSpec>,
    /// Global index of each block's first page.
    first_page: Vec<u64>,
    pub total_pages: u64,
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

impl Layout {
    pub fn new(ram: u64, page_size: u64) -> Result<Layout, String> {
        let min = (4 * page_size).max(MIB);
        if ram < min {
            return Err(format!(
                "--ram {} is too small: at least {} with {} pages",
                fmt_bytes(ram),
                fmt_bytes(min),
                fmt_bytes(page_size)
            ));
        }
        if ram % page_size != 0 {
            return Err(format!(
                "--ram {} is not a whole number of {} pages",
                fmt_bytes(ram),
                fmt_bytes(page_size)
            ));
        }
        // A PC-like guest: main RAM, video RAM (mostly zero), a small ROM.
        let rom = round_up((ram / 128).max(page_size), page_size);
        let vram = round_up((ram / 16).max(page_size), page_size);
        let main = ram - rom - vram;
        let blocks = vec![
            BlockSpec {
                name: "pc.ram",
                len: main,
                zero_region_pct: 30,
            },
            BlockSpec {
                name: "vga.vram",
                len: vram,
                zero_region_pct: 70,
            },
            BlockSpec {
                name: "pc.rom",
                len: rom,
                zero_region_pct: 10,
            },
        ];
        let mut first_page = Vec::new();
        let mut total = 0;
        for b in &blocks {
            first_page.push(total);
            total += b.len / page_size;
        }
        Ok(Layout {
            page_size,
            blocks,
            first_page,
            total_pages: total,
        })
    }

    pub fn ram(&self) -> u64 {
        self.total_pages * self.page_size
    }

    pub fn pages(&self, block: usize) -> u64 {
        self.blocks[block].len / self.page_size
    }

    /// Global page index of page `page` of `block`.
    pub fn global(&self, block: usize, page: u64) -> u64 {
        self.first_page[block] + page
    }

    /// The (block, page) of a global page index.
    pub fn locate(&self, global: u64) -> (usize, u64) {
        let b = self.first_page.partition_point(|&f| f <= global) - 1;
        (b, global - self.first_page[b])
    }

    pub fn block_by_name(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.name == name)
    }

    /// Target pages per block page.
    pub fn subpages(&self) -> u64 {
        self.page_size / TARGET_PAGE
    }
}

/// splitmix64's finaliser: a good 64-bit mix.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Is 4 KiB page `sub` of `block` zero in the initial image? Whole 2 MiB regions are zero
/// (untouched memory), and a few scattered pages inside the others.
pub fn subpage_is_zero(layout: &Layout, block: usize, sub: u64) -> bool {
    let region = sub / (HUGE_PAGE / TARGET_PAGE);
    let key = (block as u64) << 56;
    if mix(0x5eed_0001 ^ key ^ region) % 100 < layout.blocks[block].zero_region_pct {
        return true;
    }
    mix(0x5eed_0002 ^ key ^ sub) % 100 < 8
}

/// Writes the initial content of 4 KiB page `sub` of `block` (not a zero page) to `dst`.
pub fn fill_subpage(dst: &mut [u64], block: usize, sub: u64) {
    let base = mix(((block as u64) << 48) ^ sub);
    for (i, w) in dst.iter_mut().enumerate() {
        *w = base
            .wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_mul(0xd6e8_feb8_6659_fd93)
            | 1;
    }
}

/// A 64-bit checksum of `data` (a whole number of 32-byte chunks): four independent lanes
/// so it runs at memory speed.
pub fn checksum(data: &[u8]) -> u64 {
    let mut h = [
        0x243f_6a88_85a3_08d3u64,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    ];
    for c in data.chunks_exact(32) {
        for (lane, word) in h.iter_mut().zip(c.chunks_exact(8)) {
            let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            *lane = (*lane ^ w)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(29);
        }
    }
    mix(h[0] ^ h[1].rotate_left(16) ^ h[2].rotate_left(32) ^ h[3].rotate_left(48))
}

pub fn is_zero(data: &[u8]) -> bool {
    data.chunks_exact(64).all(|c| {
        c.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().expect("8"))
        }) == 0
    })
}

/// A memory mapping owned by the demo: a RAM block or the source's image of one.
pub struct Mapping {
    addr: *mut u8,
    len: usize,
    fd: Option<OwnedFd>,
}

// SAFETY: a Mapping is an address range; who may touch which bytes when is governed by the
// migration's phases (documented at each access), not by the owner's thread.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Private anonymous memory, not reserved up front (untouched pages cost nothing).
    pub fn anonymous(len: u64) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            addr: p.cast(),
            len: len as usize,
            fd: None,
        })
    }

    /// Shared memory on hugetlbfs (memfd_create with MFD_HUGETLB, 2 MiB pages): the backing
    /// fd is what the library punches holes in to discard.
    pub fn hugetlb(name: &str, len: u64) -> io::Result<Mapping> {
        let cname = CString::new(name).expect("block names have no NUL");
        // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
        let fd = unsafe {
            libc::memfd_create(
                cname.as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: maps the whole memfd, fresh address chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
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
            addr: p.cast(),
            len: len as usize,
            fd: Some(fd),
        })
    }

    pub fn addr(&self) -> usize {
        self.addr as usize
    }

    pub fn ptr(&self) -> *mut u8 {
        self.addr
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// The backing fd, or -1 for anonymous memory.
    pub fn fd(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// The bytes `[offset, offset + len)`.
    ///
    /// # Safety
    /// The range is inside the mapping, and no thread writes it while the slice lives
    /// (reading a page that userfaultfd holds missing blocks until it is placed).
    pub unsafe fn slice(&self, offset: u64, len: u64) -> &[u8] {
        debug_assert!(offset + len <= self.len as u64);
        // SAFETY: in bounds and not written concurrently (caller's contract).
        unsafe { std::slice::from_raw_parts(self.addr.add(offset as usize), len as usize) }
    }

    /// The bytes `[offset, offset + len)`, writable.
    ///
    /// # Safety
    /// The range is inside the mapping and no other thread reads or writes it while the
    /// slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: u64) -> &mut [u8] {
        debug_assert!(offset + len <= self.len as u64);
        // SAFETY: in bounds and exclusively ours for the slice's life (caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.addr.add(offset as usize), len as usize) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this Mapping created; nothing borrows it any more.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Words of a 4 KiB page, viewed mutably inside `bytes`.
pub fn as_words(bytes: &mut [u8]) -> &mut [u64] {
    assert!(bytes.as_ptr() as usize % 8 == 0 && bytes.len() % 8 == 0);
    // SAFETY: aligned and sized for u64 (checked), and every bit pattern is a valid u64;
    // the borrow of `bytes` is handed over to the returned slice.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len() / 8) }
}

/// A value from /proc/meminfo, in bytes (entries given in kB) or as the plain count.
pub fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let mut it = rest.split_whitespace();
        let v: u64 = it.next()?.parse().ok()?;
        Some(if it.next() == Some("kB") { v * KIB } else { v })
    })
}

/// Refuses to start when this machine cannot hold `need` more bytes of RAM.
pub fn check_memory(need: u64, what: &str) -> Result<(), String> {
    let Some(avail) = meminfo("MemAvailable") else {
        return Ok(());
    };
    if need > avail {
        return Err(format!(
            "not enough memory: {what} needs about {} but this machine has {} available (MemAvailable); use a smaller --ram",
            fmt_bytes(need),
            fmt_bytes(avail)
        ));
    }
    Ok(())
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Free 2 MiB huge pages for the destination's hugetlbfs RAM: raised through
/// vm.nr_hugepages when needed (root), put back when dropped.
pub struct HugePages {
    restore: Option<u64>,
}

impl HugePages {
    pub fn reserve(count: u64) -> Result<HugePages, String> {
        if meminfo("Hugepagesize") != Some(HUGE_PAGE) {
            return Err(
                "--page-size 2m needs 2 MiB huge pages, which this kernel does not offer as its default huge page size".into(),
            );
        }
        let free = meminfo("HugePages_Free").unwrap_or(0);
        if free >= count {
            return Ok(HugePages { restore: None });
        }
        let read_nr = || -> Option<u64> {
            std::fs::read_to_string(NR_HUGEPAGES)
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let current = read_nr().unwrap_or(0);
        let target = current + (count - free);
        let wrote = std::fs::write(NR_HUGEPAGES, target.to_string());
        let got = meminfo("HugePages_Free").unwrap_or(0);
        if wrote.is_ok() && got >= count {
            return Ok(HugePages {
                restore: Some(current),
            });
        }
        // Give back whatever was raised before reporting.
        if wrote.is_ok() {
            let _ = std::fs::write(NR_HUGEPAGES, current.to_string());
        }
        let why = match wrote {
            Err(e) => format!("raising vm.nr_hugepages to {target} failed ({e}; it needs root)"),
            Ok(()) => format!(
                "vm.nr_hugepages was raised to {target} but only {got} pages came free (memory too fragmented or too small)"
            ),
        };
        Err(format!(
            "--page-size 2m needs {count} free 2 MiB huge pages ({}) for the destination's hugetlbfs RAM; {free} are free and {why}. \
             Reserve them with `echo {target} > {NR_HUGEPAGES}` as root, or use --page-size 4k",
            fmt_bytes(count * HUGE_PAGE)
        ))
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(n) = self.restore {
            let _ = std::fs::write(NR_HUGEPAGES, n.to_string());
        }
    }
}

/// 1.5 GiB, 64 MiB, 4 KiB.
pub fn fmt_bytes(v: u64) -> String {
    let units = [
        (GIB * 1024, "TiB"),
        (GIB, "GiB"),
        (MIB, "MiB"),
        (KIB, "KiB"),
    ];
    for (size, name) in units {
        if v >= size {
            let x = v as f64 / size as f64;
            return if v % size == 0 {
                format!("{} {name}", v / size)
            } else {
                format!("{x:.2} {name}")
            };
        }
    }
    format!("{v} B")
}

/// One bit per page, shared between threads.
pub struct PageBitmap {
    words: Vec<AtomicU64>,
}

impl PageBitmap {
    pub fn new(pages: u64) -> PageBitmap {
        PageBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Sets bit `g`; true if the caller set it first.
    pub fn set(&self, g: u64) -> bool {
        let bit = 1u64 << (g % 64);
        self.words[(g / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    pub fn test(&self, g: u64) -> bool {
        self.words[(g / 64) as usize].load(Ordering::Acquire) & (1u64 << (g % 64)) != 0
    }

    /// The words, for the wire.
    pub fn to_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Replaces every bit (nobody else may use the bitmap meanwhile).
    pub fn assign(&self, words: &[u64]) {
        for (w, &v) in self.words.iter().zip(words) {
            w.store(v, Ordering::Release);
        }
    }

    pub fn words(&self) -> usize {
        self.words.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_partitions_ram() {
        for (ram, ps) in [
            (GIB, TARGET_PAGE),
            (64 * MIB, TARGET_PAGE),
            (GIB, HUGE_PAGE),
            (8 * MIB, HUGE_PAGE),
        ] {
            let l = Layout::new(ram, ps).unwrap();
            assert_eq!(l.ram(), ram);
            assert_eq!(l.blocks.iter().map(|b| b.len).sum::<u64>(), ram);
            assert!(l.blocks.iter().all(|b| b.len % ps == 0 && b.len > 0));
            let last = l.total_pages - 1;
            let (b, p) = l.locate(last);
            assert_eq!(l.global(b, p), last);
            assert_eq!(l.locate(l.global(1, 0)), (1, 0));
        }
        assert!(Layout::new(MIB / 2, TARGET_PAGE).is_err());
        assert!(Layout::new(9 * MIB, HUGE_PAGE).is_err());
    }

    #[test]
    fn zero_share_is_realistic() {
        let l = Layout::new(256 * MIB, TARGET_PAGE).unwrap();
        let n = l.total_pages;
        let zeros = (0..n)
            .filter(|&g| {
                let (b, p) = l.locate(g);
                subpage_is_zero(&l, b, p)
            })
            .count() as u64;
        let pct = zeros * 100 / n;
        assert!((20..=60).contains(&pct), "{pct}% zero pages");
    }

    #[test]
    fn page_bitmap() {
        let b = PageBitmap::new(130);
        assert_eq!(b.words(), 3);
        assert!(b.set(129) && !b.set(129));
        assert!(b.test(129) && !b.test(128));
        let c = PageBitmap::new(130);
        c.assign(&b.to_words());
        assert!(c.test(129) && !c.test(0));
    }

    #[test]
    fn checksums_tell_pages_apart() {
        let mut a = vec![0u64; 512];
        let mut b = vec![0u64; 512];
        fill_subpage(&mut a, 0, 1);
        fill_subpage(&mut b, 0, 2);
        let bytes = |w: &[u64]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_ne!(checksum(&bytes(&a)), checksum(&bytes(&b)));
        assert!(!is_zero(&bytes(&a)));
        assert!(is_zero(&[0u8; 4096]));
        assert_eq!(fmt_bytes(GIB), "1 GiB");
        assert_eq!(fmt_bytes(3 * MIB / 2), "1.50 MiB");
    }
}
