// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The gate as a pure state machine: a request goes in, [`GateCore::step`] says what to do
//! (answer at once, or which device operation to run), and the device's result goes back in
//! through `sealed` / `committed` / `aborted` / `status` / `panicked`, which build the reply
//! and keep the statistics. No I/O, no locks, no clock (durations are arguments), so every
//! rule is unit-tested here; [`super::shell`] is the I/O shell that drives it.
//!
//! What it owns: the generation fence, the retried-SEAL rule, `--on-commit-error` and the
//! commit statistics (`commits_ok`, `commits_failed`, `commit_refused`, `last_commit`). What it
//! does not: epoch numbers (the device's transaction queues are their only truth).

use super::{AbortDone, CommitDone, GateError, HeldView, Identity, Recovery};
use crate::control::deadline::MonotonicTime;
use crate::control::message::{
    CommitStats, DeviceStatus, ErrorCode, QueueState, Reply, Request, TransactionState,
};
use crate::epoch::Epoch;
use crate::fence::{AdmitError, Fence};
use crate::txqueue::TxError;
use std::time::Duration;

/// What to do after a failed commit (`--on-commit-error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnCommitError {
    /// Refuse every further commit until the operator restarts the daemon.
    Stop,
    /// Report the failure and keep committing later epochs.
    Report,
}

/// What the shell does with an admitted request.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Answer this without asking the device (fenced, a retried SEAL, a refused COMMIT).
    Answer(Reply),
    /// Run [`GateDevice::seal`](super::GateDevice::seal), then [`GateCore::sealed`].
    Seal(Epoch),
    /// Run [`GateDevice::commit`](super::GateDevice::commit), then [`GateCore::committed`].
    Commit(Epoch),
    /// Run [`GateDevice::abort`](super::GateDevice::abort), then [`GateCore::aborted`].
    Abort,
    /// Run [`GateDevice::status`](super::GateDevice::status), then [`GateCore::status`].
    Status,
    /// A device-specific command (REPLAY, ANNOUNCE), already fenced.
    Device(Request),
}

/// The gate's own state. See the module docs.
#[derive(Debug)]
pub struct GateCore {
    /// Read once per COMMIT with a lease deadline, at its admission: `CLOCK_MONOTONIC` unless
    /// a test injects another ([`GateCore::with_clock`]).
    clock: fn() -> MonotonicTime,
    id: Identity,
    fence: Fence,
    policy: OnCommitError,
    commits_ok: u64,
    commits_failed: u64,
    commit_refused: bool,
    last_commit: Option<CommitStats>,
    /// The record of the last successful SEAL, answered again to a retried SEAL of it.
    last_sealed: Option<(Epoch, TransactionState)>,
}

impl GateCore {
    pub fn new(id: Identity, fence: Fence, policy: OnCommitError) -> GateCore {
        GateCore {
            clock: MonotonicTime::now,
            id,
            fence,
            policy,
            commits_ok: 0,
            commits_failed: 0,
            commit_refused: false,
            last_commit: None,
            last_sealed: None,
        }
    }

    /// The same core reading `clock` instead of `CLOCK_MONOTONIC` (tests of the deadline).
    pub fn with_clock(mut self, clock: fn() -> MonotonicTime) -> GateCore {
        self.clock = clock;
        self
    }

    pub fn identity(&self) -> &Identity {
        &self.id
    }

    /// The first step of every request: the fence, then what to do.
    pub fn step(&mut self, req: Request) -> Step {
        if let Err(refused) = self.admit(&req) {
            return Step::Answer(refused);
        }
        match req {
            Request::Seal { epoch, .. } => match &self.last_sealed {
                Some((e, state)) if *e == epoch => Step::Answer(Reply::Sealed {
                    epoch,
                    state: state.clone(),
                }),
                _ => Step::Seal(epoch),
            },
            Request::Commit {
                epoch, deadline, ..
            } => match self.admit_commit(epoch, deadline) {
                Ok(()) => Step::Commit(epoch),
                Err(refused) => Step::Answer(refused),
            },
            Request::Abort { .. } => Step::Abort,
            Request::Status => Step::Status,
            other @ (Request::Replay { .. } | Request::Announce { .. }) => Step::Device(other),
        }
    }

