// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The held state of one block device in `hold` mode, shared by every queue worker and the
//! control thread.
//!
//! One `TxQueue<HeldReq>` for the whole device under one mutex: a worker holds the lock only to
//! push one request, the control thread only to seal, take a commit batch, abort or read
//! counters. So `SEAL` closes the epoch atomically with
//! respect to all queues, and the lock is never held across I/O.

use crate::engine::SlotRequest;
use crate::request::{BlkRequest, RequestKind};
use ft_common::aiocb::InFlight;
use ft_common::control::Notifier;
use ft_common::txqueue::{Limits, TxQueue};
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

/// Asks a queue worker (via `WorkerHandle::call`) for its part of the SEALED record; the reply
/// is a `QueueState` with `held` left 0 (the control thread counts the held requests).
#[derive(Debug)]
pub struct RecordQuery;

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
    num_queues: u16,
    notifier: Notifier,
}

impl Hold {
    pub fn new(limits: Limits, num_queues: u16, notifier: Notifier) -> Hold {
        Hold {
            txq: Mutex::new(TxQueue::new(limits)),
            num_queues,
            notifier,
        }
    }

    /// The transaction queue. A poisoned lock is taken over: the queue's own operations never
    /// leave it inconsistent (they are single-step and do not panic).
    pub fn lock(&self) -> MutexGuard<'_, TxQueue<HeldReq>> {
        self.txq.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}
