// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit and property tests of the cycle state machine, without sockets.

use super::*;
use crate::control::message::DeviceKind;
use proptest::prelude::*;
use std::collections::BTreeSet;

fn state(d: usize) -> TransactionState {
    TransactionState {
        device: format!("d{d}"),
        kind: DeviceKind::Blk,
        queues: vec![],
    }
}

/// A machine plus a clock; VM pause/resume are answered at once (as the shell does).
struct H {
    c: Cycle,
    now: Instant,
    log: Vec<Action>,
}

impl H {
    fn new(cfg: CycleConfig, devices: usize) -> H {
        let mut h = H {
            c: Cycle::new(cfg, Generation(7), devices),
            now: Instant::now(),
            log: vec![],
        };
        for d in 0..devices {
            h.feed(Input::DeviceConnected {
                device: d,
                open_epoch: Epoch(1),
                output_pending: false,
            });
        }
        h
    }

    fn feed(&mut self, i: Input) -> Vec<Action> {
        let mut queue = vec![i];
        let mut all = vec![];
        while let Some(i) = queue.pop() {
            let mut out = vec![];
            self.c.handle(self.now, i, &mut out);
            for a in &out {
                match a {
                    Action::PauseVm => queue.push(Input::VmPaused(Ok(()))),
                    Action::ResumeVm => queue.push(Input::VmResumed(Ok(()))),
                    _ => {}
                }
            }
            all.extend(out);
        }
        self.log.extend(all.iter().cloned());
        all
    }

    fn advance(&mut self, ms: u64) -> Vec<Action> {
        self.now += Duration::from_millis(ms);
        self.feed(Input::Tick)
    }

    fn seal_all(&mut self, epoch: u64, devices: usize) -> Vec<Action> {
        let mut all = vec![];
        for d in 0..devices {
            all.extend(self.feed(Input::Sealed {
                device: d,
                epoch: Epoch(epoch),
                state: state(d),
            }));
        }
        all
    }

    fn commit_all(&mut self, epoch: u64, devices: usize) -> Vec<Action> {
        let mut all = vec![];
        for d in 0..devices {
            all.extend(self.feed(Input::Committed {
                device: d,
                epoch: Epoch(epoch),
                stats: CommitStats::default(),
            }));
        }
        all
    }
}

fn cfg() -> CycleConfig {
    CycleConfig {
        interval: Some(Duration::from_millis(10)),
        min_interval: None,
        checkpoint_timeout: Duration::from_millis(1000),
        on_device_failure: FailurePolicy::StopVm,
        max_pending: 8,
    }
}

fn seals(a: &[Action]) -> Vec<u64> {
    a.iter()
        .filter_map(|a| match a {
            Action::SealAll { epoch, .. } => Some(epoch.0),
            _ => None,
        })
        .collect()
}

fn commits(a: &[Action]) -> Vec<u64> {
    a.iter()
        .filter_map(|a| match a {
            Action::Commit { epoch, .. } => Some(epoch.0),
            _ => None,
        })
        .collect()
}

fn has(a: &[Action], f: impl Fn(&Action) -> bool) -> bool {
    a.iter().any(f)
}

#[test]
fn one_full_cycle() {
    let mut h = H::new(cfg(), 2);
    // Connecting everything starts the first cut at once.
    assert_eq!(seals(&h.log), vec![1]);
    assert!(matches!(h.log[0], Action::PauseVm));
    let a = h.seal_all(1, 2);
    assert!(has(
        &a,
        |a| matches!(a, Action::StartCheckpoint { epoch: Epoch(1), states } if states.len() == 2)
    ));
    let a = h.feed(Input::Captured { epoch: Epoch(1) });
    assert!(has(&a, |a| matches!(a, Action::ResumeVm)));
    assert!(commits(&a).is_empty());
    let a = h.feed(Input::Acked { epoch: Epoch(1) });
    assert_eq!(commits(&a), vec![1]);
    let a = h.commit_all(1, 2);
    assert!(has(&a, |a| matches!(
        a,
        Action::Report(Event::EpochCommitted { epoch: Epoch(1) })
    )));
    let s = h.c.status();
    assert_eq!((s.epochs_sealed, s.epochs_committed), (1, 1));
    assert_eq!(s.last_committed, Some(Epoch(1)));
    // The next cut waits for the interval.
    assert!(seals(&h.advance(5)).is_empty());
    assert_eq!(seals(&h.advance(5)), vec![2]);
}

