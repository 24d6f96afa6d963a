// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The io_uring engine: one ring per queue thread, a fixed pool of request slots.
//!
//! Invariants:
//! - No heap allocation per request: a request is moved into a preallocated slot and its iovecs
//!   are used in place, so they stay alive (at a stable address) until the completion is reaped.
//! - SQEs are only queued by [`Engine::push`]; the kernel sees them at the next
//!   [`Engine::submit`], so a whole kick's worth of requests costs one `io_uring_enter`.
//! - Every completion is reaped from the whole CQ on each [`Engine::drain`]. The thread waits
//!   for completions on the ring's own fd ([`Engine::poll_fd`]: readable while the CQ is not
//!   empty), not on a registered eventfd: an eventfd is signalled by every CQE, also by those
//!   that complete inside the submitting `io_uring_enter` (page-cache hits) and are reaped at
//!   once, so it had to be read (one syscall per batch) before every sleep. The ring fd is
//!   not readable once the CQ is reaped, whoever posted to it.
//! - Every slot that was filled is handed back exactly once, through the completion callback,
//!   whether the operation succeeded, failed or was cancelled; [`Engine::wait_idle`] returns only
//!   when no slot is busy, so nothing is ever leaked across a disconnect.
//! - FLUSH is a real `fdatasync`: `IORING_OP_FSYNC` with `DATASYNC`, or the syscall itself on the
//!   calling thread when nothing else is in flight (counted in [`EngineStats::fsyncs`]).
//! - Work done on the calling thread instead of the ring (buffered writes the kernel would punt
//!   to a worker, a lone FLUSH: see [`Engine::set_inline_writes`] and
//!   [`Engine::set_sync_flush_when_idle`]) is finished inside [`Engine::push`] but still occupies
//!   its slot until the next drain hands its completion out, so completion order, slot
//!   accounting and [`Engine::wait_idle`] are the same for both paths.

use crate::image::{Image, SECTOR_SHIFT};
use crate::request::{BlkRequest, RequestKind, STATUS_IOERR, STATUS_OK};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

/// What an engine slot holds: anything that owns a [`BlkRequest`] at a stable place. Today a
/// plain `BlkRequest`; with output commit, ft-common's `InFlight<BlkRequest>` AIOCB (which owns
/// its payload and exposes it by reference), so a committed AIOCB is submitted from its slot
/// without being taken apart, and its [`Completion`] hands the AIOCB back to be completed.
pub trait SlotRequest: Send {
    fn request(&self) -> &BlkRequest;
}

impl SlotRequest for BlkRequest {
    fn request(&self) -> &BlkRequest {
        self
    }
}

/// `user_data` bit marking the CQE of a cancel request (its own result is not interesting).
/// An I/O SQE's `user_data` is its slot index (the engine's only encoding; AIOCB ids are not
/// used as `user_data`).
const CANCEL_BIT: u64 = 1 << 63;

/// Counters, for tests and telemetry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub submitted: u64,
    pub completed: u64,
    /// Successful `fsync(DATASYNC)` operations.
    pub fsyncs: u64,
    pub cancelled: u64,
    /// `io_uring_enter` calls made to submit.
    pub submit_calls: u64,
    /// Writes done with `pwritev2` on the calling thread instead of through the ring (see
    /// [`Engine::set_inline_writes`]).
    pub inline_writes: u64,
    /// Successful `fdatasync`s done on the calling thread (see
    /// [`Engine::set_sync_flush_when_idle`]); also counted in `fsyncs`.
    pub inline_fsyncs: u64,
}

/// A finished request, handed back to the caller.
#[derive(Debug)]
pub struct Completion<R = BlkRequest> {
    pub req: R,
    /// The caller's tag given at [`Engine::push`] (e.g. a connection generation).
    pub tag: u64,
    /// The CQE result: bytes transferred or `-errno`.
    pub result: i32,
}

impl<R: SlotRequest> Completion<R> {
    /// The virtio status this completion gives the guest.
    pub fn status(&self) -> u8 {
        let req = self.req.request();
        match req.kind() {
            // A short transfer is an error: capacity was checked, so the image shrank under us.
            RequestKind::Read { .. } | RequestKind::Write { .. } => {
                if self.result >= 0 && self.result as u32 == req.data_len() {
                    STATUS_OK
                } else {
                    STATUS_IOERR
                }
            }
            // Discard is a hint: a backend that cannot deallocate has still done its job.
            RequestKind::Discard { .. } if self.result == -libc::EOPNOTSUPP => STATUS_OK,
            _ if self.result == 0 => STATUS_OK,
            _ => STATUS_IOERR,
        }
    }
}

struct Slot<R> {
    req: Option<R>,
    tag: u64,
    dsync: bool,
    /// WRITE_ZEROES without UNMAP fell back from ZERO_RANGE to PUNCH_HOLE.
    fallback: bool,
    /// Starts only after everything submitted before it completed, and holds back what comes
    /// after it (`IOSQE_IO_DRAIN`); never run inline.
    ordered: bool,
}

