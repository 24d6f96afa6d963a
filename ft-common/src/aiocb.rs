// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! AIOCBs: owned handles for held and in-flight I/O, with real cancel.
//!
//! The Kemari review (2011) rejected event-tap because it handed out a shared dummy AIOCB for
//! held requests: `bdrv_aio_cancel` on it crashed, and the only safe cancel left was "wait for
//! all in-flight I/O". Here every held request owns its handle, and cancel is a transition of
//! that handle.
//!
//! The state machine is encoded in types, so that an illegal transition does not compile:
//!
//! ```text
//!   Aiocb<P> (Queued) --submit()--> InFlight<P> (Submitted) --complete(res)--> Completion<P>
//!        |                              |    ^                                   outcome:
//!        |                   request_cancel() |                                   Done | Failed
//!        |                              v    |                                   | Cancelled
//!        |                         InFlight<P> (cancel requested) --complete(res)--^
//!        +--cancel()--> P   (dropped before submission: can never be submitted)
//! ```
//!
//! Every transition consumes the previous state, except `request_cancel`, which marks the
//! in-flight handle; the I/O engine then sends `IORING_OP_ASYNC_CANCEL` for it (the block
//! daemon's commit engine does, at shutdown, addressing the SQE by its own slot `user_data`).
//! The payload
//! `P` (the daemon's guest completion: queue, descriptor head, iovecs, status address) is moved
//! out exactly once, on the terminal transition. Hence, by construction: no double completion,
//! no completion or submission after a queued cancel, no cancel after completion. A second
//! cancel request of the same in-flight AIOCB is the one runtime-checked misuse: it returns
//! [`AiocbError::CancelAlreadyRequested`] (a second ASYNC_CANCEL would be harmless but is a bug).
//!
//! A cancel-requested AIOCB resolves at its final CQE: `-ECANCELED` means the kernel cancelled
//! it ([`Outcome::Cancelled`]); any other result means the kernel could not, the canceller waited
//! for the real completion, and the outcome is that result. No transition allocates.
//!
//! Identity: an [`AiocbId`] is unique per transaction queue and monotonic, so id order is guest
//! order. It is not an io_uring `user_data`: each engine addresses its SQEs its own way (the
//! block engine by slot index), so an AIOCB can sit in any slot.
//!
//! The legal path, and the misuses that do not compile:
//!
//! ```
//! use ft_common::{epoch::Epoch, txqueue::{Limits, TxQueue}};
//! let mut q = TxQueue::new(Limits { max_requests: 8, max_bytes: 1 << 20 });
//! q.push("write", 512).unwrap();
//! q.seal(Epoch(1)).unwrap();
//! let a = q.take_committable(Epoch(1)).unwrap().pop().unwrap();
//! let done = a.submit().complete(512);
//! assert_eq!(done.payload, "write");
//! ```
//!
//! Double completion:
//! ```compile_fail,E0382
//! # use ft_common::{epoch::Epoch, txqueue::{Limits, TxQueue}};
//! # let mut q = TxQueue::new(Limits { max_requests: 8, max_bytes: 1 << 20 });
//! # q.push("write", 512).unwrap();
//! # q.seal(Epoch(1)).unwrap();
//! let f = q.take_committable(Epoch(1)).unwrap().pop().unwrap().submit();
//! let _ = f.complete(512);
//! let _ = f.complete(512);
//! ```
//!
//! Submission after a queued cancel:
//! ```compile_fail,E0382
//! # use ft_common::{epoch::Epoch, txqueue::{Limits, TxQueue}};
//! # let mut q = TxQueue::new(Limits { max_requests: 8, max_bytes: 1 << 20 });
//! # q.push("write", 512).unwrap();
//! # q.seal(Epoch(1)).unwrap();
//! let a = q.take_committable(Epoch(1)).unwrap().pop().unwrap();
//! let _ = a.cancel();
//! let _ = a.submit();
//! ```
//!
//! Cancel after completion:
//! ```compile_fail,E0382
//! # use ft_common::{epoch::Epoch, txqueue::{Limits, TxQueue}};
//! # let mut q = TxQueue::new(Limits { max_requests: 8, max_bytes: 1 << 20 });
//! # q.push("write", 512).unwrap();
//! # q.seal(Epoch(1)).unwrap();
//! let mut f = q.take_committable(Epoch(1)).unwrap().pop().unwrap().submit();
//! let _ = f.complete(512);
//! let _ = f.request_cancel();
//! ```

use crate::epoch::Epoch;
use std::fmt;
use std::time::Instant;

