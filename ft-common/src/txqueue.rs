// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The transaction queue: a device's held output, tagged by epoch, released only on commit.
//!
//! Both daemons keep one `TxQueue<P>` per device: the block daemon holds writes, flushes,
//! discards and write-zeroes; the net daemon holds TX frames. `P` is the daemon's completion
//! payload (queue index, descriptor head, iovecs or frame buffer, status address).
//!
//! Life of a request: [`TxQueue::push`] tags it with the open epoch and holds it as a queued
//! [`Aiocb`]. [`TxQueue::seal`]`(E)` (SEAL E) closes the open epoch and opens `E+1`.
//! [`TxQueue::take_committable`]`(E)` (COMMIT E) hands every held AIOCB of epochs `<= E` to the
//! I/O engine, in guest order. [`TxQueue::abort`] (ABORT) cancels everything still held.
//! [`TxQueue::cancel_where`] cancels one virtqueue's held requests (its reset or disconnect).
//!
//! Epochs. The open epoch starts at [`Epoch::FIRST`]; the last sealed epoch is always the open
//! epoch minus one (none before the first seal). `seal(E)` accepts any `E >=` the open epoch (a
//! coordinator may start at any number, and skipped epochs are simply empty). `abort()` closes
//! the open epoch as if sealed and marks every epoch in `(last committed, that epoch]` aborted:
//! a later commit of one of them is refused with [`TxError::Aborted`], while epochs opened after
//! the abort commit normally.
//!
//! Invariants (ARCHITECTURE.md section 1; the property tests in `tests/txqueue_props.rs` check
//! them against a reference model):
//! 1. No AIOCB of an epoch later than the last committed epoch is ever handed out:
//!    `take_committable(E)` requires `E` sealed, and hands out exactly the held AIOCBs of
//!    epochs `<= E`. Aborted or cancelled AIOCBs are never handed out (their payload is moved
//!    out, so there is nothing left to submit).
//! 2. Guest order is preserved: held AIOCBs are kept in push order, which is also id order and
//!    epoch order (a push always goes into the open epoch, which no held epoch exceeds), so a
//!    commit takes a prefix of the queue.
//! 3. Nothing is lost silently: every pushed request is, at any time, exactly one of {still
//!    held, taken for commit, cancelled (returned to the caller by `cancel_where` or
//!    `abort`)}; the counters `pushed = held + taken + cancelled` witness it. What happens after
//!    `take` is the I/O engine's ([`crate::aiocb`]): each AIOCB ends in one [`Completion`]
//!    whose failure is explicit.
//! 4. Epochs only grow: the open, sealed and committed epochs never decrease. A seal or commit
//!    that would move one backwards, or a commit of an unsealed epoch, is a [`TxError`], never
//!    a panic.
//!
//! Cost: push, seal and the counters are O(1) amortised with no allocation once the deques
//! have grown; commit and abort move a prefix or everything out (one `Vec` per call, or none
//! with [`TxQueue::take_committable_into`]); `cancel_where` is one pass over what is held.
//!
//! [`Completion`]: crate::aiocb::Completion

use crate::aiocb::{Aiocb, AiocbId};
use crate::epoch::Epoch;
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Bounds on held output; the queue refuses pushes beyond them (backpressure, never a drop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_requests: usize,
    pub max_bytes: u64,
}

/// A successful push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pushed {
    pub id: AiocbId,
    pub epoch: Epoch,
    /// The open epoch held nothing before this push: output became pending, so the daemon
    /// should signal OUTPUT_PENDING (Kemari: checkpoint as soon as output is waiting).
    pub first_in_epoch: bool,
}

/// A refused push: the limits would be exceeded. The payload comes back untouched.
pub struct Full<P> {
    pub payload: P,
    pub bytes: u64,
    pub held_requests: usize,
    pub held_bytes: u64,
    pub limits: Limits,
}