/// One io_uring and its slot pool. Owned by a single queue thread.
pub struct Engine<R: SlotRequest = BlkRequest> {
    ring: IoUring,
    image: Arc<Image>,
    slots: Box<[Slot<R>]>,
    free: Vec<u32>,
    in_flight: u32,
    /// The filesystem rejected ZERO_RANGE once: use PUNCH_HOLE for WRITE_ZEROES from now on.
    no_zero_range: bool,
    /// Plain buffered writes are done on this thread (see [`Engine::set_inline_writes`]).
    inline_writes: bool,
    /// A FLUSH with nothing on the ring is an `fdatasync` on this thread (see
    /// [`Engine::set_sync_flush_when_idle`]).
    sync_flush_when_idle: bool,
    /// Slots finished without the ring (inline writes) and their results, oldest first;
    /// handed out by the next drain like CQEs. Capacity: one per slot, never reallocated.
    ready: VecDeque<(u32, i32)>,
    stats: EngineStats,
}

/// An io_uring setup error that says what was being set up and the usual cause of its errno,
/// instead of a bare "Operation not permitted".
fn setup_error(step: &str, e: io::Error) -> io::Error {
    let cause = match e.raw_os_error() {
        Some(libc::EPERM) => {
            "; io_uring is disabled (sysctl kernel.io_uring_disabled) or blocked by a seccomp \
             filter (container runtimes block it by default)"
        }
        Some(libc::ENOMEM) => "; the locked-memory limit is too low for the ring (ulimit -l)",
        Some(libc::ENOSYS) => "; this kernel has no io_uring (Linux 5.6 or newer is needed)",
        Some(libc::EINVAL) => "; this kernel does not support the ring parameters (too old?)",
        _ => "",
    };
    io::Error::new(e.kind(), format!("io_uring setup: {step}: {e}{cause}"))
}