#[test]
fn pipelined_epochs_commit_in_order_despite_out_of_order_acks() {
    let mut h = H::new(cfg(), 1);
    h.seal_all(1, 1);
    h.feed(Input::Captured { epoch: Epoch(1) });
    assert_eq!(seals(&h.advance(10)), vec![2]);
    h.seal_all(2, 1);
    h.feed(Input::Captured { epoch: Epoch(2) });
    // Epoch 2 acknowledged first: nothing may be committed yet.
    assert!(commits(&h.feed(Input::Acked { epoch: Epoch(2) })).is_empty());
    assert_eq!(commits(&h.feed(Input::Acked { epoch: Epoch(1) })), vec![1]);
    // Commit 2 only after commit 1 is answered.
    assert_eq!(commits(&h.commit_all(1, 1)), vec![2]);
    h.commit_all(2, 1);
    assert_eq!(h.c.status().last_committed, Some(Epoch(2)));
}

#[test]
fn failed_and_timed_out_checkpoints_commit_nothing() {
    let mut h = H::new(cfg(), 1);
    h.seal_all(1, 1);
    h.feed(Input::Captured { epoch: Epoch(1) });
    h.advance(10);
    h.seal_all(2, 1);
    h.feed(Input::Captured { epoch: Epoch(2) });
    let a = h.feed(Input::CheckpointFailed {
        epoch: Epoch(1),
        error: "secondary gone".into(),
    });
    assert!(commits(&a).is_empty());
    assert!(h
        .c
        .status()
        .checkpointer_last_error
        .unwrap()
        .contains("secondary gone"));
    // Epoch 2 times out; a late ack changes nothing.
    let a = h.advance(1000);
    assert!(has(&a, |a| matches!(
        a,
        Action::CancelCheckpoint { epoch: Epoch(2) }
    )));
    assert!(commits(&h.feed(Input::Acked { epoch: Epoch(2) })).is_empty());
    assert!(commits(&h.feed(Input::Acked { epoch: Epoch(1) })).is_empty());
    assert!(commits(&h.log).is_empty());
    assert_eq!(h.c.status().last_committed, None);
}

#[test]
fn capture_timeout_resumes_the_vm_without_a_checkpoint() {
    let mut h = H::new(cfg(), 1);
    h.seal_all(1, 1);
    let a = h.advance(1000);
    assert!(has(&a, |a| matches!(
        a,
        Action::CancelCheckpoint { epoch: Epoch(1) }
    )));
    assert!(has(&a, |a| matches!(a, Action::ResumeVm)));
    assert!(commits(&h.feed(Input::Acked { epoch: Epoch(1) })).is_empty());
}

#[test]
fn device_lost_mid_seal_stops_cycle_and_vm() {
    let mut h = H::new(cfg(), 2);
    h.feed(Input::Sealed {
        device: 0,
        epoch: Epoch(1),
        state: state(0),
    });
    let a = h.feed(Input::DeviceLost {
        device: 1,
        error: "EOF".into(),
    });
    assert!(has(&a, |a| matches!(
        a,
        Action::Report(Event::SealFailed { .. })
    )));
    assert!(has(&a, |a| matches!(a, Action::StopVm)));
    assert!(!has(&a, |a| matches!(
        a,
        Action::StartCheckpoint { .. } | Action::ResumeVm
    )));
    assert!(seals(&h.advance(100)).is_empty());
    let s = h.c.status();
    assert!(s.halted.unwrap().contains("disconnected"));
    // Resume is refused while the device is away, accepted after it is back.
    h.feed(Input::Resume);
    assert!(h.c.status().halted.is_some());
    h.feed(Input::DeviceConnected {
        device: 1,
        open_epoch: Epoch(2),
        output_pending: false,
    });
    let a = h.feed(Input::Resume);
    assert!(has(&a, |a| matches!(a, Action::ResumeVm)));
    assert_eq!(seals(&a), vec![2]);
}

