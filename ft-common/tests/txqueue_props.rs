// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property tests of the transaction queue against a reference model.
//!
//! Random interleavings of push, seal, commit, abort and cancel_where run on a
//! `TxQueue` and on a plain-`Vec` model; every result and every counter must agree. A simulated
//! I/O engine submits the AIOCBs a commit hands out, cancels some (queued and in flight) and
//! completes the rest with random results. Independently of the model, each step checks
//! ARCHITECTURE.md section 1:
//! - invariant 1: nothing of an epoch after the last committed (or of an unsealed, aborted or
//!   cancelled request) is ever handed out;
//! - invariant 3: every pushed request is in exactly one state (held, taken, in flight, or one
//!   terminal outcome), and a failed completion surfaces as `Outcome::Failed`;
//! - invariant 4: open, sealed and committed epochs never decrease; bad SEAL/COMMIT numbers are
//!   errors, not panics;
//! - guest order across all commits, and no double release.

use ft_common::aiocb::{Aiocb, AiocbId, InFlight, Outcome};
use ft_common::epoch::Epoch;
use ft_common::txqueue::{EpochOp, Limits, SealSummary, TxError, TxQueue};
use proptest::prelude::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The daemon payload: the push sequence number (unique per push attempt) and a virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Req {
    seq: u64,
    vq: u8,
}

#[derive(Clone, Copy, Debug)]
enum EpochArg {
    /// Relative to the model's reference point (open epoch for seal, last sealed for commit),
    /// clamped at 0.
    Rel(i8),
    /// Any number, including the extremes.
    Abs(u64),
}

#[derive(Clone, Copy, Debug)]
enum Res {
    Ok,
    Eio,
    Ecanceled,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Push { bytes: u64, vq: u8 },
    Seal(EpochArg),
    Commit(EpochArg),
    Abort,
    CancelWhere { vq: u8 },
    Submit { pick: usize },
    DropQueued { pick: usize },
    RequestCancel { pick: usize },
    Complete { pick: usize, res: Res },
}

fn epoch_arg(rel: std::ops::RangeInclusive<i8>) -> impl Strategy<Value = EpochArg> {
    prop_oneof![
        30 => rel.prop_map(EpochArg::Rel),
        1 => prop_oneof![
            Just(0u64),
            Just(u64::MAX),
            Just(u64::MAX - 1),
            any::<u64>()
        ]
        .prop_map(EpochArg::Abs),
    ]
}

fn res() -> impl Strategy<Value = Res> {
    prop_oneof![3 => Just(Res::Ok), 1 => Just(Res::Eio), 1 => Just(Res::Ecanceled)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0u64..6000, 0u8..3).prop_map(|(bytes, vq)| Op::Push { bytes, vq }),
        4 => epoch_arg(-2..=2).prop_map(Op::Seal),
        4 => epoch_arg(-2..=1).prop_map(Op::Commit),
        1 => Just(Op::Abort),
        2 => (0u8..3).prop_map(|vq| Op::CancelWhere { vq }),
        4 => any::<usize>().prop_map(|pick| Op::Submit { pick }),
        1 => any::<usize>().prop_map(|pick| Op::DropQueued { pick }),
        2 => any::<usize>().prop_map(|pick| Op::RequestCancel { pick }),
        4 => (any::<usize>(), res()).prop_map(|(pick, res)| Op::Complete { pick, res }),
    ]
}

fn limits() -> impl Strategy<Value = Limits> {
    (1usize..40, 1u64..60_000).prop_map(|(max_requests, max_bytes)| Limits {
        max_requests,
        max_bytes,
    })
}

/// Where a pushed request is. Exactly one per pushed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Held,
    /// Handed out by a commit, queued in the engine.
    Taken,
    InFlight,
    Done,
    /// Failed with this errno: reported, not lost.
    Failed(i32),
    /// Cancelled while held (cancel_where, abort).
    CancelledHeld,
    /// Cancelled by the engine before submission.
    CancelledQueued,
    /// Cancelled in flight (the kernel confirmed).
    CancelledInFlight,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MReq {
    seq: u64,
    id: AiocbId,
    epoch: u64,
    bytes: u64,
}