impl<P> fmt::Debug for Full<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Full")
            .field("bytes", &self.bytes)
            .field("held_requests", &self.held_requests)
            .field("held_bytes", &self.held_bytes)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<P> fmt::Display for Full<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "transaction queue full: {} more bytes on {} requests / {} bytes held (limits {} / {})",
            self.bytes,
            self.held_requests,
            self.held_bytes,
            self.limits.max_requests,
            self.limits.max_bytes
        )
    }
}

impl<P> std::error::Error for Full<P> {}

/// The operation an epoch number was refused for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochOp {
    Seal,
    Commit,
}

impl fmt::Display for EpochOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EpochOp::Seal => "sealed",
            EpochOp::Commit => "committed",
        })
    }
}

/// A refused transaction-queue operation. Each is answered on the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The epoch is not newer than the newest one already sealed / committed.
    #[error("epoch {epoch} is stale: epoch {newest} already {op}")]
    Stale {
        op: EpochOp,
        epoch: Epoch,
        newest: Epoch,
    },
    /// COMMIT of an epoch that is not sealed yet.
    #[error("cannot commit epoch {epoch}: last sealed epoch is {last_sealed}")]
    NotSealed { epoch: Epoch, last_sealed: Epoch },
    /// COMMIT of an epoch whose output was aborted.
    #[error("cannot commit epoch {epoch}: epochs through {aborted_through} were aborted")]
    Aborted {
        epoch: Epoch,
        aborted_through: Epoch,
    },
    /// SEAL of the largest epoch number: no epoch could open after it.
    #[error("cannot seal epoch {0}: no epoch after it")]
    EpochOverflow(Epoch),
}

/// What a seal closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealSummary {
    pub sealed: Epoch,
    /// The epoch now open (`sealed + 1`).
    pub open: Epoch,
    /// Held in the epoch just closed.
    pub epoch_requests: usize,
    pub epoch_bytes: u64,
    /// Held in all epochs `<= sealed`: what `COMMIT sealed` would release.
    pub held_requests: usize,
    pub held_bytes: u64,
}

/// Held output of one epoch. Only epochs holding at least one request are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochStats {
    pub epoch: Epoch,
    pub requests: usize,
    pub bytes: u64,
    /// When its oldest still-held request was pushed.
    pub oldest_queued_at: Instant,
}

impl EpochStats {
    /// Age of the oldest held request at `now`.
    pub fn oldest_age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.oldest_queued_at)
    }
}

/// A snapshot of the queue's counters (all maintained incrementally).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxCounters {
    pub open_epoch: Epoch,
    pub last_sealed: Option<Epoch>,
    pub last_committed: Option<Epoch>,
    pub aborted_through: Option<Epoch>,
    pub held_requests: usize,
    pub held_bytes: u64,
    /// Totals since creation: `pushed == held_requests + taken + cancelled`.
    pub pushed: u64,
    pub taken: u64,
    pub cancelled: u64,
}

impl TxCounters {
    /// Whether `SEAL epoch` would be accepted by the queue these counters describe. The one
    /// copy of the rule: [`TxQueue::seal`] checks with it, and a device with several queues
    /// checks all of them with it before sealing any (so a refusal seals nothing).
    pub fn check_seal(&self, epoch: Epoch) -> Result<(), TxError> {
        let last_sealed = Epoch(self.open_epoch.0.saturating_sub(1));
        if epoch <= last_sealed {
            return Err(TxError::Stale {
                op: EpochOp::Seal,
                epoch,
                newest: last_sealed,
            });
        }
        if epoch.next() == epoch {
            return Err(TxError::EpochOverflow(epoch));
        }
        Ok(())
    }

