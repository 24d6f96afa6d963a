// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The per-queue worker: pops chains, parses them, feeds the io_uring engine, completes.
//!
//! Runs on the queue's worker thread (ft-common's server gives each queue its own thread), so
//! the engine, its ring and its slot pool belong to exactly one thread and need no lock, and
//! every completion is delivered by the thread that owns the ring (as the virtio-blk dataplane
//! does).
//!
//! Invariants:
//! - A chain popped from the ring is answered exactly once: at once (parse error, GET_ID) or
//!   when its engine slot completes. The used-ring notification is sent once per batch (kick or
//!   CQ drain), subject to EVENT_IDX.
//! - Stopping a queue (GET_VRING_BASE, disconnect, shutdown) waits until the engine is idle:
//!   every in-flight request is completed to the guest before the ring's base is reported, so
//!   no request of an old connection is leaked or completed twice.
//! - Data is read into guest memory by the kernel, so the written ranges are marked dirty
//!   before the request is completed.
//! - A request parsed from broken guest memory (`BlkRequest::memory_broken`: the parse or an
//!   earlier access of this connection faulted on a truncated page, which now reads as zeros)
//!   is neither held nor submitted; see `gate::commit` for the window that remains.
//!
//! With `--ft hold` output requests go into the device's transaction queue instead of the
//! engine (`BlkQueue::dispatch` is the seam); what the worker keeps for that (owed heads, a
//! parked request, deferred completions, cancel on reset) is [`crate::gate::worker`].

use crate::config::BlkConfig;
use crate::engine::{Completion, Engine};
use crate::gate::hold::{GateAck, GateMsg, GateReply, Hold};
use crate::gate::worker::QueueHold;
use crate::image::Image;
use crate::request::{parse, BlkRequest, DiskLimits, RequestKind, STATUS_IOERR, STATUS_OK};
use crate::used::{answer_rejected, finish};
use ft_common::control::QueueState;
use ft_common::vhost_user::{QueueWorker, StopStatus, VringHandle, WorkerCtx};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

/// Token of the engine's ring fd in the worker's epoll set.
const ENGINE_TOKEN: u64 = 1;

/// Requests taken off the ring per `io_uring_enter` and guest notification. Measured with
/// ft-blk-bench at 4k QD32 (docs/benchmarks.md): a whole ring-full per batch gave 167k random
/// read IOPS on an idle machine, chunks of 2 to 16 about 320k; with a CPU hog beside, 8 did
/// best (343-428k, ring-full 293-326k, 4 264-274k).
const CHUNK: u32 = 8;
/// A chunk also ends once it carries this much data: large requests take long to copy, so
/// their replies should not wait for each other (128k sequential read QD8: 0.80x qsd's IOPS with
/// one chunk for all 8, see docs/benchmarks.md).
const CHUNK_BYTES: u64 = 64 << 10;

/// Device-wide counters, summed over queues; updated once per batch, not per request.
#[derive(Debug, Default)]
pub struct BlkCounters {
    /// Chains taken off the rings.
    pub requests: AtomicU64,
    /// Chains answered with an error status at parse time (or never answerable).
    pub rejected: AtomicU64,
    /// Requests that went through io_uring and completed (any status).
    pub completed: AtomicU64,
    /// FLUSH requests that completed a real `fsync(DATASYNC)` on the image.
    pub fsyncs: AtomicU64,
    /// Of those, the ones run as `fdatasync` on the queue thread (nothing else in flight).
    pub inline_fsyncs: AtomicU64,
}

impl BlkCounters {
    pub fn summary(&self) -> String {
        format!(
            "requests {}, rejected {}, completed I/O {}, FLUSH fdatasyncs {} ({} on the queue thread)",
            self.requests.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
            self.completed.load(Ordering::Relaxed),
            self.fsyncs.load(Ordering::Relaxed),
            self.inline_fsyncs.load(Ordering::Relaxed),
        )
    }
}

pub struct BlkQueue {
    queue: u16,
    engine: Engine,
    config: Arc<BlkConfig>,
    limits: DiskLimits,
    /// The ring was left with chains on it because every slot was busy; resume on completion.
    stalled: bool,
    counters: Arc<BlkCounters>,
    /// Engine stats already added to `counters`.
    reported: crate::engine::EngineStats,
    /// Output-commit state; None with `--ft off` (the plain path is untouched).
    hold: Option<QueueHold>,
    /// Longest busy-polling window after a batch (`--poll-max-ns`); zero: never poll.
    poll_max: Duration,
    /// Polling pauses while the host has no idle CPU (off: `--poll-on-busy-host`).
    poll_cpu_guard: bool,
}