    /// The fence (requests without a generation, i.e. `STATUS`, always pass). An older
    /// generation is `FENCED`; a newer one the fence cannot persist is `INTERNAL` and not
    /// admitted.
    fn admit(&mut self, req: &Request) -> Result<(), Reply> {
        match req.generation() {
            Some(g) => self.fence.admit(g).map_err(|e| match e {
                AdmitError::Fenced(f) => Reply::error(ErrorCode::Fenced, f.to_string()),
                e @ AdmitError::Persist { .. } => {
                    log::error!("{e}");
                    Reply::error(ErrorCode::Internal, e.to_string())
                }
            }),
            None => Ok(()),
        }
    }

    /// **The single place a COMMIT is admitted** before the device releases anything: the
    /// device's commit runs right after this returns `Ok`, with nothing in between. Every rule
    /// about whether a commit may start at all goes here: not after a failed commit under
    /// `--on-commit-error stop`, and not after the COMMIT's lease deadline (`DEADLINE_PASSED`:
    /// the coordinator's etcd lease may have passed to another host; the clock is read here,
    /// after the fence, so no wait separates the check from the start).
    pub fn admit_commit(&self, epoch: Epoch, deadline: Option<MonotonicTime>) -> Result<(), Reply> {
        if self.commit_refused {
            return Err(Reply::error(
                ErrorCode::CommitRefused,
                format!("commit {epoch}: an earlier commit failed and --on-commit-error is stop"),
            ));
        }
        if let Some(d) = deadline {
            let now = (self.clock)();
            if now > d {
                let r = Reply::error(
                    ErrorCode::DeadlinePassed,
                    format!(
                        "commit deadline passed {} us ago (the coordinator's etcd lease may \
                         have expired): nothing released",
                        now.0 - d.0
                    ),
                );
                log::warn!("commit {epoch} refused: {r:?}");
                return Err(r);
            }
        }
        Ok(())
    }

    /// The device's SEAL result.
    pub fn sealed(&mut self, epoch: Epoch, res: Result<Vec<QueueState>, GateError>) -> Reply {
        match res {
            Ok(queues) => {
                let state = TransactionState {
                    device: self.id.device.clone(),
                    kind: self.id.kind,
                    queues,
                };
                self.last_sealed = Some((epoch, state.clone()));
                Reply::Sealed { epoch, state }
            }
            Err(e) => error_reply(e),
        }
    }

    /// The device's COMMIT result; `total` is the time since the COMMIT was admitted.
    pub fn committed(
        &mut self,
        epoch: Epoch,
        res: Result<CommitDone, GateError>,
        total: Duration,
    ) -> Reply {
        let done = match res {
            Ok(d) => d,
            Err(GateError::Held(error)) => {
                log::error!("commit {epoch}: output held: {error}");
                self.commits_failed += 1;
                return Reply::CommitFailed {
                    epoch,
                    error,
                    errno: None,
                };
            }
            Err(e) => return error_reply(e),
        };
        let stats = CommitStats {
            requests: done.requests,
            bytes: done.bytes,
            submit_to_drain_us: done.submit_to_drain.as_micros() as u64,
            fdatasync_us: done.fdatasync.as_micros() as u64,
            total_us: total.as_micros() as u64,
            epochs: epoch
                .0
                .saturating_sub(done.previous.map_or(epoch.0.saturating_sub(1), |e| e.0)),
        };
        self.last_commit = Some(stats.clone());
        match done.failure {
            None => {
                self.commits_ok += 1;
                Reply::Committed { epoch, stats }
            }
            Some(f) => {
                log::error!("commit {epoch} failed: {}", f.error);
                self.commit_failed();
                Reply::CommitFailed {
                    epoch,
                    error: f.error,
                    errno: f.errno,
                }
            }
        }
    }

