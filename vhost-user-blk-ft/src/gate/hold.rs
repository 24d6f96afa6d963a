//! The held state of one block device in `hold` mode, shared by every queue worker and the
//! control thread.
//!
//! One `TxQueue<HeldReq>` for the whole device under one mutex: a worker holds the lock only to
//! push one request (and publish its ring's next avail index), the control thread only to seal,
//! take a commit batch, abort or read counters. So `SEAL` closes the epoch atomically with
//! respect to all queues, and the lock is never held across I/O.

use crate::engine::SlotRequest;
use crate::request::{BlkRequest, RequestKind};
use ft_common::aiocb::InFlight;
use ft_common::control::Notifier;
use ft_common::txqueue::{Limits, TxQueue};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

/// A held guest request: the request and where its completion is owed.
#[derive(Debug)]
pub struct HeldReq {
    /// The virtqueue it came from (= the worker that completes it).
    pub queue: u16,
    /// The worker's connection number when it was popped; a completion for an older
    /// connection is dropped (that frontend is gone; a new one resubmits from its inflight
    /// region).
    pub conn: u64,
    pub req: BlkRequest,
}

impl SlotRequest for InFlight<HeldReq> {
    fn request(&self) -> &BlkRequest {
        &self.payload().req
    }
}

/// Bytes a request counts against the held-bytes limit and in commit statistics: the data
/// written. Flushes, discards and write-zeroes carry no data.
pub fn held_bytes(req: &BlkRequest) -> u64 {
    match req.kind() {
        RequestKind::Write { .. } => u64::from(req.data_len()),
        _ => 0,
    }
}

/// "No index published yet" in [`Hold::next_avail`].
const NO_AVAIL: u32 = u32::MAX;

/// Messages from the control thread to a queue worker (via `WorkerHandle::call`).
#[derive(Debug)]
pub enum GateMsg {
    /// Committed requests of this queue with the status each must complete with. Sent to
    /// every worker after every commit (possibly empty): room was freed, so a worker that
    /// stopped taking from its ring resumes.
    Complete(Vec<(HeldReq, u8)>),
    /// Requests cancelled by ABORT: never written; forget them without completing.
    Forget(Vec<HeldReq>),
}

/// The worker's answer to a [`GateMsg`].
#[derive(Debug, PartialEq, Eq)]
pub struct GateAck {
    /// Guest completions delivered now.
    pub completed: usize,
    /// Completions kept until the stopped ring runs again.
    pub deferred: usize,
    /// Completions dropped because their connection is gone.
    pub dropped: usize,
}

pub struct Hold {
    txq: Mutex<TxQueue<HeldReq>>,
    next_avail: Box<[AtomicU32]>,
    notifier: Notifier,
}

impl Hold {
    pub fn new(limits: Limits, num_queues: u16, notifier: Notifier) -> Hold {
        Hold {
            txq: Mutex::new(TxQueue::new(limits)),
            next_avail: (0..num_queues).map(|_| AtomicU32::new(NO_AVAIL)).collect(),
            notifier,
        }
    }

    /// The transaction queue. A poisoned lock is taken over: the queue's own operations never
    /// leave it inconsistent (they are single-step and do not panic).
    pub fn lock(&self) -> MutexGuard<'_, TxQueue<HeldReq>> {
        self.txq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records queue `q`'s next avail index for the SEALED record.
    pub fn publish_avail(&self, q: u16, idx: u16) {
        if let Some(a) = self.next_avail.get(usize::from(q)) {
            a.store(u32::from(idx), Ordering::Release);
        }
    }

    /// Queue `q`'s next avail index as last published (0 if the ring never ran).
    pub fn next_avail(&self, q: u16) -> u16 {
        match self.next_avail.get(usize::from(q)) {
            Some(a) => match a.load(Ordering::Acquire) {
                NO_AVAIL => 0,
                v => v as u16,
            },
            None => 0,
        }
    }

    pub fn num_queues(&self) -> u16 {
        self.next_avail.len() as u16
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}