/// The reference: plain Vecs and integers, no cleverness.
struct Model {
    limits: Limits,
    held: Vec<(MReq, u8)>,
    open: u64,
    last_sealed: u64,
    last_committed: u64,
    aborted_through: u64,
    pushed: u64,
    taken: u64,
    cancelled: u64,
}

impl Model {
    fn new(limits: Limits) -> Self {
        Model {
            limits,
            held: Vec::new(),
            open: 1,
            last_sealed: 0,
            last_committed: 0,
            aborted_through: 0,
            pushed: 0,
            taken: 0,
            cancelled: 0,
        }
    }

    fn held_bytes(&self) -> u64 {
        self.held.iter().map(|(r, _)| r.bytes).sum()
    }

    fn has_room(&self, bytes: u64) -> bool {
        self.held.is_empty()
            || (self.held.len() < self.limits.max_requests
                && self.held_bytes() + bytes <= self.limits.max_bytes)
    }

    fn seal(&mut self, e: u64) -> Result<SealSummary, TxError> {
        if e <= self.last_sealed {
            return Err(TxError::Stale {
                op: EpochOp::Seal,
                epoch: Epoch(e),
                newest: Epoch(self.last_sealed),
            });
        }
        if e == u64::MAX {
            return Err(TxError::EpochOverflow(Epoch(e)));
        }
        let in_open: Vec<&MReq> = self
            .held
            .iter()
            .map(|(r, _)| r)
            .filter(|r| r.epoch == self.open)
            .collect();
        let s = SealSummary {
            sealed: Epoch(e),
            open: Epoch(e + 1),
            epoch_requests: in_open.len(),
            epoch_bytes: in_open.iter().map(|r| r.bytes).sum(),
            held_requests: self.held.len(),
            held_bytes: self.held_bytes(),
        };
        self.last_sealed = e;
        self.open = e + 1;
        Ok(s)
    }

    fn commit(&mut self, e: u64) -> Result<Vec<MReq>, TxError> {
        if e <= self.last_committed {
            return Err(TxError::Stale {
                op: EpochOp::Commit,
                epoch: Epoch(e),
                newest: Epoch(self.last_committed),
            });
        }
        if e > self.last_sealed {
            return Err(TxError::NotSealed {
                epoch: Epoch(e),
                last_sealed: Epoch(self.last_sealed),
            });
        }
        if e <= self.aborted_through {
            return Err(TxError::Aborted {
                epoch: Epoch(e),
                aborted_through: Epoch(self.aborted_through),
            });
        }
        let (out, keep): (Vec<_>, Vec<_>) = self.held.drain(..).partition(|(r, _)| r.epoch <= e);
        self.held = keep;
        self.last_committed = e;
        self.taken += out.len() as u64;
        Ok(out.into_iter().map(|(r, _)| r).collect())
    }

    fn abort(&mut self) -> Vec<u64> {
        let out: Vec<u64> = self.held.drain(..).map(|(r, _)| r.seq).collect();
        self.cancelled += out.len() as u64;
        self.aborted_through = self.open;
        if self.open < u64::MAX {
            self.last_sealed = self.open;
            self.open += 1;
        }
        out
    }

    /// (epoch, requests, bytes, seq of the oldest) per epoch holding something.
    fn epochs(&self) -> Vec<(u64, usize, u64, u64)> {
        let mut v: Vec<(u64, usize, u64, u64)> = Vec::new();
        for (r, _) in &self.held {
            match v.last_mut() {
                Some(last) if last.0 == r.epoch => {
                    last.1 += 1;
                    last.2 += r.bytes;
                }
                _ => v.push((r.epoch, 1, r.bytes, r.seq)),
            }
        }
        v
    }
}

struct Harness {
    q: TxQueue<Req>,
    m: Model,
    t0: Instant,
    next_seq: u64,
    fates: HashMap<u64, Fate>,
    issued: Vec<AiocbId>,
    /// The engine: AIOCBs handed out but not submitted, and submitted ones.
    queued: Vec<Aiocb<Req>>,
    inflight: Vec<InFlight<Req>>,
    /// Seq numbers released by commits, in release order.
    released: Vec<u64>,
    prev: (u64, Option<Epoch>, Option<Epoch>),
}

fn rel(base: u64, d: i8) -> u64 {
    base.saturating_add_signed(i64::from(d))
}