    fn commit_failed(&mut self) {
        self.commits_failed += 1;
        if self.policy == OnCommitError::Stop {
            self.commit_refused = true;
        }
    }

    /// The device's ABORT result. The epochs it closed are no longer sealed ones a retried
    /// SEAL could mean, so the cached record goes.
    pub fn aborted(&mut self, res: Result<AbortDone, GateError>) -> Reply {
        self.last_sealed = None;
        match res {
            Ok(a) => Reply::Aborted {
                cancelled_requests: a.requests,
                cancelled_bytes: a.bytes,
                last_committed: a.last_committed,
            },
            Err(e) => error_reply(e),
        }
    }

    /// The STATUS reply from what the device holds.
    pub fn status(&self, res: Result<HeldView, GateError>) -> Reply {
        let v = match res {
            Ok(v) => v,
            Err(e) => return error_reply(e),
        };
        Reply::Status(Box::new(DeviceStatus {
            device: self.id.device.clone(),
            kind: self.id.kind,
            mode: self.id.mode.clone(),
            generation: self.fence.newest(),
            open_epoch: v.open_epoch,
            last_sealed: v.last_sealed,
            last_committed: v.last_committed,
            held_requests: v.held_requests,
            held_bytes: v.held_bytes,
            epochs: v.epochs,
            commits_ok: self.commits_ok,
            commits_failed: self.commits_failed,
            fdatasyncs: v.fdatasyncs,
            commit_refused: self.commit_refused,
            last_commit: self.last_commit.clone(),
            replica: v.replica,
            dirty_log: v.dirty_log,
        }))
    }

    /// The handler panicked on a request of kind `op` (`why`: the panic message); `rec` is what
    /// the device salvaged. A COMMIT that had taken its output counts as a failed commit; any
    /// other panic is `INTERNAL` and changes nothing the gate keeps, except that a SEAL record
    /// cannot be trusted any more.
    pub fn panicked(&mut self, op: Op, why: &str, rec: Recovery) -> Reply {
        self.last_sealed = None;
        match (op, rec) {
            (Op::Commit(epoch), Recovery::CommitFailed { failed }) => {
                self.commit_failed();
                Reply::CommitFailed {
                    epoch,
                    error: format!(
                        "control handler panicked: {why}; {failed} requests failed towards the \
                         guest"
                    ),
                    errno: None,
                }
            }
            _ => Reply::error(
                ErrorCode::Internal,
                format!("control handler panicked: {why}; nothing of the command was released"),
            ),
        }
    }
}

/// A request reduced to what [`GateCore::panicked`] needs (kept before the request is moved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Commit(Epoch),
    Other,
}

impl From<&Request> for Op {
    fn from(r: &Request) -> Op {
        match r {
            Request::Commit { epoch, .. } => Op::Commit(*epoch),
            _ => Op::Other,
        }
    }
}

/// The error code of a refused seal or commit.
pub fn tx_error_code(e: &TxError) -> ErrorCode {
    match e {
        TxError::Stale { .. } | TxError::EpochOverflow(_) => ErrorCode::StaleEpoch,
        TxError::NotSealed { .. } => ErrorCode::NotSealed,
        TxError::Aborted { .. } => ErrorCode::Aborted,
    }
}

