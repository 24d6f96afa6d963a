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
use ft_common::control::{Notifier, QueueState};
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

/// Messages from the control thread to a queue worker (via `WorkerHandle::call`); the
/// worker's [`QueueWorker::Msg`](ft_common::vhost_user::QueueWorker::Msg).
#[derive(Debug)]
pub enum GateMsg {
    /// Committed requests of this queue with the status each must complete with. Sent to
    /// every worker after every commit (possibly empty): room was freed, so a worker that
    /// stopped taking from its ring resumes. Answered with [`GateReply::Ack`].
    Complete(Vec<(HeldReq, u8)>),
    /// Requests cancelled by ABORT: never written; forget them without completing. Answered
    /// with [`GateReply::Ack`].
    Forget(Vec<HeldReq>),
    /// The worker's part of the SEALED record, answered with [`GateReply::Record`] (`held`
    /// left 0: the control thread counts the held requests).
    Record,
}

/// A worker's answer to a [`GateMsg`].
#[derive(Debug, PartialEq, Eq)]
pub enum GateReply {
    Ack(GateAck),
    Record(QueueState),
}

/// What a worker did with a [`GateMsg::Complete`] or [`GateMsg::Forget`].
#[derive(Debug, Default, PartialEq, Eq)]
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