impl BlkQueue {
    pub fn new(
        queue: u16,
        image: Arc<Image>,
        config: Arc<BlkConfig>,
        depth: u32,
        counters: Arc<BlkCounters>,
        hold: Option<Arc<Hold>>,
        poll_max: Duration,
    ) -> std::io::Result<BlkQueue> {
        let limits = DiskLimits {
            capacity_sectors: config.params().capacity_sectors,
            readonly: config.params().readonly,
        };
        let mut engine = Engine::new(image, depth)?;
        // Buffered writes the kernel would punt, and lone FLUSHes, run on this thread (see
        // the engine's docs and docs/benchmarks.md).
        engine.set_inline_writes(true);
        engine.set_sync_flush_when_idle(true);
        Ok(BlkQueue {
            queue,
            engine,
            config,
            limits,
            stalled: false,
            counters,
            reported: Default::default(),
            hold: hold.map(|shared| QueueHold::new(queue, shared, depth)),
            poll_max,
            poll_cpu_guard: true,
        })
    }

    /// See [`QueueWorker::poll_cpu_guard`].
    pub fn with_poll_cpu_guard(mut self, on: bool) -> BlkQueue {
        self.poll_cpu_guard = on;
        self
    }

    /// Publishes the engine's counters accumulated since the last call.
    fn publish(&mut self) {
        let now = self.engine.stats();
        let c = &self.counters;
        c.completed
            .fetch_add(now.completed - self.reported.completed, Ordering::Relaxed);
        c.fsyncs
            .fetch_add(now.fsyncs - self.reported.fsyncs, Ordering::Relaxed);
        c.inline_fsyncs.fetch_add(
            now.inline_fsyncs - self.reported.inline_fsyncs,
            Ordering::Relaxed,
        );
        self.reported = now;
    }

    /// Write-through unless the guest negotiated FLUSH and left the cache in write-back mode
    /// (virtio 1.x 5.2.6.2: without FLUSH the device must not rely on the guest flushing).
    fn dsync(&self, ctx: &WorkerCtx) -> bool {
        let flush_acked = ctx.acked_features() & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        !(flush_acked && self.config.writeback())
    }

    /// Takes every available chain off the ring, answering or submitting each, in chunks of
    /// [`CHUNK`] requests or [`CHUNK_BYTES`]: one `io_uring_enter` per chunk, then the chunk's page-cache hits (which
    /// complete inside that submit) are answered and the guest is notified before the next
    /// chunk is taken. Notifying per chunk rather than per ring-full lets the frontend work on
    /// the first replies while this thread does the rest; one ring-full answered at once makes
    /// both sides take turns and sleep.
    fn process_ring(&mut self, ctx: &mut WorkerCtx) {
        let dsync = self.dsync(ctx);
        // While the worker polls, guest notifications stay off and it looks at the ring again.
        let polling = ctx.polling();
        if ctx.queue(self.queue).is_none() {
            return;
        }
        self.stalled = false;
        if let Some(h) = self.hold.as_mut() {
            // Still full: only owed resubmissions are taken below; wait for a commit.
            h.retry_parked();
        }
        let (mut popped, mut rejected) = (0u64, 0u64);
        while let Some(vring) = ctx.queue(self.queue) {
            let more = self.take_chunk(vring, dsync, polling, &mut popped, &mut rejected);
            if let Err(e) = self.engine.submit() {
                log::error!("queue {}: io_uring submit: {e}", self.queue);
            }
            if let Some(h) = self.hold.as_mut() {
                h.deliver_deferred(vring);
            }
            // Page-cache hits have completed inside that submit: answer them now instead of
            // one epoll round trip later. Reaped, they leave nothing that wakes the thread.
            if self.engine.has_completions() {
                self.drain_engine(ctx);
            }
            if let Some(vring) = ctx.queue(self.queue) {
                vring.signal_used();
            }
            if !more {
                break;
            }
        }
        self.counters.requests.fetch_add(popped, Ordering::Relaxed);
        self.counters
            .rejected
            .fetch_add(rejected, Ordering::Relaxed);
        // The drains above may have emptied the CQ: if they freed slots of a stalled ring, no
        // later wakeup would resume it, so resume now.
        if self.stalled && self.engine.in_flight() < self.engine.capacity() {
            self.process_ring(ctx);
        }
    }

