// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The block daemon's control handler: SEAL / COMMIT / ABORT / STATUS from the coordinator.
//!
//! Runs on the control thread (one request at a time). SEAL and ABORT work on the shared
//! transaction queue under its lock; COMMIT takes the committable batch under the lock, then
//! executes it on the [`CommitEngine`] without the lock (workers keep holding new requests of
//! the open epoch meanwhile), and finally hands each queue worker its completed requests with
//! [`WorkerHandle::call`], so every guest completion happens on the thread owning the ring,
//! which notifies its queue once.
//!
//! Decisions:
//! - Order of a commit: writes drained, `fdatasync` returned, guest completions handed to the
//!   workers (each notifies its queue once), then the `COMMITTED` reply. So a guest never sees a
//!   completion for data that is not durable, and `COMMITTED` also means "answered".
//! - Requests already taken by a commit are not cancelled by a disconnect or reset of their
//!   connection: their epoch is acknowledged, so they may land; their completions are dropped
//!   (the frontend resubmits from its inflight region). Shutdown does cancel them
//!   ([`crate::gate::commit::CommitCancel`]).
//! - A repeated `SEAL E` of the last sealed epoch (the coordinator lost the reply) is answered
//!   with the very `SEALED` record of the first seal, not re-sealed; any other old epoch is
//!   `STALE_EPOCH`.
//! - `ABORT` cancels every held request (never written) and completes none of them: the deposed
//!   primary's guest is about to be killed, and an IOERR it could still act on would be output
//!   of an epoch that is being rolled back. The workers forget the heads, so should the same
//!   frontend resubmit them (inflight region), they are held again in the open epoch.
//! - After `COMMIT_FAILED` under `--on-commit-error stop` every later COMMIT is refused with
//!   `COMMIT_REFUSED`; SEAL, ABORT and STATUS keep working.