impl Harness {
    fn new(limits: Limits) -> Self {
        Harness {
            q: TxQueue::new(limits),
            m: Model::new(limits),
            t0: Instant::now(),
            next_seq: 0,
            fates: HashMap::new(),
            issued: Vec::new(),
            queued: Vec::new(),
            inflight: Vec::new(),
            released: Vec::new(),
            prev: (1, None, None),
        }
    }

    /// Moves `seq` from the fate `from` to `to`; anything else is a double release or a
    /// resurrection.
    fn transition(&mut self, seq: u64, from: Fate, to: Fate) -> Result<(), TestCaseError> {
        let f = self.fates.get_mut(&seq);
        prop_assert_eq!(f.as_deref().copied(), Some(from), "seq {} -> {:?}", seq, to);
        if let Some(f) = f {
            *f = to;
        }
        Ok(())
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Push { bytes, vq } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let room = self.m.has_room(bytes);
                prop_assert_eq!(self.q.has_room(bytes), room);
                let now = self.t0 + Duration::from_millis(seq);
                match self.q.push_at(Req { seq, vq }, bytes, now) {
                    Ok(p) => {
                        prop_assert!(room, "push accepted beyond the limits");
                        prop_assert_eq!(p.epoch, Epoch(self.m.open));
                        let first = !self.m.held.iter().any(|(r, _)| r.epoch == self.m.open);
                        prop_assert_eq!(p.first_in_epoch, first);
                        prop_assert!(self.issued.last().copied() < Some(p.id));
                        self.issued.push(p.id);
                        self.m.held.push((
                            MReq {
                                seq,
                                id: p.id,
                                epoch: self.m.open,
                                bytes,
                            },
                            vq,
                        ));
                        self.m.pushed += 1;
                        self.fates.insert(seq, Fate::Held);
                    }
                    Err(full) => {
                        prop_assert!(!room, "push refused with room");
                        prop_assert_eq!(full.payload, Req { seq, vq });
                        prop_assert_eq!(full.bytes, bytes);
                    }
                }
            }
            Op::Seal(arg) => {
                let e = match arg {
                    EpochArg::Rel(d) => rel(self.m.open, d),
                    EpochArg::Abs(e) => e,
                };
                prop_assert_eq!(self.q.seal(Epoch(e)), self.m.seal(e));
            }
            Op::Commit(arg) => {
                let e = match arg {
                    EpochArg::Rel(d) => rel(self.m.last_sealed, d),
                    EpochArg::Abs(e) => e,
                };
                let sealed_before = self.q.last_sealed();
                let got = self.q.take_committable(Epoch(e));
                let want = self.m.commit(e);
                match (got, want) {
                    (Ok(got), Ok(want)) => {
                        // Invariant 1, independently of the model.
                        prop_assert!(sealed_before.is_some_and(|s| Epoch(e) <= s));
                        prop_assert_eq!(self.q.last_committed(), Some(Epoch(e)));
                        for a in &got {
                            prop_assert!(a.epoch() <= Epoch(e), "epoch {} handed out", a.epoch());
                        }
                        let got_m: Vec<MReq> = got
                            .iter()
                            .map(|a| MReq {
                                seq: a.payload().seq,
                                id: a.id(),
                                epoch: a.epoch().0,
                                bytes: a.bytes(),
                            })
                            .collect();
                        prop_assert_eq!(&got_m, &want);
                        for a in got {
                            let seq = a.payload().seq;
                            // Guest order across all commits; no double release.
                            prop_assert!(self.released.last().copied() < Some(seq));
                            self.released.push(seq);
                            self.transition(seq, Fate::Held, Fate::Taken)?;
                            self.queued.push(a);
                        }
                    }
                    (got, want) => prop_assert_eq!(got.map(|v| v.len()), want.map(|v| v.len())),
                }
            }
            Op::Abort => {
                let got: Vec<u64> = self.q.abort().iter().map(|r| r.seq).collect();
                prop_assert_eq!(&got, &self.m.abort());
                for seq in got {
                    self.transition(seq, Fate::Held, Fate::CancelledHeld)?;
                }
            }
            Op::CancelWhere { vq } => {
                let got: Vec<Req> = self.q.cancel_where(|r| r.vq == vq);
                let want: Vec<Req> = self
                    .m
                    .held
                    .iter()
                    .filter(|(_, v)| *v == vq)
                    .map(|(r, v)| Req { seq: r.seq, vq: *v })
                    .collect();
                self.m.held.retain(|(_, v)| *v != vq);
                self.m.cancelled += want.len() as u64;
                prop_assert_eq!(&got, &want);
                for r in got {
                    self.transition(r.seq, Fate::Held, Fate::CancelledHeld)?;
                }
            }
            Op::Submit { pick } => {
                if !self.queued.is_empty() {
                    let a = self.queued.remove(pick % self.queued.len());
                    let seq = a.payload().seq;
                    self.transition(seq, Fate::Taken, Fate::InFlight)?;
                    self.inflight.push(a.submit());
                }
            }
            Op::DropQueued { pick } => {
                if !self.queued.is_empty() {
                    let a = self.queued.remove(pick % self.queued.len());
                    let seq = a.cancel().seq;
                    self.transition(seq, Fate::Taken, Fate::CancelledQueued)?;
                }
            }
            Op::RequestCancel { pick } => {
                if !self.inflight.is_empty() {
                    let n = self.inflight.len();
                    let f = &mut self.inflight[pick % n];
                    let again = f.cancel_requested();
                    match f.request_cancel() {
                        Ok(()) => prop_assert!(!again),
                        Err(_) => prop_assert!(again),
                    }
                }
            }
            Op::Complete { pick, res } => {
                if !self.inflight.is_empty() {
                    let f = self.inflight.remove(pick % self.inflight.len());
                    let asked = f.cancel_requested();
                    let (raw, want) = match res {
                        Res::Ok => (i32::try_from(f.bytes()).unwrap_or(0), None),
                        Res::Eio => (-libc::EIO, Some(Outcome::Failed(libc::EIO))),
                        Res::Ecanceled if asked => (-libc::ECANCELED, Some(Outcome::Cancelled)),
                        Res::Ecanceled => {
                            (-libc::ECANCELED, Some(Outcome::Failed(libc::ECANCELED)))
                        }
                    };
                    let want = want.unwrap_or(Outcome::Done(raw.unsigned_abs()));
                    let c = f.complete(raw);
                    prop_assert_eq!(c.outcome, want);
                    prop_assert_eq!(c.cancel_requested, asked);
                    let to = match c.outcome {
                        Outcome::Done(_) => Fate::Done,
                        Outcome::Failed(e) => Fate::Failed(e),
                        Outcome::Cancelled => Fate::CancelledInFlight,
                    };
                    self.transition(c.payload.seq, Fate::InFlight, to)?;
                }
            }
        }
        self.check()
    }

    /// State checks after every step.
    fn check(&self) -> Result<(), TestCaseError> {
        let c = self.q.counters();
        let some = |e: u64| (e != 0).then_some(Epoch(e));
        prop_assert_eq!(c.open_epoch, Epoch(self.m.open));
        prop_assert_eq!(c.last_sealed, some(self.m.last_sealed));
        prop_assert_eq!(c.last_committed, some(self.m.last_committed));
        prop_assert_eq!(c.aborted_through, some(self.m.aborted_through));
        prop_assert_eq!(c.held_requests, self.m.held.len());
        prop_assert_eq!(c.held_bytes, self.m.held_bytes());
        prop_assert_eq!(
            (c.pushed, c.taken, c.cancelled),
            (self.m.pushed, self.m.taken, self.m.cancelled)
        );
        prop_assert_eq!(c.pushed, c.held_requests as u64 + c.taken + c.cancelled);
        prop_assert_eq!(self.q.is_full(), !self.m.has_room(1));

        let held: Vec<MReq> = self
            .q
            .held()
            .map(|a| MReq {
                seq: a.payload().seq,
                id: a.id(),
                epoch: a.epoch().0,
                bytes: a.bytes(),
            })
            .collect();
        let want: Vec<MReq> = self.m.held.iter().map(|(r, _)| *r).collect();
        prop_assert_eq!(held, want);

        let epochs: Vec<(u64, usize, u64, Instant)> = self
            .q
            .epochs()
            .map(|s| (s.epoch.0, s.requests, s.bytes, s.oldest_queued_at))
            .collect();
        let want: Vec<(u64, usize, u64, Instant)> = self
            .m
            .epochs()
            .into_iter()
            .map(|(e, n, b, seq)| (e, n, b, self.t0 + Duration::from_millis(seq)))
            .collect();
        prop_assert_eq!(epochs, want);

        // Invariant 1: nothing held is of a committed epoch, nothing handed out is later.
        if let Some(lc) = c.last_committed {
            prop_assert!(self.q.held().all(|a| a.epoch() > lc));
        }
        for a in &self.queued {
            prop_assert!(c.last_committed.is_some_and(|lc| a.epoch() <= lc));
        }
        for f in &self.inflight {
            prop_assert!(c.last_committed.is_some_and(|lc| f.epoch() <= lc));
        }

        // Invariant 3: fates partition the pushed requests.
        let count = |want: Fate| self.fates.values().filter(|&&f| f == want).count();
        prop_assert_eq!(self.fates.len() as u64, c.pushed);
        prop_assert_eq!(count(Fate::Held), c.held_requests);
        prop_assert_eq!(count(Fate::Taken), self.queued.len());
        prop_assert_eq!(count(Fate::InFlight), self.inflight.len());
        prop_assert_eq!(self.released.len() as u64, c.taken);
        Ok(())
    }

    /// Invariant 4 between steps: epochs only grow.
    fn check_monotonic(&mut self) -> Result<(), TestCaseError> {
        let now = (
            self.q.open_epoch().0,
            self.q.last_sealed(),
            self.q.last_committed(),
        );
        prop_assert!(now.0 >= self.prev.0);
        prop_assert!(now.1 >= self.prev.1);
        prop_assert!(now.2 >= self.prev.2);
        self.prev = now;
        Ok(())
    }

    /// Drains the engine: every taken request reaches a terminal outcome.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        while !self.queued.is_empty() {
            self.step(Op::Submit { pick: 0 })?;
        }
        while !self.inflight.is_empty() {
            self.step(Op::Complete {
                pick: 0,
                res: Res::Ok,
            })?;
        }
        for (seq, f) in &self.fates {
            prop_assert!(
                !matches!(f, Fate::Taken | Fate::InFlight),
                "seq {} left {:?}",
                seq,
                f
            );
        }
        Ok(())
    }
}