/// The `ERROR` reply for a device error.
pub fn error_reply(e: GateError) -> Reply {
    match e {
        GateError::Refused(t) => Reply::error(tx_error_code(&t), t.to_string()),
        GateError::Unsupported(m) => Reply::error(ErrorCode::Unsupported, m),
        // Only a commit answers this, as COMMIT_FAILED (`GateCore::committed`).
        GateError::Held(m) => Reply::error(ErrorCode::Internal, m),
        GateError::Internal(m) => {
            log::error!("{m}");
            Reply::error(ErrorCode::Internal, m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::CommitFailure;
    use super::*;
    use crate::control::message::DeviceKind;
    use crate::epoch::Generation;
    use crate::txqueue::EpochOp;

    fn core(policy: OnCommitError) -> GateCore {
        GateCore::new(
            Identity {
                device: "d".into(),
                kind: DeviceKind::Net,
                mode: "hold".into(),
            },
            Fence::default(),
            policy,
        )
    }

    fn seal(g: u64, e: u64) -> Request {
        Request::Seal {
            generation: Generation(g),
            epoch: Epoch(e),
        }
    }

    fn commit(g: u64, e: u64) -> Request {
        Request::Commit {
            generation: Generation(g),
            epoch: Epoch(e),
            deadline: None,
        }
    }

    fn code(r: &Reply) -> ErrorCode {
        match r {
            Reply::Error { code, .. } => *code,
            r => panic!("not an error: {r:?}"),
        }
    }

    fn queue(q: u16) -> QueueState {
        QueueState {
            queue: q,
            next_avail: 7,
            used_idx: Some(7),
            outstanding: vec![],
            held: 0,
            held_heads: vec![],
        }
    }

    #[test]
    fn fence_refuses_old_generations_before_anything_and_status_passes() {
        let mut c = core(OnCommitError::Stop);
        assert_eq!(c.step(commit(5, 1)), Step::Commit(Epoch(1)));
        match c.step(seal(4, 2)) {
            Step::Answer(r) => assert_eq!(code(&r), ErrorCode::Fenced),
            s => panic!("{s:?}"),
        }
        assert_eq!(c.step(Request::Status), Step::Status);
        match c.status(Ok(HeldView::default())) {
            Reply::Status(s) => assert_eq!(s.generation, Generation(5)),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_retried_seal_of_the_last_sealed_epoch_gets_the_same_record() {
        let mut c = core(OnCommitError::Stop);
        assert_eq!(c.step(seal(1, 3)), Step::Seal(Epoch(3)));
        let first = c.sealed(Epoch(3), Ok(vec![queue(0), queue(1)]));
        assert!(matches!(first, Reply::Sealed { .. }));
        // The device is not asked again: the very record comes back.
        assert_eq!(c.step(seal(1, 3)), Step::Answer(first.clone()));
        // A newer generation retrying it gets it too (same daemon state).
        assert_eq!(c.step(seal(2, 3)), Step::Answer(first));
        // Older epochs go to the device, which refuses them as stale.
        assert_eq!(c.step(seal(2, 2)), Step::Seal(Epoch(2)));
        let stale = c.sealed(
            Epoch(2),
            Err(GateError::Refused(TxError::Stale {
                op: EpochOp::Seal,
                epoch: Epoch(2),
                newest: Epoch(3),
            })),
        );
        assert_eq!(code(&stale), ErrorCode::StaleEpoch);
        // After ABORT the record is forgotten.
        assert_eq!(
            c.step(Request::Abort {
                generation: Generation(2)
            }),
            Step::Abort
        );
        c.aborted(Ok(AbortDone::default()));
        assert_eq!(c.step(seal(2, 3)), Step::Seal(Epoch(3)));
    }

    #[test]
    fn a_failed_commit_is_counted_and_under_stop_refuses_later_commits() {
        for policy in [OnCommitError::Stop, OnCommitError::Report] {
            let mut c = core(policy);
            assert_eq!(c.step(commit(1, 1)), Step::Commit(Epoch(1)));
            let ok = c.committed(
                Epoch(1),
                Ok(CommitDone {
                    requests: 2,
                    ..Default::default()
                }),
                Duration::from_micros(5),
            );
            assert!(matches!(ok, Reply::Committed { .. }));
            let failed = c.committed(
                Epoch(3),
                Ok(CommitDone {
                    previous: Some(Epoch(1)),
                    requests: 4,
                    failure: Some(CommitFailure {
                        error: "tap refused 1 of 4 frames".into(),
                        errno: Some(5),
                    }),
                    ..Default::default()
                }),
                Duration::ZERO,
            );
            match failed {
                Reply::CommitFailed { epoch, errno, .. } => {
                    assert_eq!((epoch, errno), (Epoch(3), Some(5)))
                }
                r => panic!("{r:?}"),
            }
            let next = c.step(commit(1, 4));
            match policy {
                OnCommitError::Stop => match next {
                    Step::Answer(r) => assert_eq!(code(&r), ErrorCode::CommitRefused),
                    s => panic!("{s:?}"),
                },
                OnCommitError::Report => assert_eq!(next, Step::Commit(Epoch(4))),
            }
            match c.status(Ok(HeldView::default())) {
                Reply::Status(s) => {
                    assert_eq!((s.commits_ok, s.commits_failed), (1, 1));
                    assert_eq!(s.commit_refused, policy == OnCommitError::Stop);
                    let l = s.last_commit.unwrap();
                    assert_eq!((l.requests, l.epochs), (4, 2));
                }
                r => panic!("{r:?}"),
            }
        }
    }

    #[test]
    fn device_errors_map_to_codes() {
        let ns = GateError::Refused(TxError::NotSealed {
            epoch: Epoch(3),
            last_sealed: Epoch(2),
        });
        match error_reply(ns) {
            Reply::Error { code, message } => {
                assert_eq!(code, ErrorCode::NotSealed);
                assert!(message.contains("epoch 3"));
            }
            r => panic!("{r:?}"),
        }
        let ab = GateError::Refused(TxError::Aborted {
            epoch: Epoch(3),
            aborted_through: Epoch(4),
        });
        assert_eq!(code(&error_reply(ab)), ErrorCode::Aborted);
        assert_eq!(
            code(&error_reply(GateError::Unsupported("off".into()))),
            ErrorCode::Unsupported
        );
        assert_eq!(
            code(&error_reply(GateError::Internal("gone".into()))),
            ErrorCode::Internal
        );
    }

    #[test]
    fn a_commit_is_admitted_only_until_its_lease_deadline() {
        let mut c = core(OnCommitError::Stop).with_clock(|| MonotonicTime(10_000_000));
        let at = |g, e, d| Request::Commit {
            generation: Generation(g),
            epoch: Epoch(e),
            deadline: Some(MonotonicTime(d)),
        };
        assert_eq!(c.step(at(1, 1, 10_000_000)), Step::Commit(Epoch(1)));
        match c.step(at(1, 2, 9_999_999)) {
            Step::Answer(r) => assert_eq!(code(&r), ErrorCode::DeadlinePassed),
            s => panic!("{s:?}"),
        }
        // A refusal changes nothing: the next commit in time is admitted, and one without a
        // deadline (no etcd) is never limited.
        assert_eq!(c.step(at(1, 2, 20_000_000)), Step::Commit(Epoch(2)));
        assert_eq!(c.step(commit(1, 3)), Step::Commit(Epoch(3)));
        // The fence still comes first.
        match c.step(at(0, 4, 0)) {
            Step::Answer(r) => assert_eq!(code(&r), ErrorCode::Fenced),
            s => panic!("{s:?}"),
        }
        // The real clock: a deadline one second ago is refused.
        let mut real = core(OnCommitError::Stop);
        let past = MonotonicTime::now().minus(Duration::from_secs(1)).0;
        assert!(matches!(real.step(at(1, 1, past)), Step::Answer(_)));
    }

    #[test]
    fn a_panic_fails_a_commit_only_if_it_had_taken_its_output() {
        let mut c = core(OnCommitError::Stop);
        let r = c.panicked(Op::Commit(Epoch(2)), "boom", Recovery::Untouched);
        assert_eq!(code(&r), ErrorCode::Internal);
        assert_eq!(c.step(commit(1, 2)), Step::Commit(Epoch(2)));
        let r = c.panicked(
            Op::Commit(Epoch(2)),
            "boom",
            Recovery::CommitFailed { failed: 3 },
        );
        assert!(matches!(r, Reply::CommitFailed { .. }));
        match c.step(commit(1, 3)) {
            Step::Answer(r) => assert_eq!(code(&r), ErrorCode::CommitRefused),
            s => panic!("{s:?}"),
        }
    }
}
