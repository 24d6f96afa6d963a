// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The output-commit gate: the control protocol's SEAL / COMMIT / ABORT / STATUS, written once
//! for every device daemon.
//!
//! Shape (the coordinator's `cycle.rs` + `runtime.rs` split):
//! - [`core`]: [`GateCore`], the pure state machine. It owns every decision that does not need
//!   the device: the generation fence, the retried-SEAL rule, `--on-commit-error`, the commit
//!   statistics, the mapping of refusals to error codes, and the shape of every reply. No I/O,
//!   no locks, no clock of its own (durations are arguments).
//! - [`shell`]: [`Gate`], the I/O shell: the [`ControlHandler`](crate::control::ControlHandler)
//!   a daemon's control thread runs. It takes the lock, asks the core what to do, calls the
//!   device, hands the result back to the core, and turns a panic into a reply.
//! - [`GateDevice`]: what a device plugs in. It seals its queues and returns its record,
//!   commits epochs `<= E` and returns what it released (or how that failed), aborts, and
//!   reports what it holds. The device's transaction queues are the only truth about epochs
//!   (open, sealed, committed, aborted); the core keeps none of its own except the SEALED reply
//!   it may have to repeat.
//!
//! Invariants (docs/architecture.md, "The rule everything serves"):
//! 1. The fence is checked before anything else; a command of an older generation is refused
//!    (`FENCED`) and reaches no device.
//! 2. A COMMIT reaches the device only through [`GateCore::admit_commit`], the single place a
//!    commit is admitted (after `--on-commit-error stop` refused further commits, or after the
//!    COMMIT's lease deadline, nothing is released); the device starts committing right after
//!    it.
//! 3. A device refusal ([`GateError::Refused`]) means the device changed nothing: a device with
//!    several queues checks every queue before acting on any ([`TxCounters::check_seal`] and
//!    [`TxCounters::check_commit`] are the one copy of the epoch rules), so no queue releases
//!    output of a commit another queue refuses.
//! 4. Output that a commit released but could not deliver (a failed write or sync, frames the
//!    tap refused) is never answered `COMMITTED`: it is `COMMIT_FAILED`, counted in
//!    `commits_failed`, and under `--on-commit-error stop` later commits are refused.
//! 5. A retried `SEAL E` of the last sealed epoch (the coordinator lost the reply) gets the very
//!    `SEALED` record of the first seal; an older epoch is `STALE_EPOCH`. An ABORT forgets the
//!    record (it closes the open epoch as if sealed).
//! 6. Every device error becomes an error reply, never a panic; a panic inside a command is
//!    caught under the lock (never poisoned), the device salvages what the command held, and
//!    the gate stays usable.
//!
//! [`TxCounters::check_seal`]: crate::txqueue::TxCounters::check_seal
//! [`TxCounters::check_commit`]: crate::txqueue::TxCounters::check_commit

pub mod core;
pub mod shell;

pub use self::core::{GateCore, OnCommitError, Step};
pub use self::shell::Gate;

use crate::control::message::{DeviceKind, EpochHeld, QueueState, Request};
use crate::epoch::Epoch;
use crate::txqueue::{EpochStats, TxCounters, TxError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Who a gate speaks for, in its SEALED records and STATUS replies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The device name (image or tap).
    pub device: String,
    pub kind: DeviceKind,
    /// Gating mode reported in STATUS (`hold`, `off`).
    pub mode: String,
}

/// A device operation that did not happen (or failed as a whole).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The transaction queues refused the epoch; the device changed nothing.
    #[error(transparent)]
    Refused(#[from] TxError),
    /// The device does not do this (e.g. SEAL with gating off).
    #[error("{0}")]
    Unsupported(String),
    /// The commit ran but its output may not be released yet (disk replication: the replica has
    /// not acknowledged the epoch). Nothing was completed towards the guest, the device keeps
    /// the epoch and retries it at the next COMMIT: answered `COMMIT_FAILED`, counted, but not a
    /// failure `--on-commit-error stop` acts on.
    #[error("{0}")]
    Held(String),
    /// A daemon bug or an unexpected system error (a queue worker that is gone).
    #[error("{0}")]
    Internal(String),
}