    /// Takes up to [`CHUNK`] chains ([`CHUNK_BYTES`] of data) off the ring. Returns true if it
    /// stopped at the chunk limit (call again), false once the ring is empty with notifications
    /// re-armed (or left off while `polling`), every engine slot is busy (`stalled`), or a
    /// request is parked.
    fn take_chunk(
        &mut self,
        vring: &mut VringHandle,
        dsync: bool,
        polling: bool,
        popped: &mut u64,
        rejected: &mut u64,
    ) -> bool {
        let (mut taken, mut bytes) = (0, 0u64);
        let mut idle_rechecks = 0;
        loop {
            let taken_before = taken;
            vring.disable_notification();
            loop {
                if taken == CHUNK || bytes >= CHUNK_BYTES {
                    return true;
                }
                let resubmit = vring.resubmit_pending() > 0;
                let parked = self.hold.as_ref().is_some_and(QueueHold::is_parked);
                if !resubmit && (parked || self.engine.in_flight() >= self.engine.capacity()) {
                    break;
                }
                let Some(chain) = vring.pop() else { break };
                if resubmit
                    && self
                        .hold
                        .as_ref()
                        .is_some_and(|h| h.owes(chain.head_index()))
                {
                    // Still held from before the ring stopped: not a new request.
                    continue;
                }
                taken += 1;
                *popped += 1;
                if let Some(h) = self.hold.as_mut() {
                    h.taken(chain.head_index());
                }
                match parse(chain, &self.limits) {
                    Err(rej) => {
                        *rejected += 1;
                        answer_rejected(vring, rej);
                    }
                    Ok(req) if req.kind() == RequestKind::GetId => {
                        let n = req.write_data(&**vring.memory(), &self.config.params().serial);
                        // The id buffer may be shorter than 20 bytes: a truncated id is fine.
                        finish(
                            vring,
                            req.head(),
                            req.status_addr(),
                            STATUS_OK,
                            n as u32 + 1,
                        );
                    }
                    Ok(req) => {
                        bytes += u64::from(req.data_len());
                        // Replayed or resubmitted requests were in flight together on the
                        // primary (or the previous daemon): keep the order they were taken in.
                        self.dispatch(vring, req, dsync, resubmit)
                    }
                }
            }
            if self.engine.in_flight() >= self.engine.capacity() {
                // Leave the rest on the ring; completions will call us again.
                self.stalled = true;
                return false;
            }
            if self.hold.as_ref().is_some_and(QueueHold::is_parked) {
                // The transaction queue is full; a commit resumes us.
                return false;
            }
            if polling || !vring.enable_notification() {
                return false;
            }
            // New chains were announced. The ring marks itself broken when the guest's state
            // cannot yield them; this bound is the second line (as in net's TX): a ring that
            // keeps announcing without yielding is left alone until the next kick.
            if taken == taken_before {
                idle_rechecks += 1;
                if idle_rechecks > 1 {
                    return false;
                }
            }
        }
    }

    /// Sends a parsed request on its way. This is the seam for output commit: with `--ft hold`,
    /// requests whose `kind().is_output()` go into the transaction queue here (tagged with the
    /// open epoch) instead of the engine, and are pushed to the engine from there at COMMIT.
    /// `in_order`: the engine runs it only after everything before it (replayed requests; held
    /// ones keep guest order through the transaction queue anyway).
    fn dispatch(
        &mut self,
        vring: &mut VringHandle,
        mut req: BlkRequest,
        dsync: bool,
        in_order: bool,
    ) {
        req.hold_memory(vring.memory().clone());
        if req.memory_broken() {
            // Parsing it (or another access of this connection) faulted on memory the
            // frontend truncated: its sector or data may now read as zeros. Never held,
            // never written; the completion is refused like every other on broken memory,
            // and the connection is being closed.
            finish(vring, req.head(), req.status_addr(), STATUS_IOERR, 1);
            return;
        }
        if let Some(h) = self.hold.as_mut() {
            if req.kind().is_output() {
                h.hold(vring, req);
                return;
            }
        }
        let pushed = if in_order {
            self.engine.push_in_order(req, 0, dsync)
        } else {
            self.engine.push(req, 0, dsync)
        };
        if let Err(req) = pushed {
            finish(vring, req.head(), req.status_addr(), STATUS_IOERR, 1);
        }
    }

    /// This queue's part of a SEALED record (see [`QueueHold::record`]); the reads still in
    /// the engine are outstanding too.
    fn record(&self, ctx: &WorkerCtx) -> QueueState {
        match &self.hold {
            Some(h) => h.record(ctx, |each| {
                self.engine.for_each_in_flight(|r| each(r.head()))
            }),
            // Only hold mode has a control socket that asks.
            None => QueueState {
                queue: self.queue,
                ..Default::default()
            },
        }
    }

