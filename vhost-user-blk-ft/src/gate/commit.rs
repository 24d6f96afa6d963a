// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The commit engine: executes the held requests of a `COMMIT` on the control thread's own
//! io_uring ([`Engine`] with AIOCB slots), then makes them durable with one `fdatasync`.
//!
//! Ordering: requests are submitted in *waves*. A request's wave is one more than the highest
//! wave of any earlier (in guest order) request whose byte range overlaps it, so overlapping
//! writes land in guest order while disjoint ones share a wave and run in parallel. Each wave
//! is submitted in groups of `SUBMIT_GROUP` (so the disk starts on the first writes while
//! the later ones are prepared) and is drained before the next.
//! FLUSH requests are not submitted: the commit's single `fdatasync` satisfies every one of
//! them (Kemari review: drain, then one fsync, never a fsync per request).
//!
//! Never with I/O in flight: a wave is submitted, and the `fdatasync` issued, only when
//! nothing of the batch is in flight any more, and [`CommitEngine::run`] returns only then,
//! whatever fails on the way (a failed wait for completions falls back to draining every
//! millisecond). Otherwise a later overlapping write could overtake an earlier one, the sync
//! would not cover it, and its guest completion would be lost.
//!
//! Errors: a failed or short write fails itself, and every FLUSH after it in guest order; a
//! failed `fdatasync` fails everything in the batch (nothing is reported durable that is not).
//! Nothing is retried.
//!
//! Cancel: daemon shutdown calls [`CommitCancel::cancel`]. A running commit then submits nothing
//! more (queued AIOCBs are cancelled, never written), sends `IORING_OP_ASYNC_CANCEL` for the ones
//! in flight and waits for those the kernel cannot cancel; it skips the `fdatasync` and fails
//! every request of the batch (nothing is reported durable that is not).
//!
//! Broken guest memory: a request whose connection's memory faulted (the frontend truncated a
//! file under it, see `ft_common::vhost_user::sigbus`) is never submitted; it fails with
//! EFAULT like a write the kernel could not copy, and its completion is refused anyway. The
//! check is made per request just before it is queued, after everything the daemon itself
//! reads of the batch (replication's copy into the epoch frame, which checks after its copy
//! too). The fault handler records the connection broken before it maps the zero page, so a
//! fault this thread caused, or one that happened before the check, is always seen.
//! *What remains*: a fault by another thread (a queue worker parsing a header that shares the
//! page) between the check and the kernel's copy of the data; the kernel then copies the zero
//! page. Those zeros land only in the range of a request that is never completed towards the
//! guest (so the range has no defined contents for it), and the request is still outstanding
//! in its checkpoint and the inflight region, from which it is resubmitted with the guest's
//! data. Never submitting after a fault was seen is what the check guarantees, not that a
//! concurrent fault cannot race the kernel's copy.
//!
//! Cost per commit of N writes with no overlaps: N / `SUBMIT_GROUP` `io_uring_enter`s to
//! submit (plus waits for completions) and one `fdatasync`, no allocation once the buffers have
//! grown. Buffered writes to a file whose filesystem would hand each of them to an io-wq worker
//! (ext4, tmpfs) are written on this thread instead (`Engine::set_inline_writes`): no
//! submission at all, and no worker wakeup per write; O_DIRECT writes stay on the ring.

use crate::engine::{Completion, Engine};
use crate::gate::hold::{held_bytes, HeldReq};
use crate::image::{Image, SECTOR_SHIFT};
use crate::request::{RequestKind, STATUS_IOERR, STATUS_OK};
use ft_common::aiocb::{Aiocb, AiocbId, InFlight};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// SQEs handed to the kernel per `io_uring_enter` within a wave. io_uring plugs a submission
/// of more than two SQEs: the block layer dispatches none of its requests before it has
/// prepared them all (about 4 µs per 4 KiB O_DIRECT write here), so one `io_uring_enter` for a
/// 32-write epoch left the disk idle for the first ~130 µs of every commit, and sent it the
/// rest only at the end. In groups of 4 the disk works on each group while the next is
/// prepared: on a fully allocated image the 32 writes of a commit took 248-345 µs p50 instead
/// of 343-442 and hold mode ran about 1.1x faster; groups of 2 to 16 measured within noise of
/// 4, and submitting the first 4 early but the rest in one plug gained little. Writes into
/// holes of a sparse image go to io-wq workers anyway and measured the same either way
/// (docs/benchmarks.md, "the commit's writes were plugged").
const SUBMIT_GROUP: usize = 4;

