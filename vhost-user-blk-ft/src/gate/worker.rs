// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One queue worker's part of `hold` mode: what the worker thread keeps for the gate.
//!
//! - The heads it owes the guest (popped, not completed: held, committing, parked or
//!   deferred). A head the server resubmits from the inflight region while still owed (ring
//!   restarted on the same connection, e.g. every VM stop/cont) is skipped, so nothing is held
//!   or completed twice.
//! - A request the full transaction queue refused ("parked"): the worker takes nothing more
//!   from its ring until a commit frees room (backpressure; OUTPUT_PENDING asks for an early
//!   cut).
//! - Completions of committed requests that arrived while the ring was stopped ("deferred"):
//!   held requests stay held across a ring stop (GET_VRING_BASE does not wait for commit: QEMU
//!   stops the rings at every checkpoint, and the commit comes only after the VM runs again),
//!   and their completions are delivered when the ring runs again.
//! - The order heads were taken in, for the SEALED record.
//! - Cancel on reset: on disconnect or device reset its held requests are cancelled (never
//!   written) and forgotten; requests already taken by a commit belong to an acknowledged
//!   epoch and may land, but their completions are dropped by the connection check.
//!
//! Invariant: a held request is completed to the guest at most once, by the thread owning its
//! ring, only after its commit (or never, after ABORT or a reset).

use crate::gate::hold::{held_bytes, GateAck, GateMsg, HeldReq, Hold};
use crate::request::{BlkRequest, STATUS_IOERR};
use crate::used::finish;
use ft_common::control::QueueState;
use ft_common::vhost_user::{VringHandle, WorkerCtx};
use std::sync::Arc;
use vm_memory::GuestAddress;

/// See the module docs.
pub struct QueueHold {
    queue: u16,
    shared: Arc<Hold>,
    /// Bumped on every reset/disconnect; held requests carry the value they were popped under.
    conn: u64,
    /// Heads popped and not completed yet (held, committing, parked or deferred).
    owed: Vec<bool>,
    /// A request the full transaction queue refused; retried before the ring is read again.
    parked: Option<BlkRequest>,
    /// Completions for a ring that was stopped when they arrived: (head, status addr, status).
    deferred: Vec<(u16, GuestAddress, u8)>,
    /// When each head was last taken off the ring (a counter): orders the SEALED record.
    pop_seq: Vec<u64>,
    next_seq: u64,
}

impl QueueHold {
    /// The hold state of queue `queue` of a ring of at most `depth` heads.
    pub fn new(queue: u16, shared: Arc<Hold>, depth: u32) -> QueueHold {
        let n = depth.clamp(1, 1 << 16) as usize;
        QueueHold {
            queue,
            shared,
            conn: 0,
            owed: vec![false; n],
            parked: None,
            deferred: Vec::new(),
            pop_seq: vec![0; n],
            next_seq: 0,
        }
    }

    /// Whether `head` is owed to the guest (so a resubmission of it is not a new request).
    pub fn owes(&self, head: u16) -> bool {
        self.owed.get(usize::from(head)).copied().unwrap_or(false)
    }

    fn set_owed(&mut self, head: u16, v: bool) {
        if let Some(b) = self.owed.get_mut(usize::from(head)) {
            *b = v;
        }
    }

    /// `head` was taken off the ring (one store: this is the hot path).
    pub fn taken(&mut self, head: u16) {
        self.next_seq += 1;
        if let Some(s) = self.pop_seq.get_mut(usize::from(head)) {
            *s = self.next_seq;
        }
    }

    /// Whether a request waits for room (nothing is taken from the ring meanwhile).
    pub fn is_parked(&self) -> bool {
        self.parked.is_some()
    }

    /// Holds the output request `req` in the open epoch, or parks it when the transaction
    /// queue is full.
    pub fn hold(&mut self, vring: &mut VringHandle, req: BlkRequest) {
        self.set_owed(req.head(), true);
        if let Err(req) = self.push(req) {
            if self.parked.is_some() {
                // Cannot happen: nothing is popped while a request is parked.
                self.set_owed(req.head(), false);
                finish(vring, req.head(), req.status_addr(), STATUS_IOERR, 1);
            } else {
                self.parked = Some(req);
            }
        }
    }

    /// Tries the parked request again (before the ring is read).
    pub fn retry_parked(&mut self) {
        if let Some(req) = self.parked.take() {
            if let Err(req) = self.push(req) {
                self.parked = Some(req);
            }
        }
    }