#[test]
fn a_reconnected_device_is_not_committed_epochs_sealed_before() {
    let mut h = H::new(cfg(), 2);
    h.seal_all(1, 2);
    h.feed(Input::Captured { epoch: Epoch(1) });
    h.feed(Input::DeviceLost {
        device: 1,
        error: "EOF".into(),
    });
    h.feed(Input::DeviceConnected {
        device: 1,
        open_epoch: Epoch(1),
        output_pending: false,
    });
    let a = h.feed(Input::Acked { epoch: Epoch(1) });
    assert!(has(
        &a,
        |a| matches!(a, Action::Commit { epoch: Epoch(1), devices, .. } if devices == &vec![0])
    ));
}

#[test]
fn wind_down_mid_cut_waits_for_the_seal_then_resumes() {
    let mut h = H::new(cfg(), 2);
    h.feed(Input::Sealed {
        device: 0,
        epoch: Epoch(1),
        state: state(0),
    });
    let a = h.feed(Input::WindDown);
    assert!(
        !has(&a, |a| matches!(a, Action::ResumeVm)),
        "resumed before all sealed"
    );
    assert!(!h.c.is_idle());
    let a = h.feed(Input::Sealed {
        device: 1,
        epoch: Epoch(1),
        state: state(1),
    });
    assert!(has(&a, |a| matches!(a, Action::ResumeVm)));
    assert!(!has(&a, |a| matches!(a, Action::StartCheckpoint { .. })));
    assert!(h.c.is_idle());
    assert!(seals(&h.advance(1000)).is_empty());
}

#[test]
fn wind_down_while_capturing_cancels_and_resumes() {
    let mut h = H::new(cfg(), 1);
    h.seal_all(1, 1);
    let a = h.feed(Input::WindDown);
    assert!(has(&a, |a| matches!(
        a,
        Action::CancelCheckpoint { epoch: Epoch(1) }
    )));
    assert!(has(&a, |a| matches!(a, Action::ResumeVm)));
    assert!(h.c.is_idle());
    assert!(commits(&h.feed(Input::Acked { epoch: Epoch(1) })).is_empty());
}

#[test]
fn commit_failure_halts_with_continue_policy_leaving_vm_running() {
    let mut c = cfg();
    c.on_device_failure = FailurePolicy::Continue;
    let mut h = H::new(c, 2);
    h.seal_all(1, 2);
    h.feed(Input::Acked { epoch: Epoch(1) });
    h.feed(Input::Committed {
        device: 0,
        epoch: Epoch(1),
        stats: CommitStats::default(),
    });
    let a = h.feed(Input::CommitFailed {
        device: 1,
        epoch: Epoch(1),
        error: "EIO".into(),
        device_failed: true,
    });
    assert!(!has(&a, |a| matches!(a, Action::StopVm)));
    let s = h.c.status();
    assert!(s.halted.is_some());
    assert_eq!(s.devices[1].commits_failed, 1);
    assert!(seals(&h.advance(100)).is_empty());
}

