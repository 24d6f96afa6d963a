// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The block device's side of the gate ([`ft_common::gate`]): [`BlkGate`] seals, commits,
//! aborts and reports; fencing, the retried-SEAL rule, `--on-commit-error`, the statistics and
//! the replies are the shared gate core's.
//!
//! Runs on the control thread (one request at a time). SEAL and ABORT work on the shared
//! transaction queue under its lock; COMMIT takes the committable batch under the lock, then
//! executes it on the [`CommitEngine`] without the lock (workers keep holding new requests of
//! the open epoch meanwhile), and finally posts each queue worker its completed requests with
//! [`WorkerHandle::post`], so every guest completion happens on the thread owning the ring,
//! which notifies its queue once, while this thread already answers.
//!
//! Decisions:
//! - Order of a commit: writes drained, `fdatasync` returned, guest completions posted to the
//!   workers (each notifies its queue once), then the `COMMITTED` reply, without waiting for the
//!   workers (one thread hand-off less per commit). So a guest never sees a completion for data
//!   that is not durable; the completions are queued before `COMMITTED` goes out, and any later
//!   command that involves a worker (SEAL's record, ABORT) reaches it after them (messages to a
//!   worker are handled in order).
//! - Requests already taken by a commit are not cancelled by a disconnect or reset of their
//!   connection: their epoch is acknowledged, so they may land; their completions are dropped
//!   (the frontend resubmits from its inflight region). Shutdown does cancel them
//!   ([`crate::gate::commit::CommitCancel`]).
//! - `ABORT` cancels every held request (never written) and completes none of them: the deposed
//!   primary's guest is about to be killed, and an IOERR it could still act on would be output
//!   of an epoch that is being rolled back. The workers forget the heads, so should the same
//!   frontend resubmit them (inflight region), they are held again in the open epoch.
//! - A panic inside a commit: the requests the commit had taken are salvaged from the commit
//!   engine and failed towards the guest (IOERR; nothing of them is reported durable), and the
//!   gate answers `COMMIT_FAILED`.
//! - With `--replicate-to`, a commit's completions are handed to the workers only after the
//!   replica acknowledged the epoch ([`crate::gate::replicate`]). A missing acknowledgement is
//!   [`GateError::Held`] (`COMMIT_FAILED`, no IOERR, not a failure `--on-commit-error stop`
//!   acts on: the local commit succeeded and retrying loses nothing): the completions stay
//!   kept, and the next `COMMIT` retries that epoch before it takes anything new.
//! - With `--dirty-log`, a commit marks every block its batch changes in the dirty log and makes
//!   that durable ([`DirtyLog::persist`]: no I/O while the blocks' extents are in the log's
//!   activity log) before anything of the batch is shipped or written; the replica's
//!   acknowledgement clears the epoch's blocks again. A log that cannot be written fails the
//!   batch towards the guest (IOERR) before any of it is shipped or written.

use crate::gate::commit::CommitEngine;
use crate::gate::hold::{held_bytes, GateAck, GateMsg, GateReply, HeldReq, Hold};
use crate::gate::replicate::{changed_range, Replication};
use crate::queue::BlkQueue;
use crate::request::STATUS_IOERR;
use ft_common::control::{DeviceKind, ErrorCode, QueueState, Reply, Request, TransactionState};
use ft_common::epoch::Epoch;
use ft_common::fence::Fence;
use ft_common::gate::{
    AbortDone, CommitDone, CommitFailure, Gate, GateDevice, GateError, HeldView, Identity,
    QueueMerge, Recovery,
};
use ft_common::replica::dirty::DirtyLog;
use ft_common::vhost_user::{ReplayStore, WorkerHandle};
use std::sync::Arc;
use std::time::Instant;

pub use ft_common::gate::OnCommitError;

