//! Page placement: atomically fill a missing page so its faulting threads resume, then do
//! the bookkeeping in the order DESIGN.md §3 gives.
use crate::error::{Error, Result};
use crate::fault_thread::Recorded;
use crate::host::BlockId;
use crate::incoming::{BlockSnap, Incoming};
use crate::requests::{Counters, Pending};
use crate::sys::uffd::{self, Placed};
use std::sync::atomic::AtomicU64;

/// What placement's bookkeeping needs of a block, copied out of the block table so the
/// table's guard is released before any host call.
#[derive(Clone, Copy)]
struct Dest {
    block: BlockId,
    start: u64,
    page_size: u64,
}

impl Dest {
    fn of(snap: &BlockSnap) -> Dest {
        Dest {
            block: snap.info.id,
            start: snap.start(),
            page_size: snap.page_size(),
        }
    }
}

impl Incoming {
    /// `postcopy_place_page`: UFFDIO_COPY one host page of `block` from `from` to `host_addr`.
    /// `from` must be readable for the block's page size; it needs no alignment.
    pub fn place_page(&self, block: BlockId, host_addr: u64, from: usize) -> Result<()> {
        if from == 0 {
            return Err(Error::NullPointer("from"));
        }
        let (dest, placed) = {
            let active = self.active_ref()?;
            let snap = active.blocks.check(block, host_addr)?;
            let ps = snap.page_size();
            let placed = active
                .uffd
                .copy(host_addr as usize, from, ps)
                .map_err(|e| {
                    Error::os(format!("UFFDIO_COPY of {ps:#x} bytes at {host_addr:#x}"), e)
                })?;
            (Dest::of(snap), placed)
        };
        self.page_arrived(dest, host_addr, placed, &self.counters.pages_placed)
    }

    /// `postcopy_place_pages`: `npages` contiguous pages of `block` from `from` to
    /// `host_addr`, one UFFDIO_COPY for the run. Pages already present are woken and
    /// skipped one by one (the rest of the run is still copied). Every page gets
    /// placement's bookkeeping. When the copy fails part-way, the pages before the failure
    /// are in place and accounted for, and the error is returned.
    pub fn place_pages(
        &self,
        block: BlockId,
        host_addr: u64,
        from: usize,
        npages: u64,
    ) -> Result<()> {
        if from == 0 {
            return Err(Error::NullPointer("from"));
        }
        let (dest, out) = {
            let active = self.active_ref()?;
            let snap = active.blocks.check(block, host_addr)?;
            let ps = snap.page_size();
            let len = npages
                .checked_mul(ps)
                .filter(|&len| len <= snap.end() - host_addr)
                .ok_or_else(|| {
                    // -EFAULT, as for any placement outside the block; nothing is placed.
                    Error::os(
                        format!(
                            "a run of {npages} pages of {ps:#x} bytes at {host_addr:#x} runs past the end of RAM block '{}'",
                            snap.info.idstr
                        ),
                        std::io::Error::from_raw_os_error(libc::EFAULT),
                    )
                })?;
            if len == 0 {
                return Ok(());
            }
            (
                Dest::of(snap),
                active.uffd.copy_pages(host_addr as usize, from, len, ps),
            )
        };
        let placed = out.done / dest.page_size;
        let kept = self.run_arrived(dest, host_addr, placed, out.present);
        if let Some(e) = out.error {
            let at = host_addr + out.done;
            return Err(Error::os(
                format!("UFFDIO_COPY of a run at {at:#x} ({placed} of {npages} pages placed)"),
                e,
            ));
        }
        kept
    }

    /// Bookkeeping of a run of `npages` pages from `host_addr`: the received bitmap in one
    /// range call, each page's request removal and blocktime end (one clock read for the
    /// run) under the request lock; then, unlocked, the host's placed hook for the run and
    /// the shared wakers for each page.
    fn run_arrived(&self, dest: Dest, host_addr: u64, npages: u64, present: u64) -> Result<()> {
        if npages == 0 {
            return Ok(());
        }
        let ps = dest.page_size;
        let len = npages * ps;
        let offset = host_addr - dest.start;
        {
            let mut req = self.requests.lock();
            Counters::add_locked(&self.counters.pages_placed, npages);
            if present > 0 {
                Counters::add_locked(&self.counters.placed_already_present, present);
            }
            self.host.recv_set_range(dest.block, offset, len);
            if !req.requested.is_empty() {
                let mut removed = false;
                for i in 0..npages {
                    removed |= req.requested.remove(&(host_addr + i * ps)).is_some();
                }
                if removed && req.requested.is_empty() {
                    self.drained.notify_all();
                }
            }
            if let Some(bt) = req.blocktime.as_mut() {
                if bt.outstanding_faults() > 0 {
                    let now = bt.now_ns();
                    for i in 0..npages {
                        bt.end_at(host_addr + i * ps, now);
                    }
                }
            }
        }
        self.host.page_placed(dest.block, offset, len);
        if !self.shared.is_empty() {
            let mut first = 0;
            for i in 0..npages {
                let rc = self.shared.notify_wake(dest.block, offset + i * ps);
                if rc != 0 && first == 0 {
                    first = rc;
                }
            }
            if first != 0 {
                return Err(Error::Host {
                    what: "a shared userfaultfd waker",
                    errno: first,
                });
            }
        }
        Ok(())
    }