/// `--on-commit-error report` on the daemon: a COMMIT_FAILED it survives is counted, not a
/// halt; later epochs are cut and committed, and the failed epoch is not `last_committed`.
#[test]
fn a_reported_commit_failure_does_not_halt_and_is_not_counted_committed() {
    for policy in [FailurePolicy::StopVm, FailurePolicy::Continue] {
        let mut c = cfg();
        c.on_device_failure = policy;
        let mut h = H::new(c, 2);
        h.seal_all(1, 2);
        h.feed(Input::Acked { epoch: Epoch(1) });
        h.commit_all(1, 2);
        h.advance(10);
        h.seal_all(2, 2);
        h.feed(Input::Acked { epoch: Epoch(2) });
        h.feed(Input::Committed {
            device: 0,
            epoch: Epoch(2),
            stats: CommitStats::default(),
        });
        let a = h.feed(Input::CommitFailed {
            device: 1,
            epoch: Epoch(2),
            error: "EIO".into(),
            device_failed: false,
        });
        assert!(!has(&a, |a| matches!(a, Action::StopVm)));
        let s = h.c.status();
        assert_eq!(s.halted, None, "{policy:?}");
        assert_eq!(s.last_committed, Some(Epoch(1)));
        assert_eq!((s.epochs_committed, s.epochs_commit_failed), (1, 1));
        assert_eq!(s.devices[1].commits_failed, 1);
        assert_eq!(seals(&h.advance(10)), vec![3], "the cycle goes on");
        h.seal_all(3, 2);
        assert_eq!(commits(&h.feed(Input::Acked { epoch: Epoch(3) })), vec![3]);
        h.commit_all(3, 2);
        assert_eq!(h.c.status().last_committed, Some(Epoch(3)));
    }
}

/// `--on-device-failure continue`: the cycle carries on by itself once the lost device is back;
/// `stop-vm` waits for the operator.
#[test]
fn continue_resumes_by_itself_when_the_device_is_back_stop_vm_waits() {
    for policy in [FailurePolicy::StopVm, FailurePolicy::Continue] {
        let mut c = cfg();
        c.on_device_failure = policy;
        let mut h = H::new(c, 2);
        h.seal_all(1, 2);
        h.feed(Input::Acked { epoch: Epoch(1) });
        h.commit_all(1, 2);
        h.feed(Input::DeviceLost {
            device: 1,
            error: "gone".into(),
        });
        assert!(h.c.status().halted.is_some());
        assert!(seals(&h.advance(50)).is_empty());
        h.feed(Input::DeviceConnected {
            device: 1,
            open_epoch: Epoch(1),
            output_pending: true,
        });
        h.advance(10);
        let cut: Vec<u64> = seals(&h.log).into_iter().filter(|e| *e > 1).collect();
        match policy {
            FailurePolicy::Continue => {
                assert_eq!(cut, vec![2]);
                assert_eq!(h.c.status().halted, None);
            }
            FailurePolicy::StopVm => {
                assert!(cut.is_empty());
                h.feed(Input::Resume);
                h.advance(10);
                assert_eq!(seals(&h.log), vec![1, 2]);
            }
        }
    }
}

/// A device answering FENCED means a newer coordinator took over: deposed, nothing sealed or
/// committed again, pending epochs dropped, VM stopped, no ABORT of our own.
#[test]
fn fenced_means_deposed() {
    let mut h = H::new(cfg(), 1);
    h.seal_all(1, 1);
    h.feed(Input::Captured { epoch: Epoch(1) });
    let a = h.feed(Input::Fenced {
        device: 0,
        error: "generation 7 is older than generation 9".into(),
    });
    assert!(has(&a, |a| matches!(a, Action::StopVm)));
    assert!(!has(&a, |a| matches!(a, Action::AbortAll { .. })));
    let s = h.c.status();
    assert!(s.deposed);
    assert!(s.halted.unwrap().contains("FENCED"));
    assert!(commits(&h.feed(Input::Acked { epoch: Epoch(1) })).is_empty());
    assert!(seals(&h.advance(100)).is_empty());
    h.feed(Input::Resume);
    assert!(seals(&h.advance(100)).is_empty());
}

#[test]
fn output_pending_cuts_after_min_interval() {
    let mut c = cfg();
    c.interval = Some(Duration::from_secs(10));
    c.min_interval = Some(Duration::from_millis(5));
    let mut h = H::new(c, 1);
    h.seal_all(1, 1);
    h.feed(Input::Acked { epoch: Epoch(1) });
    h.commit_all(1, 1);
    // A stale notification (crossed our seal) is ignored.
    h.feed(Input::OutputPending {
        device: 0,
        epoch: Epoch(1),
    });
    assert!(seals(&h.advance(6)).is_empty());
    h.feed(Input::OutputPending {
        device: 0,
        epoch: Epoch(2),
    });
    assert_eq!(seals(&h.log), vec![1, 2]);
    // Mid-cut no timer is due: the next input comes from the devices.
    assert_eq!(h.c.next_deadline(h.now), None);
}