/// Ids stay below this (2^63 requests do not happen), so an id always fits an `i64` and the top
/// bit is free for whoever stores ids beside other numbers.
const ID_LIMIT: u64 = 1 << 63;

/// Identity of one AIOCB: unique per transaction queue, below 2^63, increasing in guest order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AiocbId(u64);

impl AiocbId {
    /// The largest id; the queue never hands out more (2^63 requests do not happen).
    pub const MAX: AiocbId = AiocbId(ID_LIMIT - 1);

    /// The id for `raw`, or `None` if `raw` is 2^63 or more.
    pub fn new(raw: u64) -> Option<AiocbId> {
        (raw < ID_LIMIT).then_some(AiocbId(raw))
    }

    /// The raw number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The following id, saturating at [`AiocbId::MAX`].
    pub(crate) fn next(self) -> AiocbId {
        AiocbId(self.0.saturating_add(1).min(Self::MAX.0))
    }
}

impl fmt::Display for AiocbId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A misuse of an AIOCB that the types cannot rule out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AiocbError {
    #[error("AIOCB {0}: cancel already requested")]
    CancelAlreadyRequested(AiocbId),
}

/// A queued AIOCB: held in a transaction queue, or handed to the I/O engine and not yet
/// submitted.
#[derive(Debug)]
#[must_use = "dropping an AIOCB forgets a guest request; submit() or cancel() it"]
pub struct Aiocb<P> {
    id: AiocbId,
    epoch: Epoch,
    bytes: u64,
    queued_at: Instant,
    payload: P,
}

impl<P> Aiocb<P> {
    /// Only a transaction queue makes AIOCBs, so ids stay unique and epochs honest.
    pub(crate) fn new(
        id: AiocbId,
        epoch: Epoch,
        bytes: u64,
        queued_at: Instant,
        payload: P,
    ) -> Self {
        Aiocb {
            id,
            epoch,
            bytes,
            queued_at,
            payload,
        }
    }

    pub fn id(&self) -> AiocbId {
        self.id
    }

    /// The epoch in which the guest issued the request.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The request's byte count (what it counts against the queue's byte limit).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn queued_at(&self) -> Instant {
        self.queued_at
    }

    pub fn payload(&self) -> &P {
        &self.payload
    }

    /// Mutable access, e.g. to fill in engine bookkeeping before submission.
    pub fn payload_mut(&mut self) -> &mut P {
        &mut self.payload
    }

    /// Queued -> Submitted. Call once the SQE (built from [`Aiocb::payload`]) is in the
    /// submission queue.
    pub fn submit(self) -> InFlight<P> {
        InFlight {
            id: self.id,
            epoch: self.epoch,
            bytes: self.bytes,
            queued_at: self.queued_at,
            cancel_requested: false,
            payload: self.payload,
        }
    }

    /// Queued -> Cancelled: the request is dropped and can never be submitted. Returns the
    /// payload so the daemon can fail or forget the guest request.
    pub fn cancel(self) -> P {
        self.payload
    }
}

/// A submitted AIOCB whose CQE has not arrived yet.
#[derive(Debug)]
#[must_use = "an in-flight AIOCB must be completed from its CQE"]
pub struct InFlight<P> {
    id: AiocbId,
    epoch: Epoch,
    bytes: u64,
    queued_at: Instant,
    cancel_requested: bool,
    payload: P,
}

impl<P> InFlight<P> {
    pub fn id(&self) -> AiocbId {
        self.id
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn queued_at(&self) -> Instant {
        self.queued_at
    }

    pub fn payload(&self) -> &P {
        &self.payload
    }

    /// Whether a cancel was requested (Submitted vs. "cancel requested").
    pub fn cancel_requested(&self) -> bool {
        self.cancel_requested
    }

    /// Submitted -> cancel requested. The engine must submit ASYNC_CANCEL for this AIOCB's
    /// SQE and then wait for its own CQE, which decides the outcome (`-ECANCELED`:
    /// [`Outcome::Cancelled`]; anything else: the kernel could not cancel it).
    pub fn request_cancel(&mut self) -> Result<(), AiocbError> {
        if self.cancel_requested {
            return Err(AiocbError::CancelAlreadyRequested(self.id));
        }
        self.cancel_requested = true;
        Ok(())
    }

    /// Submitted | cancel requested -> Completed | Cancelled, from the CQE result `res`.
    pub fn complete(self, res: i32) -> Completion<P> {
        let outcome = if self.cancel_requested && res == -libc::ECANCELED {
            Outcome::Cancelled
        } else if res >= 0 {
            Outcome::Done(res.unsigned_abs())
        } else {
            // An unrequested -ECANCELED (ring teardown) is a failure like any other.
            Outcome::Failed(res.saturating_neg())
        };
        Completion {
            id: self.id,
            epoch: self.epoch,
            bytes: self.bytes,
            queued_at: self.queued_at,
            cancel_requested: self.cancel_requested,
            outcome,
            payload: self.payload,
        }
    }
}

/// How an in-flight AIOCB ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The I/O ran; the CQE result (bytes transferred, or 0).
    Done(u32),
    /// The I/O failed with this errno. The guest request must fail, and a failure of held
    /// output must be reported to the coordinator (ARCHITECTURE.md invariant 3).
    Failed(i32),
    /// Cancelled on request: the kernel never ran it.
    Cancelled,
}