    /// Whether `COMMIT epoch` would be accepted (see [`TxCounters::check_seal`] for why this is
    /// public): `epoch` sealed, newer than the last committed epoch and not aborted.
    pub fn check_commit(&self, epoch: Epoch) -> Result<(), TxError> {
        let last_committed = self.last_committed.unwrap_or(Epoch(0));
        if epoch <= last_committed {
            return Err(TxError::Stale {
                op: EpochOp::Commit,
                epoch,
                newest: last_committed,
            });
        }
        let last_sealed = Epoch(self.open_epoch.0.saturating_sub(1));
        if epoch > last_sealed {
            return Err(TxError::NotSealed { epoch, last_sealed });
        }
        if let Some(aborted_through) = self.aborted_through.filter(|a| epoch <= *a) {
            return Err(TxError::Aborted {
                epoch,
                aborted_through,
            });
        }
        Ok(())
    }
}

/// Per-epoch running counts; the oldest request is found in `held` (it is sorted by epoch).
#[derive(Clone, Copy, Debug)]
struct EpochCount {
    epoch: Epoch,
    requests: usize,
    bytes: u64,
}

/// The transaction queue of one device. See the module docs for semantics and invariants.
#[derive(Debug)]
pub struct TxQueue<P> {
    limits: Limits,
    /// Held AIOCBs in guest order (ascending id and epoch).
    held: VecDeque<Aiocb<P>>,
    /// One entry per epoch with held requests, ascending.
    epochs: VecDeque<EpochCount>,
    held_bytes: u64,
    open: Epoch,
    /// `Epoch(0)` stands for "none": real epochs start at [`Epoch::FIRST`].
    last_committed: Epoch,
    aborted_through: Epoch,
    next_id: AiocbId,
    pushed: u64,
    taken: u64,
    cancelled: u64,
}

/// Upper bound of the capacity reserved up front, so huge limits do not reserve huge memory.
const INITIAL_CAPACITY: usize = 1024;