#[test]
fn abort_drops_pending_epochs_and_stops_cutting() {
    let mut h = H::new(cfg(), 1);
    h.seal_all(1, 1);
    h.feed(Input::Captured { epoch: Epoch(1) });
    let a = h.feed(Input::Abort {
        generation: Generation(9),
    });
    assert!(has(&a, |a| matches!(
        a,
        Action::AbortAll {
            generation: Generation(9)
        }
    )));
    assert!(has(&a, |a| matches!(a, Action::StopVm)));
    assert!(commits(&h.feed(Input::Acked { epoch: Epoch(1) })).is_empty());
    assert!(seals(&h.advance(100)).is_empty());
    h.feed(Input::Resume);
    assert!(seals(&h.advance(100)).is_empty());
    assert!(h.c.status().deposed);
}

#[test]
fn first_seal_is_not_below_the_devices_open_epoch() {
    let mut h = H::new(cfg(), 0);
    h.c = Cycle::new(cfg(), Generation(1), 2);
    h.feed(Input::DeviceConnected {
        device: 0,
        open_epoch: Epoch(40),
        output_pending: false,
    });
    assert!(seals(&h.log).is_empty());
    h.feed(Input::DeviceConnected {
        device: 1,
        open_epoch: Epoch(50),
        output_pending: true,
    });
    assert_eq!(seals(&h.log), vec![50]);
}

#[test]
fn an_abandoned_cut_seals_nothing_does_not_halt_and_is_retried() {
    // A checkpointer that pauses asynchronously (live migration): PauseVm is not answered
    // by the shell.
    let mut c = Cycle::new(cfg(), Generation(7), 1);
    let mut now = Instant::now();
    let mut out = vec![];
    c.handle(
        now,
        Input::DeviceConnected {
            device: 0,
            open_epoch: Epoch(1),
            output_pending: true,
        },
        &mut out,
    );
    assert!(has(&out, |a| matches!(a, Action::PauseVm)));
    out.clear();
    // A second trigger during the cut merges into it.
    c.handle(now, Input::CutNow, &mut out);
    assert!(out.is_empty(), "{out:?}");
    c.handle(
        now,
        Input::CutAbandoned {
            error: "standby unreachable".into(),
        },
        &mut out,
    );
    assert!(seals(&out).is_empty());
    assert!(has(&out, |a| matches!(
        a,
        Action::Report(Event::CheckpointFailed {
            epoch: Epoch(1),
            ..
        })
    )));
    let st = c.status();
    assert!(st.halted.is_none());
    assert!(st.last_sealed.is_none());
    assert!(st.checkpointer_last_error.unwrap().contains("unreachable"));
    // The merged request cuts again at once, with the same epoch number.
    assert!(has(&out, |a| matches!(a, Action::PauseVm)), "{out:?}");
    out.clear();
    now += Duration::from_millis(1);
    c.handle(now, Input::VmPaused(Ok(())), &mut out);
    assert_eq!(seals(&out), vec![1]);
    // A late abandon report for a cut that already paused is ignored.
    out.clear();
    c.handle(
        now,
        Input::CutAbandoned {
            error: "late".into(),
        },
        &mut out,
    );
    assert!(out.is_empty());
}

#[test]
fn pause_and_cut_now() {
    let mut h = H::new(cfg(), 1);
    h.seal_all(1, 1);
    h.feed(Input::Captured { epoch: Epoch(1) });
    h.feed(Input::Pause);
    assert!(seals(&h.advance(100)).is_empty());
    // Acknowledged epochs still commit while paused.
    assert_eq!(commits(&h.feed(Input::Acked { epoch: Epoch(1) })), vec![1]);
    h.feed(Input::Resume);
    assert_eq!(seals(&h.log), vec![1, 2]);
    h.seal_all(2, 1);
    h.feed(Input::Captured { epoch: Epoch(2) });
    assert_eq!(seals(&h.feed(Input::CutNow)), vec![3]);
}

