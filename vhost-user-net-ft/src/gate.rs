// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The net device's side of the gate ([`ft_common::gate`]): [`NetGate`] seals, commits,
//! aborts and reports by sending each queue-pair worker a [`NetMsg`] (run on the worker thread
//! that owns the tap queue and hold buffer) and combining the answers; fencing, the
//! retried-SEAL rule, the statistics and the replies are the shared gate core's.
//!
//! Invariants:
//! - No pair releases a frame of a commit another pair refuses. Each pair has its own
//!   transaction queue; SEAL and COMMIT first read every pair's counters and check the epoch
//!   against all of them ([`TxCounters::check_seal`] / [`TxCounters::check_commit`], the queue's
//!   own rules), and only then act on every pair. Nothing can change a pair's epochs between
//!   the check and the act: epochs move only through these commands, which the gate runs one at
//!   a time, and a worker's own pushes only add frames to the open epoch. The one way a pair
//!   can still fail in the second step is a worker thread that is gone; a commit then answers
//!   `COMMIT_FAILED` (the other pairs did send), never `COMMITTED`.
//! - A frame the tap refuses (or writes short) at commit is lost, like a packet dropped on the
//!   wire, and is not retried (it would overtake later frames); the commit answers
//!   `COMMIT_FAILED` with the count, so a coordinator never reads `COMMITTED` for output that
//!   did not leave. The daemon keeps committing later epochs (`--on-commit-error report`
//!   semantics: stopping would hold every later frame of the guest forever).
//! - In net copy mode (`hold` copies frames out of the ring and completes the descriptors at
//!   once) no descriptor of the guest is held, so SEAL records carry the TX rings' next avail
//!   index and no held heads: after a failover the guest resumes from a state in which it
//!   already "sent" uncommitted frames, i.e. they look like packet loss, which the guest's
//!   transport protocols recover from.
//!
//! [`TxCounters::check_seal`]: ft_common::txqueue::TxCounters::check_seal
//! [`TxCounters::check_commit`]: ft_common::txqueue::TxCounters::check_commit

use crate::device::{FtMode, GateOp, NetMsg, NetReply, NetWorker};
use crate::mac::MacAddr;
use crate::tx_hold::Released;
use ft_common::control::{DeviceKind, ErrorCode, QueueState, Reply, Request};
use ft_common::epoch::Epoch;
use ft_common::fence::Fence;
use ft_common::gate::{
    AbortDone, CommitDone, CommitFailure, Gate, GateDevice, GateError, HeldView, Identity,
    OnCommitError, QueueMerge, Recovery,
};
use ft_common::txqueue::TxCounters;
use ft_common::vhost_user::{WorkerGone, WorkerHandle};
use std::time::Instant;

/// The net device as the gate sees it.
pub struct NetGate {
    workers: Vec<WorkerHandle<NetWorker>>,
    device: String,
    mac: MacAddr,
    mode: FtMode,
    /// Set while a commit's second step runs (pairs may have sent), so a panic there is a
    /// failed commit, not an untouched one.
    releasing: bool,
}

/// The net daemon's control handler.
pub type NetControl = Gate<NetGate>;

impl NetGate {
    pub fn new(
        workers: Vec<WorkerHandle<NetWorker>>,
        device: String,
        mac: MacAddr,
        mode: FtMode,
    ) -> Self {
        NetGate {
            workers,
            device,
            mac,
            mode,
            releasing: false,
        }
    }

    /// The control handler over this device, with `fence` (e.g. a persistent one,
    /// [`Fence::from_state_dir`]). A failed commit never stops later ones (see the module docs).
    pub fn into_handler(self, fence: Fence) -> NetControl {
        Gate::new(self, fence, OnCommitError::Report)
    }

    fn call(&self, i: usize, op: GateOp) -> Result<NetReply, GateError> {
        let r = self.workers[i].call(NetMsg::Gate(op));
        Self::reply(i, r)
    }

    /// `op` to every pair, all asked before any answer is awaited (one round of wakeups, not
    /// one per pair); the replies in pair order.
    fn call_all(&self, op: GateOp) -> Vec<Result<NetReply, GateError>> {
        let asked: Vec<_> = self
            .workers
            .iter()
            .map(|w| w.ask(NetMsg::Gate(op)))
            .collect();
        asked
            .into_iter()
            .enumerate()
            .map(|(i, a)| Self::reply(i, a.and_then(|a| a.wait())))
            .collect()
    }

    fn reply(i: usize, r: Result<NetReply, WorkerGone>) -> Result<NetReply, GateError> {
        match r.map_err(|e| GateError::Internal(format!("queue pair {i}: {e}")))? {
            NetReply::Refused(e) => Err(GateError::Refused(e)),
            NetReply::NotHolding => Err(GateError::Unsupported(
                "output gating is off (--ft off)".into(),
            )),
            r => Ok(r),
        }
    }

    fn holding(&self) -> Result<(), GateError> {
        match self.mode {
            FtMode::Hold => Ok(()),
            FtMode::Off => Err(GateError::Unsupported(
                "output gating is off (--ft off)".into(),
            )),
        }
    }

    /// Every pair's counters and held epochs (the first step of SEAL and COMMIT).
    fn counters(
        &self,
    ) -> Result<Vec<(TxCounters, Vec<ft_common::txqueue::EpochStats>)>, GateError> {
        self.call_all(GateOp::Status)
            .into_iter()
            .enumerate()
            .map(|(i, r)| match r? {
                NetReply::Status { counters, epochs } => Ok((counters, epochs)),
                r => Err(GateError::Internal(format!(
                    "queue pair {i}: {r:?} to STATUS"
                ))),
            })
            .collect()
    }