/// The block device as the gate sees it.
pub struct BlkGate {
    hold: Arc<Hold>,
    /// One per queue, in queue order (virtio-blk runs one queue per worker).
    workers: Vec<WorkerHandle<BlkQueue>>,
    device: String,
    engine: CommitEngine,
    /// The epoch of a commit that took its requests and has not returned (so a panic knows
    /// that its requests must be failed towards the guest).
    committing: Option<Epoch>,
    /// Where `REPLAY` records go (None: refused as unsupported).
    replay: Option<ReplayStore>,
    /// Disk replication to the standby (`--replicate-to`).
    replication: Option<Replication>,
    /// Blocks that may differ from the peer's image (`--dirty-log`), for a failback.
    dirty: Option<DirtyLog>,
}

/// The block daemon's control handler.
pub type BlkControlHandler = Gate<BlkGate>;

/// Builds a [`BlkControlHandler`].
pub struct BlkControl {
    dev: BlkGate,
    policy: OnCommitError,
    fence: Fence,
}

impl BlkControl {
    pub fn new(
        hold: Arc<Hold>,
        workers: Vec<WorkerHandle<BlkQueue>>,
        device: String,
        policy: OnCommitError,
        engine: CommitEngine,
    ) -> BlkControl {
        BlkControl {
            dev: BlkGate {
                hold,
                workers,
                device,
                engine,
                committing: None,
                replay: None,
                replication: None,
                dirty: None,
            },
            policy,
            fence: Fence::default(),
        }
    }

    /// Uses `fence` (e.g. a persistent one, [`Fence::from_state_dir`]) instead of a fresh
    /// in-memory fence.
    pub fn with_fence(mut self, fence: Fence) -> BlkControl {
        self.fence = fence;
        self
    }

    /// Accepts `REPLAY` records into the server's replay store (`VhostUserServer::replay_store`).
    pub fn with_replay(mut self, store: ReplayStore) -> BlkControl {
        self.dev.replay = Some(store);
        self
    }

    /// Ships every committed epoch to a replica and completes its requests only after the
    /// replica acknowledged it.
    pub fn with_replication(mut self, r: Replication) -> BlkControl {
        self.dev.replication = Some(r);
        self
    }

    /// Tracks the blocks every commit changes in `log` before they are written.
    pub fn with_dirty_log(mut self, log: DirtyLog) -> BlkControl {
        self.dev.dirty = Some(log);
        self
    }

    pub fn into_handler(self) -> BlkControlHandler {
        Gate::new(self.dev, self.fence, self.policy)
    }
}

impl BlkGate {
    /// `REPLAY`: the record of the checkpoint a standby VM is restored from, before it runs.
    fn replay(&mut self, state: &TransactionState) -> Reply {
        let Some(store) = &self.replay else {
            return Reply::error(
                ErrorCode::Unsupported,
                "this daemon takes no replay records",
            );
        };
        if state.kind != DeviceKind::Blk {
            return Reply::error(
                ErrorCode::ReplayRefused,
                format!("a {:?} record, not a block device's", state.kind),
            );
        }
        if state.device != self.device {
            log::warn!(
                "REPLAY: record of device {:?}, this daemon serves {:?}",
                state.device,
                self.device
            );
        }
        match store.install(state) {
            Ok(sum) => {
                log::info!(
                    "REPLAY: {} request(s) on {} queue(s), replayed when their rings start",
                    sum.requests,
                    sum.queues
                );
                Reply::ReplayAccepted {
                    queues: sum.queues as u32,
                    requests: sum.requests as u64,
                }
            }
            Err(e) => Reply::error(ErrorCode::ReplayRefused, e.to_string()),
        }
    }