    /// Completes everything in the engine's CQ (no signal, no syscall).
    fn drain_engine(&mut self, ctx: &mut WorkerCtx) {
        let queue = self.queue;
        self.engine.drain(|c: Completion| complete(ctx, queue, c));
        self.publish();
    }

    /// Completes everything the engine has finished.
    fn reap(&mut self, ctx: &mut WorkerCtx) {
        let queue = self.queue;
        self.drain_engine(ctx);
        if let Some(v) = ctx.queue(queue) {
            v.signal_used();
        }
        if self.stalled {
            self.process_ring(ctx);
        }
    }
}

fn complete(ctx: &mut WorkerCtx, queue: u16, c: Completion) {
    let status = c.status();
    if status == STATUS_OK {
        c.req
            .for_each_written_range(c.req.data_len() as usize, |gpa, len| {
                ctx.mark_dirty(gpa, len)
            });
    } else {
        // Negative results are -errno; a non-negative one here is a short transfer.
        log::warn!(
            "queue {queue}: {:?} failed (result {}, expected {} bytes)",
            c.req.kind(),
            c.result,
            c.req.data_len()
        );
    }
    match ctx.queue(queue) {
        Some(v) => finish(
            v,
            c.req.head(),
            c.req.status_addr(),
            status,
            c.req.used_len(status),
        ),
        // Cannot happen: a ring is only dropped once stop_queue reported the engine idle.
        None => log::error!("queue {queue}: completion for a ring that is gone"),
    }
}

impl QueueWorker for BlkQueue {
    type Msg = GateMsg;
    type Reply = GateReply;

    fn fds(&self) -> Vec<(RawFd, u64)> {
        vec![(self.engine.poll_fd(), ENGINE_TOKEN)]
    }

    fn handle_kick(&mut self, ctx: &mut WorkerCtx, queue: u16) {
        if queue == self.queue {
            self.process_ring(ctx);
        }
    }

    fn handle_fd(&mut self, ctx: &mut WorkerCtx, token: u64, _events: u32) {
        if token == ENGINE_TOKEN {
            self.reap(ctx);
        }
    }

    fn poll_max(&self) -> Duration {
        self.poll_max
    }

    fn poll_cpu_guard(&self) -> bool {
        self.poll_cpu_guard
    }

    fn poll(&mut self, ctx: &mut WorkerCtx) -> bool {
        let mut progress = false;
        if self.engine.has_completions() {
            self.reap(ctx);
            progress = true;
        }
        // A stalled ring (all slots busy) or a parked request waits for completions or a
        // commit; its avail entries are not work yet.
        let blocked = self.stalled || self.hold.as_ref().is_some_and(QueueHold::is_parked);
        if !blocked && ctx.queue(self.queue).is_some_and(|v| v.has_avail()) {
            self.process_ring(ctx);
            progress = true;
        }
        progress
    }

    fn stop_queue(&mut self, ctx: &mut WorkerCtx, queue: u16) -> StopStatus {
        if queue != self.queue {
            return StopStatus::Done;
        }
        // Plain I/O on a local image finishes quickly: complete it rather than cancel, so the
        // guest sees every request it issued answered. (Held requests of the output-commit
        // mode will be cancelled here instead.)
        self.stalled = false;
        let q = self.queue;
        self.engine.drain(|c| complete(ctx, q, c));
        // Held requests stay held (and owed) across the stop; see the module docs.
        if let Some(v) = ctx.queue(q) {
            v.signal_used();
        }
        self.publish();
        if self.engine.in_flight() == 0 {
            log::debug!("queue {q}: stopped, engine {:?}", self.engine.stats());
            StopStatus::Done
        } else {
            StopStatus::Pending
        }
    }

    fn reset(&mut self, _ctx: &mut WorkerCtx) {
        self.stalled = false;
        self.config.reset();
        if let Some(h) = self.hold.as_mut() {
            h.reset();
        }
    }

    fn handle_message(&mut self, ctx: &mut WorkerCtx, msg: GateMsg) -> GateReply {
        if let GateMsg::Record = msg {
            return GateReply::Record(self.record(ctx));
        }
        let Some(h) = self.hold.as_mut() else {
            return GateReply::Ack(GateAck::default());
        };
        let resume = matches!(msg, GateMsg::Complete(_));
        let ack = h.handle(ctx, msg);
        // Room was freed: take from the ring again (a parked request first).
        if resume && ctx.queue(self.queue).is_some() {
            self.process_ring(ctx);
        }
        GateReply::Ack(ack)
    }
}