    /// Holds `req` in the open epoch. Returns the request when the transaction queue is full.
    // By value on purpose: boxing would allocate per request.
    #[allow(clippy::result_large_err)]
    fn push(&mut self, req: BlkRequest) -> Result<(), BlkRequest> {
        let bytes = held_bytes(&req);
        let held = HeldReq {
            queue: self.queue,
            conn: self.conn,
            req,
        };
        let mut txq = self.shared.lock();
        match txq.push(held, bytes) {
            Ok(p) => {
                drop(txq);
                if p.first_in_epoch {
                    self.shared.notifier().output_pending(p.epoch);
                }
                Ok(())
            }
            Err(full) => {
                let open = txq.open_epoch();
                drop(txq);
                // Output is waiting and cannot even be held: ask for an early checkpoint.
                self.shared.notifier().output_pending(open);
                Err(full.payload.req)
            }
        }
    }

    /// Delivers completions deferred while the ring was stopped, once the server has no head
    /// left to resubmit (resubmitted heads are consumed first, so a deferred completion can no
    /// longer come back as a resubmission).
    pub fn deliver_deferred(&mut self, vring: &mut VringHandle) {
        if vring.resubmit_pending() != 0 {
            return;
        }
        for (head, addr, status) in self.deferred.drain(..) {
            finish(vring, head, addr, status, 1);
            if let Some(b) = self.owed.get_mut(usize::from(head)) {
                *b = false;
            }
        }
    }

    /// A gate message from the control thread: completions of a commit, or requests an ABORT
    /// cancelled. (The caller resumes its ring after a commit: room was freed.)
    pub fn handle(&mut self, ctx: &mut WorkerCtx, msg: GateMsg) -> GateAck {
        let mut ack = GateAck::default();
        let q = self.queue;
        match msg {
            GateMsg::Record => {}
            GateMsg::Complete(list) => {
                for (held, status) in list {
                    if held.conn != self.conn || held.queue != q {
                        ack.dropped += 1;
                        continue;
                    }
                    let r = &held.req;
                    // While the server still has heads to resubmit, an owed head completed now
                    // could come back as a new request: defer until they are consumed.
                    match ctx.queue(q).filter(|v| v.resubmit_pending() == 0) {
                        Some(v) => {
                            finish(v, r.head(), r.status_addr(), status, r.used_len(status));
                            self.set_owed(r.head(), false);
                            ack.completed += 1;
                        }
                        None => {
                            self.deferred.push((r.head(), r.status_addr(), status));
                            ack.deferred += 1;
                        }
                    }
                }
                if let Some(v) = ctx.queue(q) {
                    v.signal_used();
                }
            }
            GateMsg::Forget(list) => {
                for held in list {
                    if held.conn == self.conn {
                        self.set_owed(held.req.head(), false);
                    }
                    ack.dropped += 1;
                }
            }
        }
        ack
    }

    /// This queue's part of a SEALED record: every head taken and not yet on the used ring
    /// (the owed ones, and those `in_flight` reports: reads still in the engine), in the order
    /// taken, and the ring's position (as of its stop while it is stopped).
    pub fn record(
        &self,
        ctx: &WorkerCtx,
        in_flight: impl FnOnce(&mut dyn FnMut(u16)),
    ) -> QueueState {
        let q = self.queue;
        let pos = ctx.ring_position(q);
        let seq = |head: u16| self.pop_seq.get(usize::from(head)).copied().unwrap_or(0);
        let mut heads: Vec<(u64, u16)> = (0..self.owed.len())
            .filter(|&i| self.owed[i])
            .map(|i| (seq(i as u16), i as u16))
            .collect();
        in_flight(&mut |head| heads.push((seq(head), head)));
        heads.sort_unstable();
        let outstanding: Vec<u16> = heads.into_iter().map(|(_, h)| h).collect();
        if let Some(p) = pos.filter(|p| !p.running) {
            if p.used_idx.wrapping_add(outstanding.len() as u16) != p.next_avail {
                log::error!(
                    "queue {q}: SEALED record inconsistent: used idx {} + {} outstanding != base {}",
                    p.used_idx,
                    outstanding.len(),
                    p.next_avail
                );
            }
        }
        QueueState {
            queue: q,
            next_avail: pos.map_or(0, |p| p.next_avail),
            used_idx: pos.map(|p| p.used_idx),
            outstanding,
            ..Default::default()
        }
    }

    /// The connection is gone (or the device reset): its held requests are cancelled, never
    /// written. A new frontend resubmits them from its inflight region. Requests already taken
    /// by a commit belong to an acknowledged epoch and may land; their completions are dropped
    /// by the connection check.
    pub fn reset(&mut self) {
        let q = self.queue;
        let cancelled = self.shared.lock().cancel_where(|r| r.queue == q);
        if !cancelled.is_empty() {
            log::info!("queue {q}: cancelled {} held request(s)", cancelled.len());
        }
        drop(cancelled);
        self.conn += 1;
        self.parked = None;
        self.deferred.clear();
        self.owed.fill(false);
    }
}