impl<R: SlotRequest> Engine<R> {
    /// A ring with room for `depth` requests in flight (at least 1).
    pub fn new(image: Arc<Image>, depth: u32) -> io::Result<Engine<R>> {
        let depth = depth.clamp(1, 4096);
        let entries = depth.next_power_of_two();
        // CQ twice the SQ: room for every request plus the CQEs of cancel requests.
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)
            .map_err(|e| setup_error(&format!("creating a ring of {entries} entries"), e))?;
        let slots = (0..depth)
            .map(|_| Slot {
                req: None,
                tag: 0,
                dsync: false,
                fallback: false,
                ordered: false,
            })
            .collect();
        Ok(Engine {
            ring,
            image,
            slots,
            free: (0..depth).rev().collect(),
            in_flight: 0,
            no_zero_range: false,
            inline_writes: false,
            sync_flush_when_idle: false,
            ready: VecDeque::with_capacity(depth as usize),
            stats: EngineStats::default(),
        })
    }

    /// Writes WRITE requests without `dsync` synchronously with `pwritev2` in [`Engine::push`]
    /// instead of through the ring; they complete through the next drain like the others.
    ///
    /// Why: a filesystem that cannot do a buffered write without blocking (ext4, tmpfs: they
    /// refuse `RWF_NOWAIT` writes) makes io_uring punt every such write to an io-wq worker
    /// thread, and writes to one file run one at a time there anyway. The worker then costs a
    /// thread wakeup per batch and a wakeup of this thread per completion on top of the copy, and on a
    /// small host it competes with this thread and the frontend for the CPU. Done here, the copy
    /// into the page cache is the whole cost (see docs/benchmarks.md). O_DIRECT writes and
    /// write-through (`dsync`) writes, which wait for the device, stay on the ring, so reads
    /// queued behind them are not delayed by the disk.
    /// Only takes effect where the kernel would punt ([`Image::buffered_writes_punted`]).
    pub fn set_inline_writes(&mut self, on: bool) {
        self.inline_writes = on && self.image.buffered_writes_punted();
    }

    /// Makes a FLUSH that finds nothing in flight on the ring a plain `fdatasync` on this
    /// thread, in [`Engine::push`]; it completes through the next drain like the others.
    ///
    /// Why: through the ring, an fsync always goes to an io-wq worker (it blocks), so a lone
    /// FLUSH costs two thread wakeups on top of the sync itself (the worker's, then this
    /// thread's through the ring fd); at queue depth 1 that is most of what separates the
    /// guest's FLUSH from the kernel's fdatasync (docs/benchmarks.md). With other requests in
    /// flight the FLUSH stays on the ring, so their completions are not held up behind the
    /// sync; requests that arrive while it runs wait for it.
    pub fn set_sync_flush_when_idle(&mut self, on: bool) {
        self.sync_flush_when_idle = on;
    }

    /// Whether [`Engine::set_inline_writes`] is in effect.
    pub fn inline_writes(&self) -> bool {
        self.inline_writes
    }

    /// The fd to wait on for completions (level-triggered `POLLIN`): the ring's own, readable
    /// while its CQ holds completions. Register it in the thread's epoll loop. Completions done
    /// without the ring ([`Engine::set_inline_writes`], [`Engine::set_sync_flush_when_idle`])
    /// do not make it readable: they are finished inside [`Engine::push`], so the caller
    /// checks [`Engine::has_completions`] after pushing.
    pub fn poll_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Calls `f` with every request the engine holds (submitted or finished, not yet handed
    /// back), in slot order.
    pub fn for_each_in_flight(&self, mut f: impl FnMut(&R)) {
        for r in self.slots.iter().filter_map(|s| s.req.as_ref()) {
            f(r);
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// SQEs queued and not yet handed to the kernel.
    pub fn queued(&mut self) -> usize {
        self.ring.submission().len()
    }

    pub fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Queues `req` for submission. No syscall unless the SQ is full. `dsync` makes a write
    /// durable before it completes (write-through cache mode). Returns the request back when
    /// every slot is busy.
    // The request travels by value on purpose: boxing it would allocate per request.
    #[allow(clippy::result_large_err)]
    pub fn push(&mut self, req: R, tag: u64, dsync: bool) -> Result<(), R> {
        self.push_with(req, tag, dsync, false)
    }

    /// [`push`](Self::push) as a barrier: the request starts only after everything pushed
    /// before it has completed, and nothing pushed after it starts before it completes. For
    /// replayed requests, whose guest order must hold although they were issued concurrently
    /// (overlapping writes of one checkpoint). Costs parallelism: not for the normal path.
    #[allow(clippy::result_large_err)]
    pub fn push_in_order(&mut self, req: R, tag: u64, dsync: bool) -> Result<(), R> {
        self.push_with(req, tag, dsync, true)
    }

    #[allow(clippy::result_large_err)]
    fn push_with(&mut self, req: R, tag: u64, dsync: bool, ordered: bool) -> Result<(), R> {
        let Some(idx) = self.free.pop() else {
            return Err(req);
        };
        let slot = &mut self.slots[idx as usize];
        slot.req = Some(req);
        slot.tag = tag;
        slot.dsync = dsync;
        slot.fallback = false;
        slot.ordered = ordered;
        let kind = slot.req.as_ref().expect("just filled").request().kind();
        let inline = !ordered
            && match kind {
                RequestKind::Write { .. } => self.inline_writes && !dsync,
                // Only finished (ready) slots are busy: nothing is on the ring.
                RequestKind::Flush => {
                    self.sync_flush_when_idle && self.ready.len() as u32 == self.in_flight
                }
                _ => false,
            };
        if inline {
            let result = if kind == RequestKind::Flush {
                let r = self.fdatasync_now();
                self.stats.inline_fsyncs += u64::from(r == 0);
                r
            } else {
                self.stats.inline_writes += 1;
                self.write_now(idx)
            };
            self.ready.push_back((idx, result));
            self.in_flight += 1;
            self.stats.submitted += 1;
            return Ok(());
        }
        if let Err(e) = self.queue_sqe(idx) {
            // Cannot reach the kernel at all: hand the request back untouched.
            log::error!("io_uring submit failed: {e}");
            self.free.push(idx);
            return Err(self.slots[idx as usize]
                .req
                .take()
                .expect("slot just filled"));
        }
        self.in_flight += 1;
        self.stats.submitted += 1;
        Ok(())
    }

    fn sqe_for(&self, idx: u32) -> squeue::Entry {
        let slot = &self.slots[idx as usize];
        let req = slot
            .req
            .as_ref()
            .expect("busy slot holds a request")
            .request();
        let fd = types::Fd(self.image.as_raw_fd());
        let off = req.offset();
        let sqe = match req.kind() {
            RequestKind::Read { .. } => {
                let iov = req.iovecs();
                opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                    .offset(off)
                    .build()
            }
            RequestKind::Write { .. } => {
                let iov = req.iovecs();
                opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                    .offset(off)
                    .rw_flags(if slot.dsync { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            RequestKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            RequestKind::Discard { sectors, .. } => {
                opcode::Fallocate::new(fd, u64::from(sectors) << SECTOR_SHIFT)
                    .offset(off)
                    .mode(self.image.discard_mode())
                    .build()
            }
            RequestKind::WriteZeroes { sectors, unmap, .. } => {
                let unmap = unmap || slot.fallback || self.no_zero_range;
                opcode::Fallocate::new(fd, u64::from(sectors) << SECTOR_SHIFT)
                    .offset(off)
                    .mode(self.image.write_zeroes_mode(unmap))
                    .build()
            }
            // Answered by the device without I/O; a no-op keeps the slot protocol uniform.
            RequestKind::GetId => opcode::Nop::new().build(),
        };
        let sqe = if slot.ordered {
            sqe.flags(squeue::Flags::IO_DRAIN)
        } else {
            sqe
        };
        sqe.user_data(u64::from(idx))
    }

    /// `pwritev2` of a busy slot's write request; returns bytes written or `-errno`, like a CQE.
    fn write_now(&self, idx: u32) -> i32 {
        let req = self.slots[idx as usize]
            .req
            .as_ref()
            .expect("busy slot holds a request")
            .request();
        let iov = req.iovecs();
        loop {
            // SAFETY: the iovecs point into guest memory the request keeps mapped while it
            // exists; the kernel only reads them during the call.
            let n = unsafe {
                libc::pwritev2(
                    self.image.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as i32,
                    req.offset() as libc::off_t,
                    0,
                )
            };
            if n >= 0 {
                return n as i32;
            }
            let err = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if err != libc::EINTR {
                return -err;
            }
        }
    }

    /// `fdatasync` of the image; 0 or `-errno`, like a CQE.
    fn fdatasync_now(&self) -> i32 {
        loop {
            // SAFETY: a plain syscall on a descriptor the image keeps open.
            if unsafe { libc::fdatasync(self.image.as_raw_fd()) } == 0 {
                return 0;
            }
            let err = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if err != libc::EINTR {
                return -err;
            }
        }
    }

    fn queue_sqe(&mut self, idx: u32) -> io::Result<()> {
        let sqe = self.sqe_for(idx);
        self.push_raw(&sqe)
    }

    fn push_raw(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the buffers an SQE points to (iovecs inside a busy slot, guest memory)
            // stay valid until its CQE is reaped: slots are only freed in `reap`.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            // SQ full: hand what we have to the kernel to make room.
            self.submit()?;
        }
    }

    /// Hands every queued SQE to the kernel in one `io_uring_enter`.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.stats.submit_calls += 1;
        match self.ring.submit() {
            Ok(_) => Ok(()),
            // EBUSY: the CQ is backed up; the caller drains and submits again later.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether completions are waiting in the CQ (no syscall). Page-cache hits complete inside
    /// the `io_uring_enter` that submitted them, so this is worth checking right after
    /// [`Engine::submit`].
    pub fn has_completions(&mut self) -> bool {
        !self.ready.is_empty() || !self.ring.completion().is_empty()
    }

    /// Reaps every available completion, calling `f` for each finished request. Returns how
    /// many requests finished. No syscall unless a fallback is resubmitted.
    pub fn drain(&mut self, mut f: impl FnMut(Completion<R>)) -> usize {
        let mut n = 0;
        while let Some((idx, result)) = self.ready.pop_front() {
            f(self.finish_slot(idx, result));
            n += 1;
        }
        loop {
            let cqe = self.ring.completion().next();
            let Some(cqe) = cqe else { break };
            let ud = cqe.user_data();
            if ud & CANCEL_BIT != 0 {
                continue;
            }
            let idx = ud as u32;
            if idx as usize >= self.slots.len() || self.slots[idx as usize].req.is_none() {
                log::error!("io_uring: completion for idle slot {idx}");
                continue;
            }
            if self.retry_with_fallback(idx, cqe.result()) {
                continue;
            }
            f(self.finish_slot(idx, cqe.result()));
            n += 1;
        }
        // Retries queued above go out now.
        if let Err(e) = self.submit() {
            log::error!("io_uring submit failed: {e}");
        }
        n
    }

    /// Frees a busy slot and makes its completion.
    fn finish_slot(&mut self, idx: u32, result: i32) -> Completion<R> {
        let slot = &mut self.slots[idx as usize];
        let req = slot.req.take().expect("finishing a busy slot");
        self.free.push(idx);
        self.in_flight -= 1;
        self.stats.completed += 1;
        if result == -libc::ECANCELED {
            self.stats.cancelled += 1;
        }
        if req.request().kind() == RequestKind::Flush && result == 0 {
            self.stats.fsyncs += 1;
        }
        Completion {
            req,
            tag: slot.tag,
            result,
        }
    }

    /// WRITE_ZEROES without UNMAP on a filesystem without ZERO_RANGE: punch a hole instead
    /// (it reads back as zeroes). Returns true when the request was requeued.
    fn retry_with_fallback(&mut self, idx: u32, result: i32) -> bool {
        let slot = &mut self.slots[idx as usize];
        let is_plain_wz = matches!(
            slot.req.as_ref().map(|r| r.request().kind()),
            Some(RequestKind::WriteZeroes { unmap: false, .. })
        );
        if !(is_plain_wz && result == -libc::EOPNOTSUPP && !slot.fallback) {
            return false;
        }
        slot.fallback = true;
        self.no_zero_range = true;
        self.queue_sqe(idx).is_ok()
    }

    /// Asks the kernel to cancel every request in flight. Cancelled requests complete with
    /// `-ECANCELED` through [`Engine::drain`]; ones the kernel cannot cancel complete normally.
    pub fn cancel_all(&mut self) -> io::Result<()> {
        self.cancel_all_with(|_| {})
    }

    /// [`Engine::cancel_all`], calling `mark` on each request before its cancel goes out (an
    /// AIOCB records the request: `InFlight::request_cancel`, so its `-ECANCELED` completion
    /// is a cancel, not a failure). The ASYNC_CANCEL SQE addresses the request by its slot's
    /// `user_data` (the slot index) and carries `CANCEL_BIT` itself, so its own CQE is
    /// skipped by the drain.
    pub fn cancel_all_with(&mut self, mut mark: impl FnMut(&mut R)) -> io::Result<()> {
        for idx in 0..self.slots.len() as u32 {
            if let Some(req) = self.slots[idx as usize].req.as_mut() {
                mark(req);
                let sqe = opcode::AsyncCancel::new(u64::from(idx))
                    .build()
                    .user_data(CANCEL_BIT | u64::from(idx));
                self.push_raw(&sqe)?;
            }
        }
        self.submit()
    }

    /// Blocks until no request is in flight, handing each completion to `f`.
    pub fn wait_idle(&mut self, mut f: impl FnMut(Completion<R>)) -> io::Result<()> {
        while self.in_flight > 0 {
            self.drain(&mut f);
            if self.in_flight == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<R: SlotRequest> Drop for Engine<R> {
    fn drop(&mut self) {
        // The kernel may still write into guest memory for requests in flight: never let the
        // ring go away under them.
        if self.in_flight > 0 {
            let _ = self.cancel_all();
            let _ = self.wait_idle(|_| {});
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::OpenOpts;
    use crate::request::{parse, DiskLimits, STATUS_OK};
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    use virtio_bindings::virtio_blk::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;
    const SECTORS: u64 = 2048; // 1 MiB image
    const LIMITS: DiskLimits = DiskLimits {
        capacity_sectors: SECTORS,
        readonly: false,
    };

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        image: Arc<Image>,
        mem: Mem,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let mut f = std::fs::File::create(&path).unwrap();
        // Non-zero pattern so that zeroing is visible.
        f.write_all(&vec![0xaau8; (SECTORS * 512) as usize])
            .unwrap();
        f.sync_all().unwrap();
        let image = Arc::new(Image::open(&path, OpenOpts::default()).unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        Fixture {
            _dir: dir,
            path,
            image,
            mem,
        }
    }

    fn d(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Builds a request through the real parser. `n` selects private header/status addresses.
    fn req(mem: &Mem, n: u64, rtype: u32, sector: u64, data: Option<(u64, u32)>) -> BlkRequest {
        let hdr_at = 0x1_0000 + n * 32;
        let status_at = 0x2_0000 + n;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr_at)).unwrap();
        let data_write = matches!(rtype, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        let mut v = vec![d(hdr_at, 16, false)];
        if let Some((a, l)) = data {
            v.push(d(a, l, data_write));
        }
        v.push(d(status_at, 1, true));
        let q = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        parse(q.build_desc_chain(&v).unwrap(), &LIMITS).unwrap()
    }

    fn dwz(mem: &Mem, n: u64, rtype: u32, sector: u64, num: u32, flags: u32) -> BlkRequest {
        let seg_at = 0x3_0000 + n * 16;
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(seg_at)).unwrap();
        req(mem, n, rtype, 0, Some((seg_at, 16)))
    }

    fn run_all(e: &mut Engine) -> Vec<Completion> {
        e.submit().unwrap();
        let mut out = Vec::new();
        e.wait_idle(|c| out.push(c)).unwrap();
        out
    }

    fn file_bytes(path: &std::path::Path, off: u64, len: usize) -> Vec<u8> {
        let mut f = std::fs::File::open(path).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        let mut b = vec![0u8; len];
        f.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn write_then_read_back_through_the_ring() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 8).unwrap();
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        fx.mem
            .write_slice(&pattern, GuestAddress(0x10_0000))
            .unwrap();
        e.push(
            req(&fx.mem, 0, VIRTIO_BLK_T_OUT, 8, Some((0x10_0000, 4096))),
            7,
            false,
        )
        .unwrap();
        let c = run_all(&mut e);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].tag, 7);
        assert_eq!(c[0].result, 4096);
        assert_eq!(c[0].status(), STATUS_OK);
        assert_eq!(file_bytes(&fx.path, 8 * 512, 4096), pattern);

        e.push(
            req(&fx.mem, 1, VIRTIO_BLK_T_IN, 8, Some((0x20_0000, 4096))),
            0,
            false,
        )
        .unwrap();
        let c = run_all(&mut e);
        assert_eq!(c[0].status(), STATUS_OK);
        assert_eq!(c[0].req.used_len(STATUS_OK), 4097);
        let mut back = vec![0u8; 4096];
        fx.mem
            .read_slice(&mut back, GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(back, pattern);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn inline_writes_finish_in_push_and_complete_through_drain() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 8).unwrap();
        e.set_inline_writes(true);
        // Only where the kernel would punt (ext4, tmpfs); elsewhere writes stay on the ring.
        assert_eq!(e.inline_writes(), fx.image.buffered_writes_punted());
        if !e.inline_writes() {
            return;
        }
        for i in 0..4u64 {
            let data = 0x10_0000 + i * 4096;
            fx.mem
                .write_slice(&[0x10 + i as u8; 4096], GuestAddress(data))
                .unwrap();
            e.push(
                req(&fx.mem, i, VIRTIO_BLK_T_OUT, i * 8, Some((data, 4096))),
                i,
                false,
            )
            .unwrap();
        }
        // Written already, before any submit, and waiting to be reaped.
        assert!(file_bytes(&fx.path, 3 * 4096, 4096)
            .iter()
            .all(|&b| b == 0x13));
        assert!(e.has_completions());
        assert_eq!(e.in_flight(), 4);
        // A read and a write-through write still go through the ring.
        e.push(
            req(&fx.mem, 10, VIRTIO_BLK_T_IN, 0, Some((0x20_0000, 4096))),
            10,
            false,
        )
        .unwrap();
        e.push(
            req(&fx.mem, 11, VIRTIO_BLK_T_OUT, 64, Some((0x10_0000, 512))),
            11,
            true,
        )
        .unwrap();
        let mut c = run_all(&mut e);
        c.sort_by_key(|c| c.tag);
        assert_eq!(
            c.iter().map(|c| c.tag).collect::<Vec<_>>(),
            [0, 1, 2, 3, 10, 11]
        );
        assert!(c.iter().all(|c| c.status() == STATUS_OK), "{c:?}");
        assert_eq!(e.stats().inline_writes, 4);
        assert_eq!(e.stats().completed, 6);
        assert_eq!(e.in_flight(), 0);
        let mut back = vec![0u8; 4096];
        fx.mem
            .read_slice(&mut back, GuestAddress(0x20_0000))
            .unwrap();
        assert!(
            back.iter().all(|&b| b == 0x10),
            "read sees the inline write"
        );
        assert!(file_bytes(&fx.path, 64 * 512, 512)
            .iter()
            .all(|&b| b == 0x10));
    }

    #[test]
    fn inline_writes_are_never_used_with_o_direct() {
        let fx = fixture();
        let opts = OpenOpts {
            readonly: false,
            direct: true,
        };
        // tmpfs has no O_DIRECT.
        let Ok(direct) = Image::open(&fx.path, opts) else {
            return;
        };
        let mut e: Engine = Engine::new(Arc::new(direct), 4).unwrap();
        e.set_inline_writes(true);
        assert!(!e.inline_writes());
    }

    #[test]
    fn flush_is_a_real_fdatasync() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 4).unwrap();
        e.push(req(&fx.mem, 0, VIRTIO_BLK_T_FLUSH, 0, None), 0, false)
            .unwrap();
        let c = run_all(&mut e);
        assert_eq!(c[0].result, 0);
        assert_eq!(c[0].status(), STATUS_OK);
        assert_eq!(e.stats().fsyncs, 1);
    }

    #[test]
    fn a_lone_flush_is_an_fdatasync_on_the_calling_thread() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 4).unwrap();
        e.set_sync_flush_when_idle(true);
        e.push(req(&fx.mem, 0, VIRTIO_BLK_T_FLUSH, 0, None), 5, false)
            .unwrap();
        // Done inside push: visible before any submit, and nothing went to the kernel ring.
        assert!(e.has_completions());
        assert_eq!(e.stats().inline_fsyncs, 1);
        let c = run_all(&mut e);
        assert_eq!((c[0].tag, c[0].result, c[0].status()), (5, 0, STATUS_OK));
        assert_eq!(e.stats().fsyncs, 1);
        assert_eq!(e.stats().submit_calls, 0);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn a_flush_behind_requests_in_flight_goes_through_the_ring() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 4).unwrap();
        e.set_sync_flush_when_idle(true);
        // A read on the ring, not reaped yet: the FLUSH must not wait for the sync in push.
        e.push(
            req(&fx.mem, 0, VIRTIO_BLK_T_IN, 0, Some((0x10_0000, 4096))),
            0,
            false,
        )
        .unwrap();
        e.push(req(&fx.mem, 1, VIRTIO_BLK_T_FLUSH, 0, None), 1, false)
            .unwrap();
        let c = run_all(&mut e);
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.status() == STATUS_OK), "{c:?}");
        assert_eq!(e.stats().inline_fsyncs, 0);
        assert_eq!(e.stats().fsyncs, 1);
        // Off by default (the commit engine keeps its own sync on the ring).
        let mut plain = Engine::new(fx.image.clone(), 4).unwrap();
        plain
            .push(req(&fx.mem, 2, VIRTIO_BLK_T_FLUSH, 0, None), 2, false)
            .unwrap();
        assert_eq!(run_all(&mut plain)[0].result, 0);
        assert_eq!(plain.stats().inline_fsyncs, 0);
        assert_eq!(plain.stats().fsyncs, 1);
    }

    #[test]
    fn discard_and_write_zeroes_zero_the_range() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 4).unwrap();
        e.push(dwz(&fx.mem, 0, VIRTIO_BLK_T_DISCARD, 0, 256, 0), 0, false)
            .unwrap();
        e.push(
            dwz(&fx.mem, 1, VIRTIO_BLK_T_WRITE_ZEROES, 512, 8, 0),
            0,
            false,
        )
        .unwrap();
        e.push(
            dwz(&fx.mem, 2, VIRTIO_BLK_T_WRITE_ZEROES, 1024, 256, 1),
            0,
            false,
        )
        .unwrap();
        let c = run_all(&mut e);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|c| c.status() == STATUS_OK), "{c:?}");
        assert!(file_bytes(&fx.path, 0, 256 * 512).iter().all(|&b| b == 0));
        assert!(file_bytes(&fx.path, 512 * 512, 8 * 512)
            .iter()
            .all(|&b| b == 0));
        assert!(file_bytes(&fx.path, 1024 * 512, 256 * 512)
            .iter()
            .all(|&b| b == 0));
        // Neighbours untouched, size kept.
        assert!(file_bytes(&fx.path, 256 * 512, 512)
            .iter()
            .all(|&b| b == 0xaa));
        assert!(file_bytes(&fx.path, 520 * 512, 512)
            .iter()
            .all(|&b| b == 0xaa));
        assert_eq!(std::fs::metadata(&fx.path).unwrap().len(), SECTORS * 512);
        // Punched holes really deallocated blocks (ext4/xfs/tmpfs support PUNCH_HOLE).
        assert!(std::fs::metadata(&fx.path).unwrap().blocks() < SECTORS);
    }

    #[test]
    fn many_requests_one_submit_all_reaped() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 64).unwrap();
        for i in 0..64u64 {
            let data = 0x10_0000 + i * 4096;
            fx.mem
                .write_slice(&[i as u8; 4096], GuestAddress(data))
                .unwrap();
            e.push(
                req(&fx.mem, i, VIRTIO_BLK_T_OUT, i * 8, Some((data, 4096))),
                i,
                false,
            )
            .unwrap();
        }
        // Pool is full now: the 65th request comes back untouched.
        let extra = req(&fx.mem, 100, VIRTIO_BLK_T_FLUSH, 0, None);
        let back = e.push(extra, 0, false).unwrap_err();
        assert_eq!(back.kind(), RequestKind::Flush);
        assert_eq!(e.in_flight(), 64);
        let c = run_all(&mut e);
        assert_eq!(c.len(), 64);
        assert_eq!(
            e.stats().submit_calls,
            1,
            "one io_uring_enter for the whole batch"
        );
        let mut tags: Vec<u64> = c.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..64).collect::<Vec<_>>());
        for i in 0..64u64 {
            assert!(file_bytes(&fx.path, i * 4096, 4096)
                .iter()
                .all(|&b| b == i as u8));
        }
        // The slots are free again.
        e.push(req(&fx.mem, 100, VIRTIO_BLK_T_FLUSH, 0, None), 0, false)
            .unwrap();
        assert_eq!(run_all(&mut e).len(), 1);
    }

    #[test]
    fn drain_reaps_everything_after_one_poll_fd_wakeup() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 16).unwrap();
        for i in 0..16u64 {
            e.push(
                req(
                    &fx.mem,
                    i,
                    VIRTIO_BLK_T_IN,
                    i,
                    Some((0x10_0000 + i * 512, 512)),
                ),
                i,
                false,
            )
            .unwrap();
        }
        e.submit().unwrap();
        // Wait for the ring fd like the epoll loop would, then drain once per wakeup.
        let mut done = 0;
        while done < 16 {
            let mut pfd = libc::pollfd {
                fd: e.poll_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            assert_eq!(
                unsafe { libc::poll(&mut pfd, 1, 5000) },
                1,
                "ring fd never became readable"
            );
            done += e.drain(|c| assert_eq!(c.status(), STATUS_OK));
        }
        assert_eq!(done, 16);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn inline_completions_are_visible_right_after_submit() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 4).unwrap();
        assert!(!e.has_completions());
        // GET_ID is a NOP in the ring: it always completes inside io_uring_enter.
        e.push(
            req(&fx.mem, 0, VIRTIO_BLK_T_GET_ID, 0, Some((0x10_0000, 20))),
            3,
            false,
        )
        .unwrap();
        assert!(!e.has_completions(), "nothing before submit");
        e.submit().unwrap();
        assert!(e.has_completions(), "the NOP completed inside submit");
        let mut tags = Vec::new();
        assert_eq!(e.drain(|c| tags.push(c.tag)), 1);
        assert_eq!(tags, vec![3]);
        assert!(!e.has_completions());
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn cancel_hands_every_request_back_once() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 32).unwrap();
        for i in 0..32u64 {
            e.push(req(&fx.mem, i, VIRTIO_BLK_T_FLUSH, 0, None), i, false)
                .unwrap();
        }
        e.submit().unwrap();
        e.cancel_all().unwrap();
        let mut seen = [0u32; 32];
        e.wait_idle(|c| {
            assert!(
                c.result == 0 || c.result == -libc::ECANCELED,
                "{}",
                c.result
            );
            if c.result == -libc::ECANCELED {
                assert_eq!(c.status(), crate::request::STATUS_IOERR);
            }
            seen[c.tag as usize] += 1;
        })
        .unwrap();
        assert!(seen.iter().all(|&n| n == 1));
        assert_eq!(e.in_flight(), 0);
        assert_eq!(e.stats().completed, 32);
    }

    #[test]
    fn slots_can_hold_a_wrapped_request() {
        struct Held {
            id: u64,
            req: BlkRequest,
        }
        impl SlotRequest for Held {
            fn request(&self) -> &BlkRequest {
                &self.req
            }
        }
        let fx = fixture();
        let mut e: Engine<Held> = Engine::new(fx.image.clone(), 4).unwrap();
        fx.mem
            .write_slice(&[9; 1024], GuestAddress(0x10_0000))
            .unwrap();
        let req = req(&fx.mem, 0, VIRTIO_BLK_T_OUT, 2, Some((0x10_0000, 1024)));
        e.push(Held { id: 41, req }, 41, false).ok().unwrap();
        e.submit().unwrap();
        let mut got = Vec::new();
        e.wait_idle(|c| got.push((c.req.id, c.status()))).unwrap();
        assert_eq!(got, vec![(41, STATUS_OK)]);
        assert_eq!(file_bytes(&fx.path, 1024, 1024), vec![9; 1024]);
    }

    /// The commit engine's shutdown cancel: each request in flight is marked (an AIOCB's
    /// `request_cancel`) before its ASYNC_CANCEL goes out, so its completion knows it was a
    /// requested cancel; requests completed before the cancel are not marked.
    #[test]
    fn cancel_all_with_marks_each_request_in_flight() {
        struct Held {
            marked: bool,
            req: BlkRequest,
        }
        impl SlotRequest for Held {
            fn request(&self) -> &BlkRequest {
                &self.req
            }
        }
        let fx = fixture();
        let mut e: Engine<Held> = Engine::new(fx.image.clone(), 8).unwrap();
        for i in 0..8u64 {
            let req = req(&fx.mem, i, VIRTIO_BLK_T_FLUSH, 0, None);
            e.push(Held { marked: false, req }, i, false).ok().unwrap();
        }
        e.submit().unwrap();
        let mut got = Vec::new();
        e.drain(|c| got.push((c.req.marked, c.result)));
        let before = got.len();
        e.cancel_all_with(|h| h.marked = true).unwrap();
        e.wait_idle(|c| got.push((c.req.marked, c.result))).unwrap();
        assert_eq!(got.len(), 8);
        assert!(got[..before].iter().all(|&(m, _)| !m));
        assert!(got[before..].iter().all(|&(m, _)| m));
        assert!(got
            .iter()
            .all(|&(m, r)| r == 0 || (m && r == -libc::ECANCELED)));
    }

    #[test]
    fn unsubmitted_requests_are_cancelled_before_they_run() {
        // Queued but never submitted: cancelling in the same batch stops them (or they finish);
        // either way each comes back exactly once and the engine ends idle.
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 4).unwrap();
        fx.mem
            .write_slice(&[0x55; 512], GuestAddress(0x10_0000))
            .unwrap();
        e.push(
            req(&fx.mem, 0, VIRTIO_BLK_T_OUT, 0, Some((0x10_0000, 512))),
            0,
            false,
        )
        .unwrap();
        e.cancel_all().unwrap();
        let mut n = 0;
        e.wait_idle(|_| n += 1).unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn write_through_uses_dsync_and_short_reads_fail() {
        let fx = fixture();
        let mut e = Engine::new(fx.image.clone(), 4).unwrap();
        fx.mem
            .write_slice(&[1; 512], GuestAddress(0x10_0000))
            .unwrap();
        e.push(
            req(&fx.mem, 0, VIRTIO_BLK_T_OUT, 0, Some((0x10_0000, 512))),
            0,
            true,
        )
        .unwrap();
        assert_eq!(run_all(&mut e)[0].status(), STATUS_OK);
        // Shrink the image under the engine: a read of the tail is short and must fail.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fx.path)
            .unwrap()
            .set_len(512)
            .unwrap();
        e.push(
            req(&fx.mem, 1, VIRTIO_BLK_T_IN, 0, Some((0x10_0000, 1024))),
            0,
            false,
        )
        .unwrap();
        let c = run_all(&mut e);
        assert_eq!(c[0].result, 512);
        assert_eq!(c[0].status(), crate::request::STATUS_IOERR);
    }
}