/// Why a commit that ran did not deliver everything it released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitFailure {
    pub error: String,
    pub errno: Option<i32>,
}

/// What a device's commit did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitDone {
    /// The last committed epoch before this commit (for the released-epochs count).
    pub previous: Option<Epoch>,
    /// Requests (blk) or frames (net) released.
    pub requests: u64,
    pub bytes: u64,
    pub submit_to_drain: Duration,
    pub fdatasync: Duration,
    /// None: everything released was delivered (written and synced, or handed to the tap).
    pub failure: Option<CommitFailure>,
}

/// What a device's abort cancelled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AbortDone {
    pub requests: u64,
    pub bytes: u64,
    pub last_committed: Option<Epoch>,
}

/// What a device holds, for STATUS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldView {
    pub open_epoch: Epoch,
    pub last_sealed: Option<Epoch>,
    pub last_committed: Option<Epoch>,
    pub held_requests: u64,
    pub held_bytes: u64,
    /// Per uncommitted epoch holding something, oldest first.
    pub epochs: Vec<EpochHeld>,
    pub fdatasyncs: u64,
    /// Disk replication, if the device replicates.
    pub replica: Option<crate::replica::ReplicaStatus>,
    /// The dirty-block log, if the device keeps one.
    pub dirty_log: Option<crate::replica::dirty::DirtyLogStatus>,
}

impl Default for HeldView {
    /// Nothing held, epoch 1 open (a device with gating off).
    fn default() -> Self {
        HeldView {
            open_epoch: Epoch::FIRST,
            last_sealed: None,
            last_committed: None,
            held_requests: 0,
            held_bytes: 0,
            epochs: Vec::new(),
            fdatasyncs: 0,
            replica: None,
            dirty_log: None,
        }
    }
}

/// After a panic inside a command: what the device did with that command's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing of the command's output was released or taken: held output is still held and a
    /// retried command works.
    Untouched,
    /// A commit had taken its output; `failed` requests of it were failed towards the guest
    /// (nothing of them is reported durable).
    CommitFailed { failed: usize },
}

/// The device side of a [`Gate`]: one per daemon, called on the control thread, one command at
/// a time.
pub trait GateDevice: Send + 'static {
    /// Name, kind and mode (read once when the gate is built).
    fn identity(&self) -> Identity;

    /// SEAL `epoch`: close the open epoch of every queue as `epoch`, open `epoch + 1`, and return
    /// each ring's part of the SEALED record. A refusal must leave every queue unsealed.
    fn seal(&mut self, epoch: Epoch) -> Result<Vec<QueueState>, GateError>;

    /// COMMIT `epoch`: release every held request of epochs `<= epoch` (written and synced, or
    /// sent) and complete it towards the guest. `Err` only if nothing was released (a refusal
    /// of every queue checked first), or [`GateError::Held`] if what ran may not be completed
    /// yet (kept by the device for the next COMMIT); a commit that released output and failed
    /// to deliver some returns `Ok` with [`CommitDone::failure`].
    fn commit(&mut self, epoch: Epoch) -> Result<CommitDone, GateError>;

    /// ABORT: cancel every held request of uncommitted epochs; none of it is ever released.
    fn abort(&mut self) -> Result<AbortDone, GateError>;

    /// What the device holds now.
    fn status(&mut self) -> Result<HeldView, GateError>;

    /// A device-specific command (`REPLAY`, `ANNOUNCE`), already admitted by the fence.
    fn other(&mut self, req: Request) -> crate::control::Reply {
        let _ = req;
        crate::control::Reply::error(
            crate::control::ErrorCode::Unsupported,
            "not supported by this device",
        )
    }

    /// A command panicked: salvage what it had taken, so no guest waits forever and the next
    /// command finds a usable device.
    fn recover(&mut self) -> Recovery {
        Recovery::Untouched
    }
}