use crate::gate::commit::CommitEngine;
use crate::gate::hold::{held_bytes, GateAck, GateMsg, HeldReq, Hold, RecordQuery};
use crate::request::STATUS_IOERR;
use ft_common::control::gate::{self, EpochMerge};
use ft_common::control::{
    CommitStats, ControlHandler, DeviceKind, DeviceStatus, ErrorCode, QueueState, Reply, Request,
    TransactionState,
};
use ft_common::epoch::{Epoch, Fence};
use ft_common::vhost_user::{ReplayStore, WorkerHandle};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What to do after a failed commit (`--on-commit-error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnCommitError {
    /// Refuse every further commit until the operator restarts the daemon.
    Stop,
    /// Report the failure and keep committing later epochs.
    Report,
}

#[derive(Default)]
struct State {
    fence: Fence,
    commits_ok: u64,
    commits_failed: u64,
    commit_refused: bool,
    last_commit: Option<CommitStats>,
    /// The last SEALED reply, answered again to a retried SEAL of the same epoch.
    last_sealed: Option<(Epoch, Reply)>,
}

pub struct BlkControl {
    hold: Arc<Hold>,
    /// One per queue, in queue order (virtio-blk runs one queue per worker).
    workers: Vec<WorkerHandle>,
    device: String,
    policy: OnCommitError,
    engine: CommitEngine,
    state: State,
    /// Where `REPLAY` records go (None: refused as unsupported).
    replay: Option<ReplayStore>,
}

/// `BlkControl` behind the lock the `ControlHandler` trait needs (`&self`).
pub struct BlkControlHandler(Mutex<BlkControl>);

impl BlkControl {
    pub fn new(
        hold: Arc<Hold>,
        workers: Vec<WorkerHandle>,
        device: String,
        policy: OnCommitError,
        engine: CommitEngine,
    ) -> BlkControl {
        BlkControl {
            hold,
            workers,
            device,
            policy,
            engine,
            state: State::default(),
            replay: None,
        }
    }

    /// Uses `fence` (e.g. a persistent one, [`Fence::from_state_dir`]) instead of a fresh
    /// in-memory fence.
    pub fn with_fence(mut self, fence: Fence) -> BlkControl {
        self.state.fence = fence;
        self
    }

    /// Accepts `REPLAY` records into the server's replay store (`VhostUserServer::replay_store`).
    pub fn with_replay(mut self, store: ReplayStore) -> BlkControl {
        self.replay = Some(store);
        self
    }

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

    pub fn into_handler(self) -> BlkControlHandler {
        BlkControlHandler(Mutex::new(self))
    }

    fn seal(&mut self, epoch: Epoch) -> Reply {
        let mut txq = self.hold.lock();
        if let Some((e, reply)) = &self.state.last_sealed {
            if *e == epoch && txq.last_sealed() == Some(epoch) {
                return reply.clone();
            }
        }
        if let Err(e) = txq.seal(epoch) {
            return gate::tx_error_reply(e);
        }
        let mut held = vec![0u32; usize::from(self.hold.num_queues())];
        for a in txq.held() {
            if let Some(n) = held.get_mut(usize::from(a.payload().queue)) {
                *n += 1;
            }
        }
        drop(txq);
        // Each worker reports its ring (outside the lock: a worker takes it to hold a
        // request). The rings are stopped at a checkpoint, so nothing moves meanwhile.
        let mut queues = Vec::with_capacity(held.len());
        for (w, held) in self.workers.iter().zip(held) {
            match w
                .call(Box::new(RecordQuery))
                .map(|r| r.downcast::<QueueState>())
            {
                Ok(Ok(mut qs)) => {
                    qs.held = held;
                    queues.push(*qs);
                }
                _ => {
                    return Reply::error(
                        ErrorCode::Internal,
                        format!("seal {epoch}: queue worker {} did not answer", queues.len()),
                    )
                }
            }
        }
        let reply = Reply::Sealed {
            epoch,
            state: TransactionState {
                device: self.device.clone(),
                kind: DeviceKind::Blk,
                queues,
            },
        };
        self.state.last_sealed = Some((epoch, reply.clone()));
        reply
    }

    fn commit(&mut self, epoch: Epoch) -> Reply {
        if self.state.commit_refused {
            return Reply::error(
                ErrorCode::CommitRefused,
                "an earlier commit failed and --on-commit-error is stop",
            );
        }
        let start = Instant::now();
        let (batch, prev) = {
            let mut txq = self.hold.lock();
            let prev = txq.last_committed();
            match txq.take_committable(epoch) {
                Ok(b) => (b, prev),
                Err(e) => return gate::tx_error_reply(e),
            }
        };
        let out = self.engine.run(batch);
        let delivered = self.deliver(out.done);
        let stats = CommitStats {
            requests: out.requests,
            bytes: out.bytes,
            submit_to_drain_us: out.submit_to_drain.as_micros() as u64,
            fdatasync_us: out.fdatasync.as_micros() as u64,
            total_us: start.elapsed().as_micros() as u64,
            epochs: epoch.0 - prev.map_or(epoch.0.saturating_sub(1), |e| e.0),
        };
        log::debug!(
            "commit {epoch}: {} requests in {} waves, {} submit calls, synced {}; {delivered:?}",
            out.requests,
            out.waves,
            out.submit_calls,
            out.synced
        );
        self.state.last_commit = Some(stats.clone());
        match out.error {
            None => {
                self.state.commits_ok += 1;
                Reply::Committed { epoch, stats }
            }
            Some((error, errno)) => {
                log::error!("commit {epoch} failed: {error}");
                self.state.commits_failed += 1;
                if self.policy == OnCommitError::Stop {
                    self.state.commit_refused = true;
                }
                Reply::CommitFailed {
                    epoch,
                    error,
                    errno,
                }
            }
        }
    }

    /// Hands every worker its part of `done` (every worker, so stalled ones resume).
    fn deliver(&self, done: Vec<(HeldReq, u8)>) -> GateAck {
        let mut per_queue: Vec<Vec<(HeldReq, u8)>> =
            (0..self.workers.len()).map(|_| Vec::new()).collect();
        let mut total = GateAck {
            completed: 0,
            deferred: 0,
            dropped: 0,
        };
        for (h, s) in done {
            match per_queue.get_mut(usize::from(h.queue)) {
                Some(v) => v.push((h, s)),
                None => total.dropped += 1,
            }
        }
        for (w, list) in self.workers.iter().zip(per_queue) {
            let n = list.len();
            match w.call(Box::new(GateMsg::Complete(list))) {
                Ok(r) => match r.downcast::<GateAck>() {
                    Ok(a) => {
                        total.completed += a.completed;
                        total.deferred += a.deferred;
                        total.dropped += a.dropped;
                    }
                    Err(_) => total.dropped += n,
                },
                Err(e) => {
                    log::error!("commit: {e}");
                    total.dropped += n;
                }
            }
        }
        total
    }

    fn abort(&mut self) -> Reply {
        let (cancelled, last_committed) = {
            let mut txq = self.hold.lock();
            (txq.abort(), txq.last_committed())
        };
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
                if let Err(e) = w.call(Box::new(GateMsg::Forget(list))) {
                    log::error!("abort: {e}");
                }
            }
        }
        Reply::Aborted {
            cancelled_requests: requests,
            cancelled_bytes: bytes,
            last_committed,
        }
    }

    fn status(&self) -> Reply {
        let txq = self.hold.lock();
        let c = txq.counters();
        let mut epochs = EpochMerge::default();
        epochs.add(txq.epochs(), Instant::now());
        drop(txq);
        Reply::Status(Box::new(DeviceStatus {
            device: self.device.clone(),
            kind: DeviceKind::Blk,
            mode: "hold".into(),
            generation: self.state.fence.newest(),
            open_epoch: c.open_epoch,
            last_sealed: c.last_sealed,
            last_committed: c.last_committed,
            held_requests: c.held_requests as u64,
            held_bytes: c.held_bytes,
            epochs: epochs.into_vec(),
            commits_ok: self.state.commits_ok,
            commits_failed: self.state.commits_failed,
            fdatasyncs: self.engine.fdatasyncs(),
            commit_refused: self.state.commit_refused,
            last_commit: self.state.last_commit.clone(),
        }))
    }

    pub fn handle(&mut self, req: Request) -> Reply {
        if let Err(refused) = gate::admit(&mut self.state.fence, &req) {
            return refused;
        }
        match req {
            Request::Seal { epoch, .. } => self.seal(epoch),
            Request::Commit { epoch, .. } => self.commit(epoch),
            Request::Abort { .. } => self.abort(),
            Request::Replay { state, .. } => self.replay(&state),
            Request::Announce { .. } => {
                Reply::error(ErrorCode::Unsupported, "ANNOUNCE is for net devices")
            }
            Request::Status => self.status(),
        }
    }
}

impl BlkControl {
    /// After `req`'s handler panicked: every request of an unfinished commit is failed towards
    /// the guest (IOERR; nothing was made durable), so no guest waits forever, and the state is
    /// usable for the next command. A commit that panicked counts as a failed commit.
    fn recover(&mut self, req: &Request, why: &str) -> Reply {
        let lost = self.engine.salvage();
        let n = lost.len();
        let ack = self.deliver(lost.into_iter().map(|h| (h, STATUS_IOERR)).collect());
        log::error!(
            "control handler panicked on {req:?}: {why}; {n} requests of the commit failed \
             towards the guest ({ack:?})"
        );
        let error = format!("control handler panicked: {why}; {n} requests failed");
        match *req {
            Request::Commit { epoch, .. } => {
                self.state.commits_failed += 1;
                if self.policy == OnCommitError::Stop {
                    self.state.commit_refused = true;
                }
                Reply::CommitFailed {
                    epoch,
                    error,
                    errno: None,
                }
            }
            _ => Reply::error(ErrorCode::Internal, error),
        }
    }
}

impl ControlHandler for BlkControlHandler {
    /// The panic is caught here, under the lock, so the lock is never poisoned, and
    /// `BlkControl::recover` leaves nothing of the command behind.
    fn handle(&self, req: Request) -> Reply {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let c = &mut *guard;
        let copy = req.clone();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.handle(req))) {
            Ok(reply) => reply,
            Err(p) => {
                let why = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                c.recover(&copy, &why)
            }
        }
    }
}