    /// Hands every worker its part of `done` (every worker, so stalled ones resume) without
    /// waiting for them: each completes its part and notifies its queue once, while this
    /// thread answers `COMMITTED`. Returns what was handed over (`completed`) and what was
    /// dropped because its worker is gone; a worker drops completions of a connection that is
    /// gone itself (the frontend resubmits them).
    fn deliver(&self, done: Vec<(HeldReq, u8)>) -> GateAck {
        let mut per_queue: Vec<Vec<(HeldReq, u8)>> =
            (0..self.workers.len()).map(|_| Vec::new()).collect();
        let mut total = GateAck::default();
        for (h, s) in done {
            match per_queue.get_mut(usize::from(h.queue)) {
                Some(v) => v.push((h, s)),
                None => total.dropped += 1,
            }
        }
        for (w, list) in self.workers.iter().zip(per_queue) {
            let n = list.len();
            match w.post(GateMsg::Complete(list)) {
                Ok(()) => total.completed += n,
                Err(e) => {
                    log::error!("commit: {e}");
                    total.dropped += n;
                }
            }
        }
        total
    }
}

impl GateDevice for BlkGate {
    fn identity(&self) -> Identity {
        Identity {
            device: self.device.clone(),
            kind: DeviceKind::Blk,
            mode: "hold".into(),
        }
    }

    fn seal(&mut self, epoch: Epoch) -> Result<Vec<QueueState>, GateError> {
        let mut txq = self.hold.lock();
        txq.seal(epoch)?;
        let mut held = vec![0u32; usize::from(self.hold.num_queues())];
        for a in txq.held() {
            if let Some(n) = held.get_mut(usize::from(a.payload().queue)) {
                *n += 1;
            }
        }
        drop(txq);
        // Each worker reports its ring (outside the lock: a worker takes it to hold a
        // request). The rings are stopped at a checkpoint, so nothing moves meanwhile. All are
        // asked before any answer is awaited: one round of wakeups, not one per queue.
        let asked: Vec<_> = self
            .workers
            .iter()
            .map(|w| w.ask(GateMsg::Record))
            .collect();
        let mut queues = Vec::with_capacity(held.len());
        for (a, held) in asked.into_iter().zip(held) {
            match a.and_then(|a| a.wait()) {
                Ok(GateReply::Record(mut qs)) => {
                    qs.held = held;
                    queues.push(qs);
                }
                _ => {
                    return Err(GateError::Internal(format!(
                        "seal {epoch}: queue worker {} did not answer",
                        queues.len()
                    )))
                }
            }
        }
        Ok(queues)
    }

    fn commit(&mut self, epoch: Epoch) -> Result<CommitDone, GateError> {
        if let Some(r) = &mut self.replication {
            // An earlier epoch still waits for the replica: nothing new before it.
            let kept = r.blocked();
            let done = r
                .retry(self.dirty.as_mut())
                .map_err(|e| GateError::Held(format!("replication: {e}")))?;
            if let Some(e) = kept {
                log::info!("replica acknowledged epoch {e} at last; completing it");
                self.deliver(done);
            }
        }
        let (batch, previous) = {
            let mut txq = self.hold.lock();
            let prev = txq.last_committed();
            (txq.take_committable(epoch)?, prev)
        };
        self.committing = Some(epoch);
        if let Some(d) = &mut self.dirty {
            // Blocks are cleared by the replica's acknowledgement of their epoch; without a
            // replica nothing clears them (they are what a failback copies).
            let tag = self.replication.is_some().then_some(epoch);
            for a in &batch {
                if let Some((offset, len)) = changed_range(&a.payload().req) {
                    d.mark(tag, offset, len);
                }
            }
            if let Err(e) = d.persist() {
                // Not tracked durably, so nothing of the batch may be shipped or written.
                log::error!("commit {epoch}: {e}: the batch fails");
                let requests = batch.len() as u64;
                let bytes = batch.iter().map(|a| held_bytes(&a.payload().req)).sum();
                let failed = batch.into_iter().map(|a| (a.cancel(), STATUS_IOERR));
                self.deliver(failed.collect());
                self.committing = None;
                return Ok(CommitDone {
                    previous,
                    requests,
                    bytes,
                    submit_to_drain: Default::default(),
                    fdatasync: Default::default(),
                    failure: Some(CommitFailure {
                        error: e.to_string(),
                        errno: None,
                    }),
                });
            }
        }
        if let Some(r) = &mut self.replication {
            r.ship(epoch, &batch);
        }
        let mut out = self.engine.run(batch);
        if let Some(r) = &mut self.replication {
            match r.confirm(std::mem::take(&mut out.done), self.dirty.as_mut()) {
                Ok(done) => out.done = done,
                Err(e) => {
                    // Output stays held (nothing completed); the next COMMIT retries.
                    self.committing = None;
                    return Err(GateError::Held(format!("replication: {e}")));
                }
            }
        }
        let delivered = self.deliver(out.done);
        self.committing = None;
        log::debug!(
            "commit {epoch}: {} requests in {} waves, {} submit calls, synced {}; {delivered:?}",
            out.requests,
            out.waves,
            out.submit_calls,
            out.synced
        );
        Ok(CommitDone {
            previous,
            requests: out.requests,
            bytes: out.bytes,
            submit_to_drain: out.submit_to_drain,
            fdatasync: out.fdatasync,
            failure: out
                .error
                .map(|(error, errno)| CommitFailure { error, errno }),
        })
    }