impl<P> TxQueue<P> {
    pub fn new(limits: Limits) -> Self {
        TxQueue {
            limits,
            held: VecDeque::with_capacity(limits.max_requests.clamp(1, INITIAL_CAPACITY)),
            epochs: VecDeque::with_capacity(8),
            held_bytes: 0,
            open: Epoch::FIRST,
            last_committed: Epoch(0),
            aborted_through: Epoch(0),
            next_id: AiocbId::new(1).unwrap_or(AiocbId::MAX),
            pushed: 0,
            taken: 0,
            cancelled: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether a request of `bytes` would be accepted now. An empty queue accepts one request
    /// of any size, else a request larger than the limits would wait forever.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.held.is_empty()
            || (self.held.len() < self.limits.max_requests
                && self.held_bytes.saturating_add(bytes) <= self.limits.max_bytes)
    }

    /// Whether no request of one byte or more fits: the daemon should stop taking from its
    /// rings until a commit frees room. (A zero-byte request such as a flush may still fit.)
    pub fn is_full(&self) -> bool {
        !self.has_room(1)
    }

    /// Holds a request of `bytes` in the open epoch, timestamped now.
    pub fn push(&mut self, payload: P, bytes: u64) -> Result<Pushed, Full<P>> {
        self.push_at(payload, bytes, Instant::now())
    }

    /// [`TxQueue::push`] with the caller's timestamp (one clock read per ring batch).
    pub fn push_at(&mut self, payload: P, bytes: u64, now: Instant) -> Result<Pushed, Full<P>> {
        if !self.has_room(bytes) {
            return Err(Full {
                payload,
                bytes,
                held_requests: self.held.len(),
                held_bytes: self.held_bytes,
                limits: self.limits,
            });
        }
        let id = self.alloc_id();
        let epoch = self.open;
        let first_in_epoch = match self.epochs.back_mut() {
            Some(c) if c.epoch == epoch => {
                c.requests += 1;
                c.bytes = c.bytes.saturating_add(bytes);
                false
            }
            _ => {
                self.epochs.push_back(EpochCount {
                    epoch,
                    requests: 1,
                    bytes,
                });
                true
            }
        };
        self.held
            .push_back(Aiocb::new(id, epoch, bytes, now, payload));
        self.held_bytes = self.held_bytes.saturating_add(bytes);
        self.pushed += 1;
        Ok(Pushed {
            id,
            epoch,
            first_in_epoch,
        })
    }

    fn alloc_id(&mut self) -> AiocbId {
        let id = self.next_id;
        self.next_id = id.next();
        id
    }

    /// SEAL E: closes the open epoch and opens `E+1`. Held requests keep their tags (`<= E`).
    pub fn seal(&mut self, epoch: Epoch) -> Result<SealSummary, TxError> {
        self.counters().check_seal(epoch)?;
        let (epoch_requests, epoch_bytes) = match self.epochs.back() {
            Some(c) if c.epoch == self.open => (c.requests, c.bytes),
            _ => (0, 0),
        };
        self.open = epoch.next();
        Ok(SealSummary {
            sealed: epoch,
            open: self.open,
            epoch_requests,
            epoch_bytes,
            held_requests: self.held.len(),
            held_bytes: self.held_bytes,
        })
    }

    /// COMMIT E: hands every held AIOCB of epochs `<= E` to the caller in guest order (queued,
    /// to be submitted by the I/O engine) and records `E` as committed.
    pub fn take_committable(&mut self, epoch: Epoch) -> Result<Vec<Aiocb<P>>, TxError> {
        self.check_commit(epoch)?;
        let mut out = Vec::with_capacity(self.committable_len(epoch));
        self.take_checked(epoch, &mut out);
        Ok(out)
    }

    /// [`TxQueue::take_committable`] appending to a caller-owned buffer (no allocation once
    /// the buffer has grown). On error `out` is untouched.
    pub fn take_committable_into(
        &mut self,
        epoch: Epoch,
        out: &mut Vec<Aiocb<P>>,
    ) -> Result<usize, TxError> {
        self.check_commit(epoch)?;
        Ok(self.take_checked(epoch, out))
    }

    fn check_commit(&self, epoch: Epoch) -> Result<(), TxError> {
        self.counters().check_commit(epoch)
    }

    /// Held AIOCBs of epochs `<= epoch`: a prefix, since `held` is sorted by epoch.
    fn committable_len(&self, epoch: Epoch) -> usize {
        self.held.partition_point(|a| a.epoch() <= epoch)
    }

    fn take_checked(&mut self, epoch: Epoch, out: &mut Vec<Aiocb<P>>) -> usize {
        let n = self.committable_len(epoch);
        out.extend(self.held.drain(..n));
        while self.epochs.front().is_some_and(|c| c.epoch <= epoch) {
            if let Some(c) = self.epochs.pop_front() {
                self.held_bytes = self.held_bytes.saturating_sub(c.bytes);
            }
        }
        self.last_committed = epoch;
        self.taken += n as u64;
        n
    }

    /// ABORT: cancels everything held, of any epoch, and returns the payloads in guest order
    /// so the daemon can fail or forget the guest requests. The open epoch is closed and every
    /// epoch after the last committed one up to it is aborted (commits of them are refused).
    #[must_use = "the aborted guest requests must be failed or forgotten"]
    pub fn abort(&mut self) -> Vec<P> {
        let out: Vec<P> = self.held.drain(..).map(Aiocb::cancel).collect();
        self.cancelled += out.len() as u64;
        self.epochs.clear();
        self.held_bytes = 0;
        self.aborted_through = self.open;
        // Saturation (open == Epoch(u64::MAX)) leaves the open epoch aborted: nothing pushed
        // into it can ever be committed, which keeps invariant 1.
        self.open = self.open.next();
        out
    }

    /// Cancels every held AIOCB whose payload matches (e.g. all of one virtqueue) and returns
    /// their payloads in guest order.
    #[must_use = "the cancelled guest requests must be failed or forgotten"]
    pub fn cancel_where(&mut self, mut pred: impl FnMut(&P) -> bool) -> Vec<P> {
        let mut out = Vec::new();
        // One rotation through the deque keeps the survivors in order without allocating.
        for _ in 0..self.held.len() {
            let Some(a) = self.held.pop_front() else {
                break;
            };
            if pred(a.payload()) {
                self.forget(a.epoch(), a.bytes());
                out.push(a.cancel());
            } else {
                self.held.push_back(a);
            }
        }
        out
    }

    /// Removes one cancelled request from the counters.
    fn forget(&mut self, epoch: Epoch, bytes: u64) {
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
        self.cancelled += 1;
        let i = self.epochs.partition_point(|c| c.epoch < epoch);
        if let Some(c) = self.epochs.get_mut(i).filter(|c| c.epoch == epoch) {
            c.requests -= 1;
            c.bytes = c.bytes.saturating_sub(bytes);
            if c.requests == 0 {
                self.epochs.remove(i);
            }
        }
    }

    /// The held AIOCBs in guest order (for the SEAL record of descriptor heads).
    pub fn held(&self) -> impl ExactSizeIterator<Item = &Aiocb<P>> + '_ {
        self.held.iter()
    }