    fn sum(r: &mut Released, add: Released) {
        r.frames += add.frames;
        r.bytes += add.bytes;
        r.errors += add.errors;
    }
}

impl GateDevice for NetGate {
    fn identity(&self) -> Identity {
        Identity {
            device: self.device.clone(),
            kind: DeviceKind::Net,
            mode: match self.mode {
                FtMode::Off => "off".into(),
                FtMode::Hold => "hold".into(),
            },
        }
    }

    fn seal(&mut self, epoch: Epoch) -> Result<Vec<QueueState>, GateError> {
        self.holding()?;
        for (c, _) in self.counters()? {
            c.check_seal(epoch)?;
        }
        let mut queues = Vec::with_capacity(2 * self.workers.len());
        for (i, r) in self.call_all(GateOp::Seal(epoch)).into_iter().enumerate() {
            match r? {
                NetReply::Sealed { rings, .. } => queues.extend(rings),
                r => {
                    return Err(GateError::Internal(format!(
                        "queue pair {i}: {r:?} to SEAL"
                    )))
                }
            }
        }
        Ok(queues)
    }

    fn commit(&mut self, epoch: Epoch) -> Result<CommitDone, GateError> {
        // Tests stop or panic the daemon here: COMMIT admitted, no frame handed to a worker yet.
        ft_common::killpoint::reached("net-before-commit");
        self.holding()?;
        let start = Instant::now();
        // Step 1: every pair would accept the commit; nothing is released yet.
        let mut previous = None;
        for (i, (c, _)) in self.counters()?.into_iter().enumerate() {
            c.check_commit(epoch)?;
            previous = if i == 0 {
                c.last_committed
            } else {
                previous.min(c.last_committed)
            };
        }
        // Step 2: every pair releases (see the module docs for why none can refuse now).
        self.releasing = true;
        let mut t = Released::default();
        let mut lost = Vec::new();
        for i in 0..self.workers.len() {
            match self.call(i, GateOp::Commit(epoch)) {
                Ok(NetReply::Committed(r)) => Self::sum(&mut t, r),
                Ok(r) => lost.push(format!("queue pair {i}: {r:?} to COMMIT")),
                Err(e) => lost.push(e.to_string()),
            }
        }
        // Tests panic here: frames sent, the commit not answered yet.
        ft_common::killpoint::reached("net-after-release");
        self.releasing = false;
        let mut failure = None;
        if t.errors > 0 {
            log::warn!(
                "commit {epoch}: the tap refused {} of {} frames",
                t.errors,
                t.frames
            );
            failure = Some(format!(
                "the tap refused {} of {} frames (lost, not retried)",
                t.errors, t.frames
            ));
        }
        if !lost.is_empty() {
            let l = lost.join("; ");
            failure = Some(match failure {
                Some(f) => format!("{f}; {l}"),
                None => l,
            });
        }
        let us = start.elapsed();
        Ok(CommitDone {
            previous,
            requests: t.frames,
            bytes: t.bytes,
            submit_to_drain: us,
            fdatasync: std::time::Duration::ZERO,
            failure: failure.map(|error| CommitFailure { error, errno: None }),
        })
    }

    fn abort(&mut self) -> Result<AbortDone, GateError> {
        self.holding()?;
        let mut t = Released::default();
        let mut last_committed = None;
        for i in 0..self.workers.len() {
            match self.call(i, GateOp::Abort)? {
                NetReply::Aborted(r, c) => {
                    Self::sum(&mut t, r);
                    last_committed = if i == 0 {
                        c.last_committed
                    } else {
                        last_committed.min(c.last_committed)
                    };
                }
                r => {
                    return Err(GateError::Internal(format!(
                        "queue pair {i}: {r:?} to ABORT"
                    )))
                }
            }
        }
        Ok(AbortDone {
            requests: t.frames,
            bytes: t.bytes,
            last_committed,
        })
    }

    fn status(&mut self) -> Result<HeldView, GateError> {
        if self.mode == FtMode::Off {
            return Ok(HeldView::default());
        }
        let now = Instant::now();
        let mut m = QueueMerge::default();
        for (c, epochs) in self.counters()? {
            m.add(&c, epochs, now);
        }
        if m.disagree() {
            log::error!("STATUS: the queue pairs disagree on their epochs");
        }
        Ok(m.into_view())
    }

    fn other(&mut self, req: Request) -> Reply {
        match req {
            Request::Announce { .. } => self.announce(),
            Request::Replay { .. } => Reply::error(
                ErrorCode::Unsupported,
                "REPLAY is for block devices: a net daemon has nothing to replay",
            ),
            r => Reply::error(ErrorCode::Internal, format!("not a device command: {r:?}")),
        }
    }

    /// The control thread never holds a worker's frames: before a commit's second step they
    /// stay in their workers' hold buffers, untouched; during it some pairs may have sent, so
    /// the commit failed (what a pair sent is not reported, none of it is retried).
    fn recover(&mut self) -> Recovery {
        if std::mem::take(&mut self.releasing) {
            Recovery::CommitFailed { failed: 0 }
        } else {
            Recovery::Untouched
        }
    }
}

impl NetGate {
    fn announce(&self) -> Reply {
        let Some(w) = self.workers.first() else {
            return Reply::error(ErrorCode::Internal, "no queue worker");
        };
        match w.call(NetMsg::Announce(self.mac)) {
            Ok(NetReply::Announced(true)) => Reply::Announced { packets: 1 },
            Ok(_) => Reply::error(ErrorCode::Internal, "the tap refused the RARP frame"),
            Err(e) => Reply::error(ErrorCode::Internal, e.to_string()),
        }
    }
}