fn run(limits: Limits, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(limits);
    for &op in ops {
        h.step(op)?;
        h.check_monotonic()?;
    }
    h.finish()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// The full interleaving, compared to the model with every invariant checked per step.
    #[test]
    fn txqueue_matches_model(limits in limits(), ops in prop::collection::vec(op(), 1..200)) {
        run(limits, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Only control messages and pushes, with roomy limits: long epoch histories, many
    /// commits, no backpressure noise.
    #[test]
    fn control_sequences_match_model(
        ops in prop::collection::vec(
            prop_oneof![
                3 => (0u64..100, 0u8..3).prop_map(|(bytes, vq)| Op::Push { bytes, vq }),
                2 => epoch_arg(-1..=3).prop_map(Op::Seal),
                2 => epoch_arg(-3..=1).prop_map(Op::Commit),
                1 => Just(Op::Abort),
            ],
            1..300,
        )
    ) {
        run(Limits { max_requests: 10_000, max_bytes: 1 << 40 }, &ops)?;
    }

    /// Backpressure: an empty queue takes any size; beyond that the limits are exact.
    #[test]
    fn backpressure_is_exact(
        limits in limits(),
        sizes in prop::collection::vec(0u64..30_000, 1..60),
    ) {
        let mut q = TxQueue::new(limits);
        let (mut n, mut bytes) = (0usize, 0u64);
        for (i, &b) in sizes.iter().enumerate() {
            let fits = n == 0 || (n < limits.max_requests && bytes + b <= limits.max_bytes);
            prop_assert_eq!(q.has_room(b), fits);
            match q.push(i, b) {
                Ok(_) => {
                    prop_assert!(fits);
                    n += 1;
                    bytes += b;
                }
                Err(full) => {
                    prop_assert!(!fits);
                    prop_assert_eq!(full.payload, i);
                }
            }
            prop_assert_eq!((q.held_requests(), q.held_bytes()), (n, bytes));
            prop_assert!(n <= limits.max_requests.max(1));
            prop_assert!(n <= 1 || bytes <= limits.max_bytes);
        }
    }
}