    pub fn held_requests(&self) -> usize {
        self.held.len()
    }

    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    pub fn open_epoch(&self) -> Epoch {
        self.open
    }

    pub fn last_sealed(&self) -> Option<Epoch> {
        some_epoch(self.last_sealed_raw())
    }

    pub fn last_committed(&self) -> Option<Epoch> {
        some_epoch(self.last_committed)
    }

    pub fn aborted_through(&self) -> Option<Epoch> {
        some_epoch(self.aborted_through)
    }

    /// The open epoch minus one; `Epoch(0)` before the first seal.
    fn last_sealed_raw(&self) -> Epoch {
        Epoch(self.open.0.saturating_sub(1))
    }

    /// Held requests per epoch, ascending; only epochs holding something.
    pub fn epochs(&self) -> impl Iterator<Item = EpochStats> + '_ {
        self.epochs.iter().filter_map(|c| {
            let first = self.held.partition_point(|a| a.epoch() < c.epoch);
            self.held.get(first).map(|a| EpochStats {
                epoch: c.epoch,
                requests: c.requests,
                bytes: c.bytes,
                oldest_queued_at: a.queued_at(),
            })
        })
    }

    pub fn counters(&self) -> TxCounters {
        TxCounters {
            open_epoch: self.open,
            last_sealed: self.last_sealed(),
            last_committed: self.last_committed(),
            aborted_through: self.aborted_through(),
            held_requests: self.held.len(),
            held_bytes: self.held_bytes,
            pushed: self.pushed,
            taken: self.taken,
            cancelled: self.cancelled,
        }
    }
}