/// Cancels the running and every later commit (daemon shutdown). Cheap to clone; any thread.
#[derive(Clone, Debug)]
pub struct CommitCancel(Arc<CancelInner>);

#[derive(Debug)]
struct CancelInner {
    cancelled: AtomicBool,
    /// Wakes a commit waiting for completions.
    wake: EventFd,
}

impl CommitCancel {
    fn new() -> std::io::Result<CommitCancel> {
        Ok(CommitCancel(Arc::new(CancelInner {
            cancelled: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })))
    }

    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::Release);
        // Fails only if the counter would overflow, and then a wakeup is pending anyway.
        let _ = self.0.wake.write(1);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::Acquire)
    }
}

/// How a commit waits for completions: `ppoll(2)` semantics (a seam for fault-injection tests).
type PollFn = fn(&mut [libc::pollfd]) -> std::io::Result<()>;

fn ppoll_forever(fds: &mut [libc::pollfd]) -> std::io::Result<()> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfds; no timeout, no sigmask.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `engine` is idle, handing each completion to `f`; on cancel, asks the kernel to
/// cancel everything in flight (once) and keeps waiting for what it could not cancel.
///
/// Returns only when nothing is in flight, whatever fails: the kernel may still read guest
/// memory for a request in flight, a later wave must not overtake it, and the `fdatasync` after
/// the last wave must cover it. A failed wait (`poll`) is logged once and replaced by draining
/// every millisecond.
fn wait_all(
    engine: &mut Engine<InFlight<HeldReq>>,
    cancel: &CommitCancel,
    cancel_sent: &mut bool,
    poll: PollFn,
    mut f: impl FnMut(Completion<InFlight<HeldReq>>),
) {
    let mut poll_failed = false;
    loop {
        engine.drain(&mut f);
        if engine.in_flight() == 0 {
            return;
        }
        if cancel.is_cancelled() && !*cancel_sent {
            *cancel_sent = true;
            // Each AIOCB records the request, so a kernel cancel completes as `Cancelled`.
            if let Err(e) = engine.cancel_all_with(|a| {
                let _ = a.request_cancel();
            }) {
                log::error!("commit: ASYNC_CANCEL: {e}");
            }
            continue;
        }
        if poll_failed {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut fds = [
            libc::pollfd {
                fd: engine.poll_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: cancel.0.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // After the cancel went out only completions matter (the wake fd stays readable).
        let n = if *cancel_sent { 1 } else { 2 };
        match poll(&mut fds[..n]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::error!(
                    "commit: poll: {e}; waiting for {} requests in flight by draining every ms",
                    engine.in_flight()
                );
                poll_failed = true;
            }
        }
    }
}

/// What one commit did.
#[derive(Debug, Default)]
pub struct CommitOutcome {
    /// Every request of the batch with the status its guest completion must carry.
    pub done: Vec<(HeldReq, u8)>,
    pub requests: u64,
    pub bytes: u64,
    /// Submit of the first wave to the drain of the last.
    pub submit_to_drain: Duration,
    pub fdatasync: Duration,
    /// Whether an `fdatasync` was issued (not for an empty batch).
    pub synced: bool,
    pub waves: u32,
    /// `io_uring_enter` calls made to submit.
    pub submit_calls: u64,
    /// The first failure: message and errno, if any.
    pub error: Option<(String, Option<i32>)>,
}

pub struct CommitEngine {
    engine: Engine<InFlight<HeldReq>>,
    image: Arc<Image>,
    /// Per batch: the queued AIOCBs (taken out wave by wave) and their waves.
    pending: Vec<Option<Aiocb<HeldReq>>>,
    wave: Vec<u32>,
    /// Per batch: flushes (answered by the sync), finished requests with their status, and
    /// requests a shutdown kept from being submitted. Fields, not locals, so that nothing of a
    /// batch is lost if a commit panics (see [`CommitEngine::salvage`]).
    flushes: Vec<(AiocbId, HeldReq)>,
    results: Vec<(AiocbId, HeldReq, u8)>,
    never_submitted: Vec<HeldReq>,
    /// Shared so the daemon can report it after the control thread has taken the engine.
    fdatasyncs: Arc<AtomicU64>,
    cancel: CommitCancel,
    poll: PollFn,
}

/// The byte range a request changes on the image; None for FLUSH (no range).
fn range(req: &crate::request::BlkRequest) -> Option<(u64, u64)> {
    let len = match req.kind() {
        RequestKind::Write { .. } => u64::from(req.data_len()),
        RequestKind::Discard { sectors, .. } | RequestKind::WriteZeroes { sectors, .. } => {
            u64::from(sectors) << SECTOR_SHIFT
        }
        _ => return None,
    };
    Some((req.offset(), req.offset().saturating_add(len)))
}

impl CommitEngine {
    /// `depth`: requests in flight at once (the held-request limit is a good choice).
    pub fn new(image: Arc<Image>, depth: u32) -> std::io::Result<CommitEngine> {
        let mut engine = Engine::new(image.clone(), depth)?;
        // Buffered writes on this thread instead of one io-wq hand-off each (they run one at
        // a time there anyway); O_DIRECT writes stay on the ring.
        engine.set_inline_writes(true);
        Ok(CommitEngine {
            engine,
            image,
            pending: Vec::new(),
            wave: Vec::new(),
            flushes: Vec::new(),
            results: Vec::new(),
            never_submitted: Vec::new(),
            fdatasyncs: Arc::new(AtomicU64::new(0)),
            cancel: CommitCancel::new()?,
            poll: ppoll_forever,
        })
    }

    /// The handle that cancels this engine's commits (for shutdown).
    pub fn cancel_handle(&self) -> CommitCancel {
        self.cancel.clone()
    }

    /// `fdatasync` calls that succeeded so far.
    pub fn fdatasyncs(&self) -> u64 {
        self.fdatasyncs.load(Ordering::Relaxed)
    }

    /// The live count of successful commit `fdatasync`s, for the daemon's exit summary.
    pub fn fdatasync_counter(&self) -> Arc<AtomicU64> {
        self.fdatasyncs.clone()
    }

    /// Executes `batch` (guest order, as `take_committable` hands it out) and syncs once.
    ///
    /// Every request of the batch lives in `self` (queued, in flight in the engine, or done)
    /// until it is handed back in the outcome, so should this panic, [`CommitEngine::salvage`]
    /// finds all of them.
    pub fn run(&mut self, batch: Vec<Aiocb<HeldReq>>) -> CommitOutcome {
        let mut out = CommitOutcome {
            requests: batch.len() as u64,
            ..Default::default()
        };
        if batch.is_empty() {
            return out;
        }
        out.done.reserve(batch.len());
        let submit_calls0 = self.engine.stats().submit_calls;
        // Flushes wait for the sync; their ids decide whether a failed write precedes them.
        self.pending.clear();
        self.flushes.clear();
        self.results.clear();
        self.never_submitted.clear();
        for a in batch {
            out.bytes += held_bytes(&a.payload().req);
            if a.payload().req.kind() == RequestKind::Flush {
                self.flushes.push((a.id(), a.cancel()));
            } else {
                self.pending.push(Some(a));
            }
        }
        self.assign_waves();
        let mut first_failed: Option<AiocbId> = None;
        let max_wave = self.wave.iter().copied().max().unwrap_or(0);
        let mut cancel_sent = false;
        let t0 = Instant::now();
        let results = &mut self.results;
        let mut collect = |c: Completion<InFlight<HeldReq>>,
                           ff: &mut Option<AiocbId>,
                           err: &mut Option<(String, Option<i32>)>| {
            let status = c.status();
            let done = c.req.complete(c.result);
            if status != STATUS_OK {
                *ff = Some(ff.map_or(done.id, |f| f.min(done.id)));
                if err.is_none() {
                    let errno = (c.result < 0).then(|| -c.result);
                    let what = match errno {
                        Some(e) => std::io::Error::from_raw_os_error(e).to_string(),
                        None => format!("short transfer ({} bytes)", c.result),
                    };
                    *err = Some((
                        format!(
                            "{:?} of request {}: {what}",
                            done.payload.req.kind(),
                            done.id
                        ),
                        errno,
                    ));
                }
            }
            results.push((done.id, done.payload, status));
        };
        for w in 0..=max_wave {
            for i in 0..self.pending.len() {
                if self.wave[i] != w {
                    continue;
                }
                let Some(a) = self.pending[i].take() else {
                    continue;
                };
                if self.cancel.is_cancelled() {
                    // Shutdown: never submitted, never written.
                    self.never_submitted.push(a.cancel());
                    continue;
                }
                if a.payload().req.memory_broken() {
                    // Its guest memory faulted (a truncated memfd): the data may be a zero
                    // page. Never submitted; failed (its completion is refused anyway).
                    let tag = a.id().get();
                    collect(
                        Completion {
                            req: a.submit(),
                            tag,
                            result: -libc::EFAULT,
                        },
                        &mut first_failed,
                        &mut out.error,
                    );
                    continue;
                }
                let tag = a.id().get();
                let mut f = a.submit();
                loop {
                    match self.engine.push(f, tag, false) {
                        Ok(()) => {
                            if self.engine.queued() >= SUBMIT_GROUP {
                                // Start the disk on this group while the next is prepared.
                                let _ = self.engine.submit();
                            }
                            break;
                        }
                        Err(back) => {
                            // Ring full: finish what is in flight, then retry.
                            f = back;
                            let _ = self.engine.submit();
                            if self.engine.in_flight() == 0 {
                                // Cannot reach the kernel at all: fail the request.
                                let errno = libc::EIO;
                                collect(
                                    Completion {
                                        req: f,
                                        tag,
                                        result: -errno,
                                    },
                                    &mut first_failed,
                                    &mut out.error,
                                );
                                break;
                            }
                            let ff = &mut first_failed;
                            let err = &mut out.error;
                            wait_all(
                                &mut self.engine,
                                &self.cancel,
                                &mut cancel_sent,
                                self.poll,
                                |c| collect(c, ff, err),
                            );
                        }
                    }
                }
            }
            let _ = self.engine.submit();
            let ff = &mut first_failed;
            let err = &mut out.error;
            wait_all(
                &mut self.engine,
                &self.cancel,
                &mut cancel_sent,
                self.poll,
                |c| collect(c, ff, err),
            );
        }
        out.waves = max_wave + 1;
        out.submit_to_drain = t0.elapsed();
        out.submit_calls = self.engine.stats().submit_calls - submit_calls0;

        if self.cancel.is_cancelled() {
            // Whatever ran is not made durable and not reported so.
            out.error = Some((
                "commit cancelled: daemon shutting down".into(),
                Some(libc::ECANCELED),
            ));
            out.done
                .extend(self.salvage().into_iter().map(|h| (h, STATUS_IOERR)));
            return out;
        }
        // Failover tests freeze the daemon here: the epoch's writes are drained, not yet durable
        // nor completed towards the guest (a kill in the middle of a commit).
        ft_common::killpoint::reached("before-fdatasync");
        let t1 = Instant::now();
        // SAFETY: plain syscall on the image's fd, which lives as long as `self.image`.
        let rc = unsafe { libc::fdatasync(self.image.as_raw_fd()) };
        out.fdatasync = t1.elapsed();
        out.synced = true;
        let sync_err = if rc == 0 {
            self.fdatasyncs.fetch_add(1, Ordering::Relaxed);
            None
        } else {
            let e = std::io::Error::last_os_error();
            let errno = e.raw_os_error();
            if out.error.is_none() {
                out.error = Some((format!("fdatasync: {e}"), errno));
            }
            Some(e)
        };
        for (_, held, status) in self.results.drain(..) {
            let status = if sync_err.is_some() {
                STATUS_IOERR
            } else {
                status
            };
            out.done.push((held, status));
        }
        for (id, held) in self.flushes.drain(..) {
            let ok = sync_err.is_none() && !matches!(first_failed, Some(f) if f < id);
            out.done
                .push((held, if ok { STATUS_OK } else { STATUS_IOERR }));
        }
        out
    }

    /// Every request of an unfinished [`CommitEngine::run`] (after a panic, or a cancel): waits
    /// for what is in flight (the kernel may still read guest memory), then hands back the
    /// completed, queued, never-submitted requests and flushes. Nothing of them is reported
    /// durable; the caller fails them towards the guest. Empty when no commit is unfinished.
    pub fn salvage(&mut self) -> Vec<HeldReq> {
        let mut out = Vec::new();
        if self.engine.in_flight() > 0 {
            let mut cancel_sent = false;
            wait_all(
                &mut self.engine,
                &self.cancel,
                &mut cancel_sent,
                self.poll,
                |c| out.push(c.req.complete(c.result).payload),
            );
        }
        out.extend(self.results.drain(..).map(|(_, h, _)| h));
        out.extend(self.pending.drain(..).flatten().map(Aiocb::cancel));
        out.extend(self.flushes.drain(..).map(|(_, h)| h));
        out.append(&mut self.never_submitted);
        out
    }

    /// Wave of each queued request (FLUSH is never queued: the sync answers it): one more
    /// than the highest wave of an earlier overlapping request.
    fn assign_waves(&mut self) {
        self.wave.clear();
        let mut waves_of_non_flush: Vec<u32> = Vec::new();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for a in self.pending.iter().flatten() {
            // A request without a range (none is queued) still needs its wave slot.
            let (s, e) = range(&a.payload().req).unwrap_or((0, 0));
            // Quadratic in the batch only when ranges are checked pairwise; batches are bounded
            // by the held-request limit.
            let mut w = 0;
            for (j, &(s2, e2)) in ranges.iter().enumerate() {
                if s < e2 && s2 < e {
                    w = w.max(waves_of_non_flush[j] + 1);
                }
            }
            ranges.push((s, e));
            waves_of_non_flush.push(w);
        }
        self.wave = waves_of_non_flush;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::OpenOpts;
    use crate::request::{parse, BlkRequest, DiskLimits};
    use ft_common::epoch::Epoch;
    use ft_common::txqueue::{Limits, TxQueue};
    use std::io::Write;
    use virtio_bindings::virtio_blk::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;
    const SECTORS: u64 = 4096;
    const LIMITS: DiskLimits = DiskLimits {
        capacity_sectors: SECTORS,
        readonly: false,
    };

    fn d(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// A request built by the real parser; `n` selects private header/status addresses.
    fn req(mem: &Mem, n: u64, rtype: u32, sector: u64, data: Option<(u64, u32)>) -> BlkRequest {
        let hdr_at = 0x1_0000 + n * 32;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr_at)).unwrap();
        let mut v = vec![d(hdr_at, 16, false)];
        if let Some((a, l)) = data {
            v.push(d(a, l, false));
        }
        v.push(d(0x3_0000 + n, 1, true));
        let q = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        parse(q.build_desc_chain(&v).unwrap(), &LIMITS).unwrap()
    }

    struct Fx {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        engine: CommitEngine,
        mem: Mem,
        txq: TxQueue<HeldReq>,
    }

    fn fx() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![0u8; (SECTORS * 512) as usize]).unwrap();
        let image = Arc::new(Image::open(&path, OpenOpts::default()).unwrap());
        Fx {
            _dir: dir,
            path,
            engine: CommitEngine::new(image, 128).unwrap(),
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap(),
            txq: TxQueue::new(Limits {
                max_requests: 128,
                max_bytes: 1 << 30,
            }),
        }
    }

    impl Fx {
        fn write(&mut self, n: u64, sector: u64, fill: u8, len: u32) {
            let data = 0x10_0000 + n * 0x1_0000;
            self.mem
                .write_slice(&vec![fill; len as usize], GuestAddress(data))
                .unwrap();
            let r = req(&self.mem, n, VIRTIO_BLK_T_OUT, sector, Some((data, len)));
            self.hold(r);
        }

        fn hold(&mut self, req: BlkRequest) {
            let bytes = held_bytes(&req);
            self.txq
                .push(
                    HeldReq {
                        queue: 0,
                        conn: 0,
                        req,
                    },
                    bytes,
                )
                .unwrap();
        }

        fn commit(&mut self, e: u64) -> CommitOutcome {
            self.txq.seal(Epoch(e)).unwrap();
            let batch = self.txq.take_committable(Epoch(e)).unwrap();
            self.engine.run(batch)
        }

        fn file(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    #[test]
    fn disjoint_writes_are_one_wave_one_submit_one_sync() {
        let mut f = fx();
        for n in 0..64 {
            f.write(n, n * 8, n as u8 + 1, 4096);
        }
        let flush = req(&f.mem, 100, VIRTIO_BLK_T_FLUSH, 0, None);
        f.hold(flush);
        let out = f.commit(1);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!((out.requests, out.bytes), (65, 64 * 4096));
        assert_eq!(
            (out.waves, out.synced),
            (1, true),
            "one wave, one fdatasync"
        );
        // A buffered image where io_uring would punt each write to io-wq is written on this
        // thread (no submission at all); otherwise the wave goes in groups of SUBMIT_GROUP.
        let punted = f.engine.image.buffered_writes_punted();
        let inline = f.engine.engine.stats().inline_writes;
        assert_eq!(
            (inline, out.submit_calls),
            if punted {
                (64, 0)
            } else {
                (0, 64 / SUBMIT_GROUP as u64)
            },
            "64 disjoint writes: inline when the kernel would punt them, else in groups"
        );
        assert_eq!(f.engine.fdatasyncs(), 1);
        assert_eq!(out.done.len(), 65);
        assert!(out.done.iter().all(|(_, s)| *s == STATUS_OK));
        let file = f.file();
        for n in 0..64usize {
            assert!(file[n * 4096..(n + 1) * 4096]
                .iter()
                .all(|&b| b == n as u8 + 1));
        }
    }

    /// A commit engine of `depth` on the fixture's image opened with O_DIRECT.
    fn direct_engine(path: &std::path::Path, depth: u32) -> CommitEngine {
        let opts = OpenOpts {
            readonly: false,
            direct: true,
        };
        CommitEngine::new(Arc::new(Image::open(path, opts).unwrap()), depth).unwrap()
    }

    #[test]
    fn o_direct_writes_reach_the_kernel_in_groups() {
        let mut f = fx();
        f.engine = direct_engine(&f.path, 64);
        // 30 disjoint writes: groups of SUBMIT_GROUP as they are queued (so the disk starts on
        // the first group before the last is prepared), the remainder with the wave's own
        // submit; still one wave and one fdatasync.
        for n in 0..30 {
            f.write(n, n * 8, n as u8 + 1, 4096);
        }
        let out = f.commit(1);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!((out.waves, out.synced), (1, true));
        assert!(
            out.submit_calls > 1,
            "the first writes must reach the kernel before the last is queued"
        );
        assert_eq!(
            out.submit_calls,
            30_u64.div_ceil(SUBMIT_GROUP as u64),
            "one io_uring_enter per group of {SUBMIT_GROUP}"
        );
        assert_eq!(f.engine.fdatasyncs(), 1);
        let file = f.file();
        for n in 0..30usize {
            assert!(file[n * 4096..(n + 1) * 4096]
                .iter()
                .all(|&b| b == n as u8 + 1));
        }
    }

    /// Groups are per wave: a group submitted mid-wave never lets the next wave overtake it.
    #[test]
    fn o_direct_waves_keep_guest_order_across_groups() {
        let mut f = fx();
        f.engine = direct_engine(&f.path, 64);
        // Six writes, then six more over the same blocks: two waves of two groups each.
        for n in 0..12u64 {
            f.write(n, (n % 6) * 8, n as u8 + 1, 4096);
        }
        let out = f.commit(1);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(
            (out.waves, out.submit_calls),
            (2, 2 * 6_u64.div_ceil(SUBMIT_GROUP as u64))
        );
        let file = f.file();
        for n in 0..6usize {
            assert!(
                file[n * 4096..(n + 1) * 4096]
                    .iter()
                    .all(|&b| b == n as u8 + 7),
                "block {n} does not hold the later write"
            );
        }
    }

    #[test]
    fn overlapping_writes_go_in_waves_in_guest_order() {
        let mut f = fx();
        // 0: [0,8K)  1: [4K,8K) overlaps 0  2: [16K,20K) disjoint  3: [0,4K) overlaps 0
        f.write(0, 0, 0xa0, 8192);
        f.write(1, 8, 0xa1, 4096);
        f.write(2, 32, 0xa2, 4096);
        f.write(3, 0, 0xa3, 4096);
        let out = f.commit(1);
        assert!(out.error.is_none());
        assert_eq!(out.waves, 2);
        let file = f.file();
        assert!(file[..4096].iter().all(|&b| b == 0xa3));
        assert!(file[4096..8192].iter().all(|&b| b == 0xa1));
        assert!(file[16384..20480].iter().all(|&b| b == 0xa2));
    }

    #[test]
    fn a_cancelled_engine_writes_nothing_and_fails_everything() {
        let mut f = fx();
        for n in 0..8 {
            f.write(n, 0, n as u8 + 1, 4096);
        }
        let flush = req(&f.mem, 100, VIRTIO_BLK_T_FLUSH, 0, None);
        f.hold(flush);
        f.engine.cancel_handle().cancel();
        let out = f.commit(1);
        assert_eq!(out.error.as_ref().map(|e| e.1), Some(Some(libc::ECANCELED)));
        assert!(!out.synced);
        assert_eq!(out.done.len(), 9);
        assert!(out.done.iter().all(|(_, s)| *s == STATUS_IOERR));
        assert_eq!(f.engine.fdatasyncs(), 0);
        assert!(f.file().iter().all(|&b| b == 0), "a cancelled commit wrote");
    }

    static FAILED_POLLS: AtomicU64 = AtomicU64::new(0);

    fn failing_poll(_: &mut [libc::pollfd]) -> std::io::Result<()> {
        FAILED_POLLS.fetch_add(1, Ordering::Relaxed);
        Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
    }

    #[test]
    fn a_failing_poll_never_leaves_io_in_flight() {
        let mut f = fx();
        f.engine = direct_engine(&f.path, 8);
        f.engine.poll = failing_poll;
        // Eight overlapping 1 MiB O_DIRECT writes: eight waves, each waiting for the last.
        for n in 0..8 {
            f.write(n, 0, n as u8 + 1, 1 << 20);
        }
        let out = f.commit(1);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.waves, 8);
        assert_eq!(
            f.engine.engine.in_flight(),
            0,
            "returned with I/O in flight"
        );
        assert_eq!(out.done.len(), 8, "completions lost");
        assert!(out.done.iter().all(|(_, s)| *s == STATUS_OK));
        assert!(f.file()[..1 << 20].iter().all(|&b| b == 8), "guest order");
        // Proof that the failure path ran (O_DIRECT writes of 1 MiB do not complete inline).
        assert!(
            FAILED_POLLS.load(Ordering::Relaxed) > 0,
            "poll never called"
        );
    }

    #[test]
    fn empty_commit_does_not_sync() {
        let mut f = fx();
        let out = f.commit(1);
        assert_eq!((out.requests, out.synced, out.waves), (0, false, 0));
        assert_eq!(f.engine.fdatasyncs(), 0);
    }

    #[test]
    fn a_failed_write_fails_later_flushes_only() {
        let mut f = fx();
        let early_flush = req(&f.mem, 50, VIRTIO_BLK_T_FLUSH, 0, None);
        f.hold(early_flush);
        f.write(0, 0, 1, 4096);
        // An engine on a read-only descriptor of the image: the write fails with EBADF while
        // fdatasync still succeeds, so only the write and the flush after it may fail.
        let ro = Arc::new(
            Image::open(
                &f.path,
                OpenOpts {
                    readonly: true,
                    direct: false,
                },
            )
            .unwrap(),
        );
        f.engine = CommitEngine::new(ro, 8).unwrap();
        let late_flush = req(&f.mem, 51, VIRTIO_BLK_T_FLUSH, 0, None);
        f.hold(late_flush);
        let out = f.commit(1);
        let (msg, errno) = out.error.clone().expect("commit must fail");
        assert_eq!(errno, Some(libc::EBADF), "{msg}");
        let statuses: Vec<(RequestKind, u8)> =
            out.done.iter().map(|(h, s)| (h.req.kind(), *s)).collect();
        assert_eq!(
            statuses,
            vec![
                (RequestKind::Write { sector: 0 }, STATUS_IOERR),
                (RequestKind::Flush, STATUS_OK),
                (RequestKind::Flush, STATUS_IOERR),
            ]
        );
    }
}