    /// `postcopy_place_page_zero`: UFFDIO_ZEROPAGE, or a copy of the zero page where the
    /// block cannot take zero pages (hugetlbfs).
    pub fn place_zero_page(&self, block: BlockId, host_addr: u64) -> Result<()> {
        let (dest, placed) = {
            let active = self.active_ref()?;
            let snap = active.blocks.check(block, host_addr)?;
            let ps = snap.page_size();
            let placed = if snap.zeroable {
                active.uffd.zeropage(host_addr as usize, ps)
            } else {
                active
                    .uffd
                    .copy(host_addr as usize, active.zero_page.addr(), ps)
            }
            .map_err(|e| {
                Error::os(
                    format!("placing a zero page of {ps:#x} bytes at {host_addr:#x}"),
                    e,
                )
            })?;
            (Dest::of(snap), placed)
        };
        self.page_arrived(dest, host_addr, placed, &self.counters.zero_pages_placed)
    }

    /// Placement bookkeeping: the placement counters (`counter`: pages or zero pages),
    /// received bitmap, request removal and blocktime end under the request lock; then,
    /// unlocked, the host's placed hook and the shared wakers.
    fn page_arrived(
        &self,
        dest: Dest,
        host_addr: u64,
        placed: Placed,
        counter: &AtomicU64,
    ) -> Result<()> {
        let ps = dest.page_size;
        let offset = host_addr - dest.start;
        {
            let mut req = self.requests.lock();
            Counters::add_locked(counter, 1);
            if placed == Placed::AlreadyPresent {
                Counters::add_locked(&self.counters.placed_already_present, 1);
            }
            self.host.recv_set_range(dest.block, offset, ps);
            // Most placements (the background stream) were never requested: no hashing.
            if !req.requested.is_empty()
                && req.requested.remove(&host_addr).is_some()
                && req.requested.is_empty()
            {
                self.drained.notify_all();
            }
            if let Some(bt) = req.blocktime.as_mut() {
                bt.end(host_addr);
            }
        }
        self.host.page_placed(dest.block, offset, ps);
        if !self.shared.is_empty() {
            let rc = self.shared.notify_wake(dest.block, offset);
            if rc != 0 {
                return Err(Error::Host {
                    what: "a shared userfaultfd waker",
                    errno: rc,
                });
            }
        }
        Ok(())
    }

    /// `postcopy_request_shared_page`: a shared userfaultfd's client faulted at
    /// `client_addr`, which is `offset` into `block`. Already received: wake the client.
    /// Otherwise request it, tracked by the guest-RAM address (not the client's address, so
    /// placement finds and clears it; QEMU keys it by the client address and never does).
    pub fn request_shared_page(
        &self,
        shared_fd: i32,
        block: BlockId,
        client_addr: u64,
        offset: u64,
    ) -> Result<()> {
        let active = self.active()?;
        let snap = active
            .blocks
            .find_id(block)
            .ok_or(Error::UnknownBlock(block.0))?;
        let ps = snap.page_size();
        let aligned_offset = offset & !(ps - 1);
        if aligned_offset >= snap.len() {
            return Err(Error::InvalidArgument(format!(
                "offset {offset:#x} is beyond the end of RAM block '{}' ({:#x} bytes)",
                snap.info.idstr,
                snap.len()
            )));
        }
        Counters::bump(&self.counters.shared_requests);
        let aligned = snap.start() + aligned_offset;
        let pending = Pending {
            block,
            offset: aligned_offset,
            len: ps,
            haddr: aligned,
            tid: 0,
            sent: false,
        };
        match self.record_request(aligned, pending, None) {
            Recorded::AlreadyReceived => wake_client(shared_fd, client_addr, ps),
            Recorded::Send(p) => {
                self.send_request(aligned, &p, &snap.info.idstr);
                Ok(())
            }
            Recorded::Duplicate | Recorded::Held => Ok(()),
        }
    }

    /// `postcopy_wake_shared`: wake the client's threads waiting on the page at `client_addr`.
    pub fn wake_shared(&self, shared_fd: i32, client_addr: u64, block: BlockId) -> Result<()> {
        let ps = match self
            .blocks()
            .and_then(|t| t.find_id(block).map(|b| b.page_size()))
        {
            Some(ps) => ps,
            None => {
                self.host
                    .ram_block(block)
                    .ok_or(Error::UnknownBlock(block.0))?
                    .page_size
            }
        };
        wake_client(shared_fd, client_addr, ps)
    }

    /// `mark_postcopy_blocktime_begin` for a caller outside the library: the page at `addr`
    /// of `block` was requested by thread `tid`. Ignored for received pages.
    pub fn blocktime_begin(&self, addr: u64, tid: u32, block: BlockId) -> Result<()> {
        let active = self.active()?;
        let snap = active
            .blocks
            .find_id(block)
            .ok_or(Error::UnknownBlock(block.0))?;
        if !snap.contains(addr) {
            return Err(Error::OutsideRam { addr });
        }
        let aligned = addr & !(snap.page_size() - 1);
        let mut req = self.requests.lock();
        if self.host.recv_test(block, aligned - snap.start()) {
            return Ok(());
        }
        if let Some(bt) = req.blocktime.as_mut() {
            bt.begin(aligned, tid);
        }
        Ok(())
    }
}

fn wake_client(fd: i32, client_addr: u64, page_size: u64) -> Result<()> {
    uffd::wake_fd(fd, client_addr & !(page_size - 1), page_size).map_err(|e| {
        Error::os(
            format!("UFFDIO_WAKE on shared userfaultfd {fd} at {client_addr:#x}"),
            e,
        )
    })
}