#[test]
fn pipeline_depth_is_bounded() {
    let mut c = cfg();
    c.max_pending = 2;
    let mut h = H::new(c, 1);
    for e in 1..=2 {
        h.seal_all(e, 1);
        h.feed(Input::Captured { epoch: Epoch(e) });
        h.advance(10);
    }
    assert_eq!(seals(&h.log), vec![1, 2]);
    assert!(seals(&h.advance(100)).is_empty());
    h.feed(Input::Acked { epoch: Epoch(1) });
    h.commit_all(1, 1);
    assert_eq!(seals(&h.log), vec![1, 2, 3]);
}

#[derive(Clone, Debug)]
enum Step {
    Advance(u8),
    ReplySeal { ok: bool },
    Capture,
    Ack(u8),
    FailCheckpoint(u8),
    ReplyCommit { ok: bool },
    Pending,
    Lose(u8),
    Reconnect(u8),
    Pause,
    Resume,
    CutNow,
    Fence,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<u8>().prop_map(Step::Advance),
        6 => prop_oneof![9 => Just(true), 1 => Just(false)].prop_map(|ok| Step::ReplySeal { ok }),
        4 => Just(Step::Capture),
        5 => any::<u8>().prop_map(Step::Ack),
        1 => any::<u8>().prop_map(Step::FailCheckpoint),
        5 => prop_oneof![9 => Just(true), 1 => Just(false)].prop_map(|ok| Step::ReplyCommit { ok }),
        2 => Just(Step::Pending),
        1 => any::<u8>().prop_map(Step::Lose),
        2 => any::<u8>().prop_map(Step::Reconnect),
        1 => Just(Step::Pause),
        2 => Just(Step::Resume),
        1 => Just(Step::CutNow),
        1 => Just(Step::Fence),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever order replies, acks, failures and losses come in: only acknowledged epochs are
    /// committed, commits are strictly ordered and one at a time, seals strictly increase.
    #[test]
    fn cycle_invariants(steps in proptest::collection::vec(step(), 1..200), policy in any::<bool>()) {
        const N: usize = 3;
        let mut c = cfg();
        c.on_device_failure = if policy { FailurePolicy::StopVm } else { FailurePolicy::Continue };
        c.min_interval = Some(Duration::from_millis(3));
        let mut h = H::new(c, N);
        // The world: outstanding requests the machine is waiting on.
        let mut seal_wait: Vec<(u64, usize)> = vec![];
        let mut capturing: Vec<u64> = vec![];
        let mut ckpt_pending: Vec<u64> = vec![];
        let mut commit_wait: Vec<(u64, usize)> = vec![];
        let mut connected = [true; N];
        let mut acked: BTreeSet<u64> = BTreeSet::new();
        let mut failed: BTreeSet<u64> = BTreeSet::new();
        let mut seen = 0usize;
        let mut last_seal = 0u64;
        let mut last_commit = 0u64;
        let mut fenced = false;
        for s in steps {
            // Actions of the step that delivers FENCED are checked as before it; every later
            // one must seal and commit nothing.
            let mut fence_now = false;
            let before = h.log.len();
            let a = match s {
                Step::Advance(ms) => h.advance(ms as u64 % 50),
                Step::ReplySeal { ok } => match seal_wait.pop() {
                    Some((e, d)) if ok => h.feed(Input::Sealed { device: d, epoch: Epoch(e), state: state(d) }),
                    Some((e, d)) => h.feed(Input::SealFailed { device: d, epoch: Epoch(e), error: "x".into() }),
                    None => vec![],
                },
                Step::Capture => match capturing.pop() {
                    Some(e) => { ckpt_pending.push(e); h.feed(Input::Captured { epoch: Epoch(e) }) }
                    None => vec![],
                },
                Step::Ack(i) if !ckpt_pending.is_empty() => {
                    let e = ckpt_pending.remove(i as usize % ckpt_pending.len());
                    if !failed.contains(&e) { acked.insert(e); }
                    h.feed(Input::Acked { epoch: Epoch(e) })
                }
                Step::FailCheckpoint(i) if !ckpt_pending.is_empty() => {
                    let e = ckpt_pending.remove(i as usize % ckpt_pending.len());
                    failed.insert(e);
                    h.feed(Input::CheckpointFailed { epoch: Epoch(e), error: "x".into() })
                }
                Step::Ack(_) | Step::FailCheckpoint(_) => vec![],
                Step::ReplyCommit { ok } => match commit_wait.pop() {
                    Some((e, d)) if ok => h.feed(Input::Committed { device: d, epoch: Epoch(e), stats: CommitStats::default() }),
                    Some((e, d)) => h.feed(Input::CommitFailed { device: d, epoch: Epoch(e), error: "x".into(), device_failed: e % 2 == 0 }),
                    None => vec![],
                },
                Step::Pending => h.feed(Input::OutputPending { device: 0, epoch: h.c.status().next_epoch }),
                Step::Lose(d) => {
                    let d = d as usize % N;
                    if connected[d] {
                        connected[d] = false;
                        seal_wait.retain(|(_, x)| *x != d);
                        commit_wait.retain(|(_, x)| *x != d);
                        h.feed(Input::DeviceLost { device: d, error: "x".into() })
                    } else { vec![] }
                }
                Step::Reconnect(d) => {
                    let d = d as usize % N;
                    if !connected[d] {
                        connected[d] = true;
                        let open = Epoch(last_seal + 1);
                        h.feed(Input::DeviceConnected { device: d, open_epoch: open, output_pending: false })
                    } else { vec![] }
                }
                Step::Pause => h.feed(Input::Pause),
                Step::Resume => h.feed(Input::Resume),
                Step::CutNow => h.feed(Input::CutNow),
                Step::Fence => {
                    fence_now = true;
                    // The answers in flight still arrive; the machine must ignore them.
                    h.feed(Input::Fenced { device: 0, error: "x".into() })
                }
            };
            let _ = a;
            // Check every new action against the world and the invariants.
            for (i, act) in h.log.iter().cloned().enumerate().skip(seen) {
                let deposed = fenced || (fence_now && i >= before);
                match act {
                    Action::SealAll { epoch, devices, .. } => {
                        prop_assert!(!deposed, "seal {} after FENCED", epoch.0);
                        prop_assert!(epoch.0 > last_seal, "seal {} after {}", epoch.0, last_seal);
                        last_seal = epoch.0;
                        for d in devices { seal_wait.push((epoch.0, d)); }
                    }
                    Action::StartCheckpoint { epoch, .. } => capturing.push(epoch.0),
                    Action::CancelCheckpoint { epoch } => {
                        failed.insert(epoch.0);
                        acked.remove(&epoch.0);
                        capturing.retain(|e| *e != epoch.0);
                        ckpt_pending.retain(|e| *e != epoch.0);
                    }
                    Action::Commit { epoch, devices, .. } => {
                        prop_assert!(!deposed, "commit {} after FENCED", epoch.0);
                        prop_assert!(acked.contains(&epoch.0), "commit of unacknowledged epoch {}", epoch.0);
                        prop_assert!(!failed.contains(&epoch.0));
                        prop_assert!(epoch.0 > last_commit, "commit {} after {}", epoch.0, last_commit);
                        prop_assert!(commit_wait.is_empty(), "commit {} while {:?} outstanding", epoch.0, commit_wait);
                        last_commit = epoch.0;
                        for d in devices {
                            prop_assert!(connected[d]);
                            commit_wait.push((epoch.0, d));
                        }
                    }
                    _ => {}
                }
            }
            seen = h.log.len();
            fenced |= fence_now;
        }
    }
}