fn some_epoch(e: Epoch) -> Option<Epoch> {
    (e != Epoch(0)).then_some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: Limits = Limits {
        max_requests: 100,
        max_bytes: 1 << 20,
    };

    fn payloads(v: Vec<Aiocb<u32>>) -> Vec<u32> {
        v.into_iter().map(Aiocb::cancel).collect()
    }

    #[test]
    fn push_tags_open_epoch_and_flags_first() {
        let mut q = TxQueue::new(ROOMY);
        assert_eq!(q.open_epoch(), Epoch::FIRST);
        let a = q.push(1u32, 10).unwrap();
        let b = q.push(2, 20).unwrap();
        assert_eq!((a.epoch, a.first_in_epoch), (Epoch(1), true));
        assert_eq!((b.epoch, b.first_in_epoch), (Epoch(1), false));
        assert!(b.id > a.id);
        q.seal(Epoch(1)).unwrap();
        let c = q.push(3, 30).unwrap();
        assert_eq!((c.epoch, c.first_in_epoch), (Epoch(2), true));
        assert_eq!((q.held_requests(), q.held_bytes()), (3, 60));
        let order: Vec<u32> = q.held().map(|a| *a.payload()).collect();
        assert_eq!(order, [1, 2, 3]);
    }

    #[test]
    fn limits_refuse_and_return_payload() {
        let mut q = TxQueue::new(Limits {
            max_requests: 2,
            max_bytes: 100,
        });
        assert!(q.has_room(1000) && !q.is_full());
        // An empty queue takes one request of any size.
        q.push("huge", 1000).unwrap();
        assert!(q.is_full() && !q.has_room(0));
        let full = q.push("next", 0).unwrap_err();
        assert_eq!(
            (full.payload, full.held_requests, full.held_bytes),
            ("next", 1, 1000)
        );
        assert!(full.to_string().contains("full"));
        assert_eq!(q.abort(), ["huge"]);

        q.push("a", 60).unwrap();
        assert!(q.has_room(40) && !q.has_room(41));
        assert_eq!(q.push("b", 41).unwrap_err().payload, "b");
        q.push("c", 40).unwrap();
        assert!(q.is_full());
        // The request limit binds even for zero bytes.
        assert_eq!(q.push("flush", 0).unwrap_err().payload, "flush");
        assert_eq!(q.counters().pushed, 3);
    }

    #[test]
    fn zero_byte_request_fits_a_byte_full_queue() {
        let mut q = TxQueue::new(Limits {
            max_requests: 3,
            max_bytes: 10,
        });
        q.push(1u32, 10).unwrap();
        assert!(q.is_full());
        assert!(q.has_room(0));
        q.push(2, 0).unwrap();
    }

    #[test]
    fn seal_accepts_jumps_and_refuses_stale() {
        let mut q = TxQueue::new(ROOMY);
        q.push(1u32, 5).unwrap();
        let s = q.seal(Epoch(7)).unwrap();
        assert_eq!(
            s,
            SealSummary {
                sealed: Epoch(7),
                open: Epoch(8),
                epoch_requests: 1,
                epoch_bytes: 5,
                held_requests: 1,
                held_bytes: 5,
            }
        );
        // The held request keeps the tag it was pushed with (<= 7).
        assert_eq!(q.held().next().map(Aiocb::epoch), Some(Epoch(1)));
        assert_eq!(q.last_sealed(), Some(Epoch(7)));
        for e in [0, 1, 7] {
            assert_eq!(
                q.seal(Epoch(e)),
                Err(TxError::Stale {
                    op: EpochOp::Seal,
                    epoch: Epoch(e),
                    newest: Epoch(7)
                })
            );
        }
        let s = q.seal(Epoch(8)).unwrap();
        assert_eq!((s.epoch_requests, s.held_requests, s.held_bytes), (0, 1, 5));
        assert_eq!(q.open_epoch(), Epoch(9));
    }

    #[test]
    fn seal_of_last_epoch_number_overflows() {
        let mut q = TxQueue::<u32>::new(ROOMY);
        assert_eq!(
            q.seal(Epoch(u64::MAX)),
            Err(TxError::EpochOverflow(Epoch(u64::MAX)))
        );
        assert_eq!(q.open_epoch(), Epoch::FIRST);
        q.seal(Epoch(u64::MAX - 1)).unwrap();
        assert_eq!(q.open_epoch(), Epoch(u64::MAX));
    }

    #[test]
    fn abort_at_the_last_epoch_number_never_commits_it() {
        let mut q = TxQueue::new(ROOMY);
        q.seal(Epoch(u64::MAX - 1)).unwrap();
        q.push(1u32, 1).unwrap();
        assert_eq!(q.abort(), [1]);
        // No epoch after u64::MAX: pushes land in the aborted epoch and stay uncommittable.
        assert_eq!(q.push(2, 1).unwrap().epoch, Epoch(u64::MAX));
        assert!(q.seal(Epoch(u64::MAX)).is_err());
        assert!(q.take_committable(Epoch(u64::MAX)).is_err());
        assert_eq!(q.cancel_where(|_| true), [2]);
    }

    #[test]
    fn commit_takes_sealed_prefix_in_guest_order() {
        let mut q = TxQueue::new(ROOMY);
        q.push(1u32, 1).unwrap();
        q.push(2, 2).unwrap();
        q.seal(Epoch(1)).unwrap();
        q.push(3, 3).unwrap();
        q.seal(Epoch(2)).unwrap();
        q.push(4, 4).unwrap();

        assert_eq!(
            q.take_committable(Epoch(3)).unwrap_err(),
            TxError::NotSealed {
                epoch: Epoch(3),
                last_sealed: Epoch(2)
            }
        );
        let c1 = q.take_committable(Epoch(1)).unwrap();
        assert!(c1.iter().all(|a| a.epoch() == Epoch(1)));
        assert_eq!(payloads(c1), [1, 2]);
        assert_eq!(q.last_committed(), Some(Epoch(1)));
        assert_eq!((q.held_requests(), q.held_bytes()), (2, 7));
        assert_eq!(
            q.take_committable(Epoch(1)).unwrap_err(),
            TxError::Stale {
                op: EpochOp::Commit,
                epoch: Epoch(1),
                newest: Epoch(1)
            }
        );
        let c2 = q.take_committable(Epoch(2)).unwrap();
        assert_eq!(payloads(c2), [3]);
        // The open epoch's request stays held.
        assert_eq!(q.held().map(|a| *a.payload()).collect::<Vec<_>>(), [4]);
        let c = q.counters();
        assert_eq!(
            (c.pushed, c.taken, c.cancelled, c.held_requests),
            (4, 3, 0, 1)
        );
    }

    #[test]
    fn commit_may_skip_epochs_and_be_empty() {
        let mut q = TxQueue::new(ROOMY);
        q.push(1u32, 1).unwrap();
        q.seal(Epoch(1)).unwrap();
        q.push(2, 1).unwrap();
        q.seal(Epoch(2)).unwrap();
        assert_eq!(payloads(q.take_committable(Epoch(2)).unwrap()), [1, 2]);
        q.seal(Epoch(3)).unwrap();
        assert!(q.take_committable(Epoch(3)).unwrap().is_empty());
        assert_eq!(q.last_committed(), Some(Epoch(3)));
        assert_eq!(
            q.take_committable(Epoch(0)).unwrap_err(),
            TxError::Stale {
                op: EpochOp::Commit,
                epoch: Epoch(0),
                newest: Epoch(3)
            }
        );
    }

    #[test]
    fn commit_before_any_seal_is_not_sealed() {
        let mut q = TxQueue::new(ROOMY);
        q.push(1u32, 1).unwrap();
        assert_eq!(
            q.take_committable(Epoch(1)).unwrap_err(),
            TxError::NotSealed {
                epoch: Epoch(1),
                last_sealed: Epoch(0)
            }
        );
        assert_eq!(q.last_sealed(), None);
        assert_eq!(q.last_committed(), None);
        assert_eq!(q.held_requests(), 1);
    }

    #[test]
    fn take_into_appends_and_leaves_buffer_on_error() {
        let mut q = TxQueue::new(ROOMY);
        let mut buf = Vec::new();
        assert!(q.take_committable_into(Epoch(1), &mut buf).is_err());
        assert!(buf.is_empty());
        q.push(1u32, 1).unwrap();
        q.seal(Epoch(1)).unwrap();
        q.push(2, 1).unwrap();
        q.seal(Epoch(2)).unwrap();
        assert_eq!(q.take_committable_into(Epoch(1), &mut buf), Ok(1));
        assert_eq!(q.take_committable_into(Epoch(2), &mut buf), Ok(1));
        assert_eq!(payloads(buf), [1, 2]);
    }

    #[test]
    fn abort_cancels_all_and_refuses_commit_of_aborted_epochs() {
        let mut q = TxQueue::new(ROOMY);
        q.push(1u32, 1).unwrap();
        q.seal(Epoch(1)).unwrap();
        assert_eq!(q.take_committable(Epoch(1)).unwrap().len(), 1);
        q.push(2, 2).unwrap();
        q.seal(Epoch(2)).unwrap();
        q.push(3, 3).unwrap();
        q.seal(Epoch(3)).unwrap();
        q.push(4, 4).unwrap();

        assert_eq!(q.abort(), [2, 3, 4]);
        assert_eq!((q.held_requests(), q.held_bytes()), (0, 0));
        assert_eq!(q.epochs().count(), 0);
        assert_eq!(q.aborted_through(), Some(Epoch(4)));
        assert_eq!(q.open_epoch(), Epoch(5));
        assert_eq!(q.last_sealed(), Some(Epoch(4)));
        for e in [2, 3, 4] {
            assert_eq!(
                q.take_committable(Epoch(e)).unwrap_err(),
                TxError::Aborted {
                    epoch: Epoch(e),
                    aborted_through: Epoch(4)
                }
            );
        }
        assert!(matches!(q.seal(Epoch(4)), Err(TxError::Stale { .. })));
        assert_eq!(q.last_committed(), Some(Epoch(1)));

        // Epochs after the abort work normally.
        let p = q.push(5, 5).unwrap();
        assert_eq!((p.epoch, p.first_in_epoch), (Epoch(5), true));
        q.seal(Epoch(5)).unwrap();
        assert_eq!(payloads(q.take_committable(Epoch(5)).unwrap()), [5]);
        let c = q.counters();
        assert_eq!((c.pushed, c.taken, c.cancelled), (5, 2, 3));
        assert!(q.abort().is_empty());
    }

    #[test]
    fn cancel_where_keeps_survivors_in_order() {
        let mut q = TxQueue::new(ROOMY);
        for (i, vq) in [(0u32, 0u8), (1, 1), (2, 0), (3, 1), (4, 1)] {
            q.push((i, vq), 10).unwrap();
            if i == 2 {
                q.seal(Epoch(1)).unwrap();
            }
        }
        let gone = q.cancel_where(|&(_, vq)| vq == 1);
        assert_eq!(gone, [(1, 1), (3, 1), (4, 1)]);
        let left: Vec<u32> = q.held().map(|a| a.payload().0).collect();
        assert_eq!(left, [0, 2]);
        assert_eq!(q.held_bytes(), 20);
        // Epoch 2 lost all its requests and is no longer listed.
        let e: Vec<(Epoch, usize, u64)> =
            q.epochs().map(|s| (s.epoch, s.requests, s.bytes)).collect();
        assert_eq!(e, [(Epoch(1), 2, 20)]);
        assert!(q.cancel_where(|_| false).is_empty());
    }

    #[test]
    fn epoch_stats_track_oldest_held() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut q = TxQueue::new(ROOMY);
        q.push_at(1u32, 10, t0).unwrap();
        q.push_at(2, 20, t0 + s).unwrap();
        q.seal(Epoch(1)).unwrap();
        q.push_at(3, 30, t0 + 2 * s).unwrap();
        let st: Vec<EpochStats> = q.epochs().collect();
        assert_eq!(st.len(), 2);
        assert_eq!(
            (st[0].epoch, st[0].requests, st[0].bytes),
            (Epoch(1), 2, 30)
        );
        assert_eq!(st[0].oldest_age(t0 + 5 * s), 5 * s);
        assert_eq!(
            (st[1].epoch, st[1].requests, st[1].bytes),
            (Epoch(2), 1, 30)
        );
        assert_eq!(st[1].oldest_age(t0 + 5 * s), 3 * s);
        // The oldest goes away: the next one becomes the oldest.
        assert_eq!(q.cancel_where(|&p| p == 1), [1]);
        let st0 = q.epochs().next().unwrap();
        assert_eq!(st0.oldest_age(t0 + 5 * s), 4 * s);
        assert_eq!(st0.oldest_age(t0), Duration::ZERO);
    }

    #[test]
    fn errors_render() {
        let e = TxError::Stale {
            op: EpochOp::Commit,
            epoch: Epoch(2),
            newest: Epoch(3),
        };
        assert_eq!(e.to_string(), "epoch 2 is stale: epoch 3 already committed");
    }
}