    fn abort(&mut self) -> Result<AbortDone, GateError> {
        let (mut cancelled, last_committed) = {
            let mut txq = self.hold.lock();
            (txq.abort(), txq.last_committed())
        };
        if let Some(r) = &mut self.replication {
            // Deposed: the epoch waiting for the replica is dropped like the held ones.
            cancelled.extend(r.forget(self.dirty.as_mut()));
        }
        let requests = cancelled.len() as u64;
        let bytes = cancelled.iter().map(|h| held_bytes(&h.req)).sum();
        let mut per_queue: Vec<Vec<HeldReq>> =
            (0..self.workers.len()).map(|_| Vec::new()).collect();
        for h in cancelled {
            if let Some(v) = per_queue.get_mut(usize::from(h.queue)) {
                v.push(h);
            }
        }
        for (w, list) in self.workers.iter().zip(per_queue) {
            if !list.is_empty() {
                if let Err(e) = w.call(GateMsg::Forget(list)) {
                    log::error!("abort: {e}");
                }
            }
        }
        Ok(AbortDone {
            requests,
            bytes,
            last_committed,
        })
    }

    fn status(&mut self) -> Result<HeldView, GateError> {
        let txq = self.hold.lock();
        let mut m = QueueMerge::default();
        m.add(&txq.counters(), txq.epochs(), Instant::now());
        drop(txq);
        let mut v = m.into_view();
        v.fdatasyncs = self.engine.fdatasyncs();
        v.replica = self.replication.as_ref().map(Replication::status);
        v.dirty_log = self.dirty.as_ref().map(DirtyLog::status);
        Ok(v)
    }

    fn other(&mut self, req: Request) -> Reply {
        match req {
            Request::Replay { state, .. } => self.replay(&state),
            Request::Announce { .. } => {
                Reply::error(ErrorCode::Unsupported, "ANNOUNCE is for net devices")
            }
            r => Reply::error(ErrorCode::Internal, format!("not a device command: {r:?}")),
        }
    }

    /// Every request of an unfinished commit is failed towards the guest (IOERR; nothing was
    /// made durable), so no guest waits forever.
    fn recover(&mut self) -> Recovery {
        let lost = self.engine.salvage();
        let n = lost.len();
        if n > 0 {
            let ack = self.deliver(lost.into_iter().map(|h| (h, STATUS_IOERR)).collect());
            log::error!("{n} requests of an unfinished commit failed towards the guest ({ack:?})");
        }
        match self.committing.take() {
            Some(_) => Recovery::CommitFailed { failed: n },
            None => Recovery::Untouched,
        }
    }
}