/// A terminal AIOCB: the outcome and the payload, moved out exactly once.
#[derive(Debug)]
#[must_use = "a completion owes the guest a used-ring entry"]
pub struct Completion<P> {
    pub id: AiocbId,
    pub epoch: Epoch,
    pub bytes: u64,
    pub queued_at: Instant,
    /// A cancel was requested; with an outcome other than `Cancelled` the kernel could not
    /// cancel and the canceller waited for this completion.
    pub cancel_requested: bool,
    pub outcome: Outcome,
    pub payload: P,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(id: u64) -> Aiocb<&'static str> {
        Aiocb::new(AiocbId(id), Epoch(4), 512, Instant::now(), "req")
    }

    #[test]
    fn submit_then_complete_done() {
        let a = queued(7);
        assert_eq!((a.id(), a.epoch(), a.bytes()), (AiocbId(7), Epoch(4), 512));
        let f = a.submit();
        assert!(!f.cancel_requested());
        let c = f.complete(512);
        assert_eq!(c.outcome, Outcome::Done(512));
        assert!(!c.cancel_requested);
        assert_eq!(
            (c.id, c.epoch, c.bytes, c.payload),
            (AiocbId(7), Epoch(4), 512, "req")
        );
    }

    #[test]
    fn failed_completion_is_reported_as_failed() {
        let c = queued(1).submit().complete(-libc::EIO);
        assert_eq!(c.outcome, Outcome::Failed(libc::EIO));
        // Without a cancel request, -ECANCELED is a failure, not a cancel.
        let c = queued(2).submit().complete(-libc::ECANCELED);
        assert_eq!(c.outcome, Outcome::Failed(libc::ECANCELED));
        let c = queued(3).submit().complete(i32::MIN);
        assert_eq!(c.outcome, Outcome::Failed(i32::MAX));
    }

    #[test]
    fn cancel_of_queued_returns_payload() {
        assert_eq!(queued(1).cancel(), "req");
    }

    #[test]
    fn cancel_of_submitted_resolves_cancelled_or_completed() {
        let mut f = queued(9).submit();
        f.request_cancel().unwrap();
        assert!(f.cancel_requested());
        assert_eq!(
            f.request_cancel(),
            Err(AiocbError::CancelAlreadyRequested(AiocbId(9)))
        );
        let c = f.complete(-libc::ECANCELED);
        assert_eq!(c.outcome, Outcome::Cancelled);
        assert!(c.cancel_requested);

        // The kernel could not cancel: the real result wins.
        let mut f = queued(10).submit();
        f.request_cancel().unwrap();
        let c = f.complete(4096);
        assert_eq!(c.outcome, Outcome::Done(4096));
        assert!(c.cancel_requested);

        let mut f = queued(11).submit();
        f.request_cancel().unwrap();
        assert_eq!(f.complete(-libc::EIO).outcome, Outcome::Failed(libc::EIO));
    }

    #[test]
    fn ids_stay_below_2_pow_63() {
        assert_eq!(AiocbId::new(ID_LIMIT), None);
        assert_eq!(AiocbId::new(5), Some(AiocbId(5)));
        assert_eq!(AiocbId::MAX.next(), AiocbId::MAX);
        assert_eq!(AiocbId(1).next(), AiocbId(2));
    }

    #[test]
    fn payload_mut_is_seen_at_completion() {
        let mut a = queued(1);
        *a.payload_mut() = "changed";
        assert_eq!(a.payload(), &"changed");
        let f = a.submit();
        assert_eq!(f.payload(), &"changed");
        assert_eq!(f.complete(0).payload, "changed");
    }
}