/// Builds one [`HeldView`] from several transaction queues (net: one per queue pair).
///
/// The queues' epochs move together (every SEAL, COMMIT and ABORT reaches all of them, checked
/// on all before acted on), so they agree; should they not (a queue worker died half-way), the
/// view is the conservative one: the newest open and sealed epoch, the oldest committed one
/// (what every queue has committed), and [`QueueMerge::disagree`] says so.
#[derive(Debug, Default)]
pub struct QueueMerge {
    view: Option<HeldView>,
    epochs: BTreeMap<Epoch, EpochHeld>,
    disagree: bool,
}

impl QueueMerge {
    /// Adds one queue; ages are taken at `now`, the oldest wins.
    pub fn add(
        &mut self,
        c: &TxCounters,
        stats: impl IntoIterator<Item = EpochStats>,
        now: Instant,
    ) {
        match &mut self.view {
            None => {
                self.view = Some(HeldView {
                    open_epoch: c.open_epoch,
                    last_sealed: c.last_sealed,
                    last_committed: c.last_committed,
                    held_requests: c.held_requests as u64,
                    held_bytes: c.held_bytes,
                    epochs: Vec::new(),
                    fdatasyncs: 0,
                    replica: None,
                    dirty_log: None,
                })
            }
            Some(v) => {
                if (v.open_epoch, v.last_committed) != (c.open_epoch, c.last_committed) {
                    self.disagree = true;
                }
                v.open_epoch = v.open_epoch.max(c.open_epoch);
                v.last_sealed = v.last_sealed.max(c.last_sealed);
                v.last_committed = v.last_committed.min(c.last_committed);
                v.held_requests += c.held_requests as u64;
                v.held_bytes += c.held_bytes;
            }
        }
        for e in stats {
            let h = self.epochs.entry(e.epoch).or_insert(EpochHeld {
                epoch: e.epoch,
                ..Default::default()
            });
            h.requests += e.requests as u64;
            h.bytes += e.bytes;
            h.oldest_age_us = h.oldest_age_us.max(e.oldest_age(now).as_micros() as u64);
        }
    }

    /// Whether the queues disagreed on their epochs.
    pub fn disagree(&self) -> bool {
        self.disagree
    }

    /// The merged view (the default view when no queue was added).
    pub fn into_view(self) -> HeldView {
        let mut v = self.view.unwrap_or_default();
        v.epochs = self.epochs.into_values().collect();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txqueue::{Limits, TxQueue};

    #[test]
    fn queues_merge_into_one_view_with_one_open_epoch() {
        let lim = Limits {
            max_requests: 10,
            max_bytes: 1 << 20,
        };
        let (mut a, mut b) = (TxQueue::new(lim), TxQueue::new(lim));
        a.push((), 10).unwrap();
        b.push((), 20).unwrap();
        a.seal(Epoch(1)).unwrap();
        b.seal(Epoch(1)).unwrap();
        b.push((), 5).unwrap();
        let now = Instant::now();
        let mut m = QueueMerge::default();
        m.add(&a.counters(), a.epochs(), now);
        m.add(&b.counters(), b.epochs(), now);
        assert!(!m.disagree());
        let v = m.into_view();
        assert_eq!((v.open_epoch, v.last_sealed), (Epoch(2), Some(Epoch(1))));
        assert_eq!((v.held_requests, v.held_bytes), (3, 35));
        assert_eq!(v.epochs.len(), 2);
        assert_eq!(
            (v.epochs[0].epoch, v.epochs[0].requests, v.epochs[0].bytes),
            (Epoch(1), 2, 30)
        );
        assert_eq!(
            (v.epochs[1].epoch, v.epochs[1].requests, v.epochs[1].bytes),
            (Epoch(2), 1, 5)
        );

        // Whichever queue answers last, the open epoch is the newest and the committed one
        // what every queue committed.
        a.seal(Epoch(2)).unwrap();
        a.take_committable(Epoch(2)).unwrap();
        for order in [[&a, &b], [&b, &a]] {
            let mut m = QueueMerge::default();
            for q in order {
                m.add(&q.counters(), q.epochs(), now);
            }
            assert!(m.disagree());
            let v = m.into_view();
            assert_eq!(v.open_epoch, Epoch(3));
            assert_eq!(v.last_committed, None);
        }
    }
}
