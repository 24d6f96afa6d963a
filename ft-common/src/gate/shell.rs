// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The gate's I/O shell: the [`ControlHandler`] a daemon's control thread runs. It holds the
//! [`GateCore`] and the [`GateDevice`] under one lock (the control thread handles one request at
//! a time; the lock only makes `&self` possible), lets the core decide, calls the device, and
//! gives the result back to the core.
//!
//! A panic inside a command is caught here, under the lock, so the lock is never poisoned: the
//! device salvages what the command had taken ([`GateDevice::recover`]) and the core answers
//! (`COMMIT_FAILED` for a commit whose output was taken, `INTERNAL` otherwise).

use super::core::{GateCore, OnCommitError, Op, Step};
use super::GateDevice;
use crate::control::{ControlHandler, Reply, Request};
use crate::fence::Fence;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

struct Inner<D> {
    core: GateCore,
    dev: D,
}

/// One daemon's gate: `dev` behind the shared gate core.
pub struct Gate<D> {
    inner: Mutex<Inner<D>>,
}

impl<D: GateDevice> Gate<D> {
    /// A gate over `dev` with `fence` (e.g. a persistent one, [`Fence::from_state_dir`]) and
    /// the `--on-commit-error` policy.
    pub fn new(dev: D, fence: Fence, policy: OnCommitError) -> Gate<D> {
        Gate {
            inner: Mutex::new(Inner {
                core: GateCore::new(dev.identity(), fence, policy),
                dev,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<D>> {
        // Never poisoned (panics are caught inside); taken over should that change.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the device under the gate's lock (between commands).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut self.lock().dev)
    }
}

fn run<D: GateDevice>(core: &mut GateCore, dev: &mut D, req: Request) -> Reply {
    match core.step(req) {
        Step::Answer(r) => r,
        Step::Seal(e) => {
            let r = dev.seal(e);
            core.sealed(e, r)
        }
        Step::Commit(e) => {
            // Admitted by `GateCore::admit_commit` inside `step`; the device commits now.
            let start = Instant::now();
            let r = dev.commit(e);
            core.committed(e, r, start.elapsed())
        }
        Step::Abort => {
            let r = dev.abort();
            core.aborted(r)
        }
        Step::Status => {
            let r = dev.status();
            core.status(r)
        }
        Step::Device(req) => dev.other(req),
    }
}

impl<D: GateDevice> ControlHandler for Gate<D> {
    fn handle(&self, req: Request) -> Reply {
        let mut g = self.lock();
        let Inner { core, dev } = &mut *g;
        let op = Op::from(&req);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(core, dev, req))) {
            Ok(reply) => reply,
            Err(p) => {
                let why = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                let rec = dev.recover();
                log::error!("control handler panicked on {op:?}: {why}; device: {rec:?}");
                core.panicked(op, &why, rec)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        AbortDone, CommitDone, CommitFailure, GateError, HeldView, Identity, QueueMerge, Recovery,
    };
    use super::*;
    use crate::control::message::{DeviceKind, ErrorCode, QueueState};
    use crate::epoch::{Epoch, Generation};
    use crate::txqueue::{Limits, TxQueue};

    /// A device of two transaction queues (like two net queue pairs) that counts what it was
    /// asked, refuses like the real queues, and can fail or panic on demand.
    struct TwoQueues {
        q: [TxQueue<u64>; 2],
        seals: usize,
        refuse_tap: bool,
        panic_in_commit: bool,
        released: Vec<u64>,
    }

    impl TwoQueues {
        fn new() -> TwoQueues {
            let lim = Limits {
                max_requests: 100,
                max_bytes: 1 << 20,
            };
            TwoQueues {
                q: [TxQueue::new(lim), TxQueue::new(lim)],
                seals: 0,
                refuse_tap: false,
                panic_in_commit: false,
                released: Vec::new(),
            }
        }
    }

    impl GateDevice for TwoQueues {
        fn identity(&self) -> Identity {
            Identity {
                device: "two".into(),
                kind: DeviceKind::Net,
                mode: "hold".into(),
            }
        }
        fn seal(&mut self, epoch: Epoch) -> Result<Vec<QueueState>, GateError> {
            for q in &self.q {
                q.counters().check_seal(epoch)?;
            }
            self.seals += 1;
            for q in &mut self.q {
                q.seal(epoch)?;
            }
            Ok(Vec::new())
        }
        fn commit(&mut self, epoch: Epoch) -> Result<CommitDone, GateError> {
            if self.panic_in_commit {
                panic!("injected");
            }
            for q in &self.q {
                q.counters().check_commit(epoch)?;
            }
            let previous = self.q[0].last_committed();
            let mut n = 0;
            for q in &mut self.q {
                for a in q.take_committable(epoch)? {
                    self.released.push(*a.payload());
                    n += 1;
                }
            }
            Ok(CommitDone {
                previous,
                requests: n,
                failure: self.refuse_tap.then(|| CommitFailure {
                    error: "the tap refused 1 frame".into(),
                    errno: None,
                }),
                ..Default::default()
            })
        }
        fn abort(&mut self) -> Result<AbortDone, GateError> {
            let n = self.q.iter_mut().map(|q| q.abort().len() as u64).sum();
            Ok(AbortDone {
                requests: n,
                bytes: 0,
                last_committed: self.q[0].last_committed(),
            })
        }
        fn status(&mut self) -> Result<HeldView, GateError> {
            let mut m = QueueMerge::default();
            let now = Instant::now();
            for q in &self.q {
                m.add(&q.counters(), q.epochs(), now);
            }
            Ok(m.into_view())
        }
        fn recover(&mut self) -> Recovery {
            Recovery::Untouched
        }
    }

    const G: Generation = Generation(1);

    fn gate(policy: OnCommitError) -> Gate<TwoQueues> {
        Gate::new(TwoQueues::new(), Fence::default(), policy)
    }

    fn seal(e: u64) -> Request {
        Request::Seal {
            generation: G,
            epoch: Epoch(e),
        }
    }

    fn commit(e: u64) -> Request {
        Request::Commit {
            generation: G,
            epoch: Epoch(e),
            deadline: None,
        }
    }

    fn code(r: Reply) -> ErrorCode {
        match r {
            Reply::Error { code, .. } => code,
            r => panic!("not an error: {r:?}"),
        }
    }

    #[test]
    fn a_retried_seal_is_answered_from_the_record_not_resealed() {
        let g = gate(OnCommitError::Stop);
        let first = g.handle(seal(1));
        assert!(matches!(first, Reply::Sealed { .. }));
        assert_eq!(g.handle(seal(1)), first);
        assert_eq!(g.with_device(|d| d.seals), 1);
        g.with_device(|d| d.q[1].push(9, 1).unwrap());
        assert!(matches!(g.handle(seal(2)), Reply::Sealed { .. }));
        assert_eq!(code(g.handle(seal(1))), ErrorCode::StaleEpoch);
        assert!(matches!(g.handle(commit(2)), Reply::Committed { .. }));
        assert_eq!(g.with_device(|d| d.released.clone()), vec![9]);
    }

    #[test]
    fn a_tap_refusal_is_commit_failed_and_counted() {
        let g = gate(OnCommitError::Report);
        g.with_device(|d| {
            d.q[0].push(1, 1).unwrap();
            d.refuse_tap = true;
        });
        g.handle(seal(1));
        assert!(matches!(g.handle(commit(1)), Reply::CommitFailed { .. }));
        g.with_device(|d| d.refuse_tap = false);
        g.handle(seal(2));
        assert!(matches!(g.handle(commit(2)), Reply::Committed { .. }));
        match g.handle(Request::Status) {
            Reply::Status(s) => {
                assert_eq!((s.commits_ok, s.commits_failed), (1, 1));
                assert!(!s.commit_refused);
                assert_eq!(s.last_committed, Some(Epoch(2)));
                assert_eq!(s.open_epoch, Epoch(3));
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_panicking_command_leaves_a_usable_gate_and_held_output_held() {
        let g = gate(OnCommitError::Stop);
        g.with_device(|d| {
            d.q[0].push(1, 1).unwrap();
            d.panic_in_commit = true;
        });
        g.handle(seal(1));
        assert_eq!(code(g.handle(commit(1))), ErrorCode::Internal);
        g.with_device(|d| d.panic_in_commit = false);
        assert!(matches!(g.handle(commit(1)), Reply::Committed { .. }));
        assert_eq!(g.with_device(|d| d.released.clone()), vec![1]);
    }

    #[derive(Clone, Debug)]
    enum Cmd {
        Push(usize),
        /// Generation offset (-1, 0, +1 from the newest), epoch offset from the last sealed.
        Seal(i64, i64),
        Commit(i64, i64),
        Abort(i64),
        Status,
        TapFails(bool),
    }

    fn cmd() -> impl proptest::strategy::Strategy<Value = Cmd> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0usize..2).prop_map(Cmd::Push),
            4 => (-1i64..=1, -1i64..=2).prop_map(|(g, e)| Cmd::Seal(g, e)),
            4 => (-1i64..=1, -2i64..=1).prop_map(|(g, e)| Cmd::Commit(g, e)),
            1 => (-1i64..=1).prop_map(Cmd::Abort),
            2 => Just(Cmd::Status),
            1 => any::<bool>().prop_map(Cmd::TapFails),
        ]
    }

    proptest::proptest! {
        /// Random commands against the gate over a two-queue device: the fence refuses every
        /// older generation before the device sees it, a retried SEAL gets the very first
        /// record without a second seal, nothing of an epoch above the committed one is
        /// released, STATUS epochs never go back and its counters match the replies, and
        /// under `stop` nothing commits after a failed commit.
        #[test]
        fn gate_rules_hold_for_any_command_sequence(
            stop in proptest::bool::ANY,
            cmds in proptest::collection::vec(cmd(), 1..120),
        ) {
            use proptest::prelude::*;
            let policy = if stop { OnCommitError::Stop } else { OnCommitError::Report };
            let g = gate(policy);
            let mut newest = 0u64;
            let mut last_sealed: Option<(Epoch, Reply)> = None;
            let (mut ok, mut failed) = (0u64, 0u64);
            let (mut open, mut committed) = (Epoch(1), None);
            for c in cmds {
                let gen_of = |d: i64| newest.saturating_add_signed(d);
                let before = g.with_device(|d| (d.seals, d.released.len()));
                let (req, gen) = match c {
                    Cmd::Push(q) => {
                        g.with_device(|d| {
                            let e = d.q[q].open_epoch().0;
                            let _ = d.q[q].push(e, 1);
                        });
                        continue;
                    }
                    Cmd::TapFails(f) => {
                        g.with_device(|d| d.refuse_tap = f);
                        continue;
                    }
                    Cmd::Status => (Request::Status, None),
                    Cmd::Seal(gd, ed) => {
                        let base = last_sealed.as_ref().map_or(0, |(e, _)| e.0);
                        let epoch = Epoch(base.saturating_add_signed(ed).max(1));
                        let gen = gen_of(gd);
                        (Request::Seal { generation: Generation(gen), epoch }, Some(gen))
                    }
                    Cmd::Commit(gd, ed) => {
                        let base = open.0.saturating_sub(1);
                        let epoch = Epoch(base.saturating_add_signed(ed).max(1));
                        let gen = gen_of(gd);
                        (Request::Commit { generation: Generation(gen), epoch, deadline: None }, Some(gen))
                    }
                    Cmd::Abort(gd) => {
                        let gen = gen_of(gd);
                        (Request::Abort { generation: Generation(gen) }, Some(gen))
                    }
                };
                let reply = g.handle(req.clone());
                if let Some(gen) = gen {
                    if gen < newest {
                        prop_assert!(
                            matches!(&reply, Reply::Error { code: ErrorCode::Fenced, .. }),
                            "{req:?} -> {reply:?}"
                        );
                        prop_assert_eq!(g.with_device(|d| (d.seals, d.released.len())), before);
                        continue;
                    }
                    newest = gen;
                }
                match (&req, &reply) {
                    (Request::Seal { epoch, .. }, Reply::Sealed { .. }) => {
                        match &last_sealed {
                            Some((e, first)) if e == epoch => {
                                prop_assert_eq!(first, &reply);
                                prop_assert_eq!(g.with_device(|d| d.seals), before.0);
                            }
                            _ => last_sealed = Some((*epoch, reply.clone())),
                        }
                    }
                    (Request::Commit { epoch, .. }, Reply::Committed { .. } | Reply::CommitFailed { .. }) => {
                        if matches!(reply, Reply::Committed { .. }) {
                            prop_assert!(!(stop && failed > 0), "committed after a failure under stop");
                            ok += 1;
                        } else {
                            failed += 1;
                        }
                        let released = g.with_device(|d| d.released[before.1..].to_vec());
                        prop_assert!(released.iter().all(|&e| e <= epoch.0), "{released:?} > {epoch}");
                    }
                    (Request::Seal { epoch, .. }, Reply::Error { .. }) => {
                        prop_assert!(
                            last_sealed.as_ref().is_none_or(|(e, _)| e != epoch),
                            "a retried SEAL {epoch} refused: {reply:?}"
                        );
                    }
                    (Request::Commit { .. }, Reply::Error { code, .. }) => {
                        if stop && failed > 0 {
                            prop_assert_eq!(*code, ErrorCode::CommitRefused);
                        }
                    }
                    (Request::Abort { .. }, Reply::Aborted { .. }) => last_sealed = None,
                    (Request::Status, Reply::Status(s)) => {
                        prop_assert!(s.open_epoch >= open && s.last_committed >= committed);
                        prop_assert_eq!((s.commits_ok, s.commits_failed), (ok, failed));
                        open = s.open_epoch;
                        committed = s.last_committed;
                    }
                    (_, Reply::Error { .. }) => {}
                    (r, a) => prop_assert!(false, "{r:?} answered {a:?}"),
                }
            }
        }
    }
}
