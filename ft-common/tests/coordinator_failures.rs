// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Failure handling: a daemon killed mid-epoch stops the cycle (reported in status, metrics)
//! until it is back (`continue`) or the operator resumes (`stop-vm`); a commit failure the daemon
//! survives does not stop it; a fenced coordinator is deposed;
//! a restarted coordinator takes a newer generation and never seals below the daemons' open
//! epoch; `ftctl abort` deposes the primary so an older coordinator's commands are refused; a
//! daemon hanging in SEAL blocks neither the other daemon nor the operator.

mod common;

use common::fake_device::{FakeDevice, Hooks, TestDevice};
use common::*;
use ft_common::control::message::{DeviceKind, ErrorCode, Reply, Request};
use ft_common::control::ControlClient;
use ft_common::coordinator::{Coordinator, FailurePolicy, Op};
use ft_common::epoch::{Epoch, Generation};
use ft_common::fence::GenerationStore;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn daemon_killed_mid_epoch_stops_the_cycle_until_it_is_back() {
    let dir = TempDir::new("kill");
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    let mut b = FakeDevice::start("net0", dir.path().join("net0.ctl"), DeviceKind::Net);
    let mut cfg = config(dir.path(), &[("vda", &a.path), ("net0", &b.path)], "sim:10");
    cfg.cycle.on_device_failure = FailurePolicy::Continue;
    let api = cfg.api.clone().unwrap();
    let c = Coordinator::start(cfg).unwrap();
    wait_for("a few commits", || a.commit_epochs().len() >= 3);
    // Output in the open epoch, then the net daemon dies mid-epoch.
    a.submit(1, 4096);
    b.submit(1, 1500);
    b.kill();
    wait_for("failure reported", || {
        !ftctl(&api, "status").unwrap()["cycle"]["halted"].is_null()
    });
    let s = ftctl(&api, "status").unwrap();
    assert!(
        s["cycle"]["halted"]
            .as_str()
            .unwrap()
            .contains("disconnected"),
        "{s}"
    );
    assert_eq!(s["devices"][1]["connected"], false);
    assert!(s["devices"][1]["failure"].as_str().is_some());
    let m = ftctl(&api, "metrics").unwrap();
    let m = m.as_str().unwrap();
    assert!(m.contains("ft_device_connected{device=\"net0\"} 0"), "{m}");
    assert!(
        m.contains("ft_device_disconnects_total{device=\"net0\"} 1"),
        "{m}"
    );
    assert!(m.contains("ft_cycle_halted 1"), "{m}");
    // No new epoch is cut while halted: the blk output of the open epoch stays held.
    let sealed = a.seal_epochs().len();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(a.seal_epochs().len(), sealed, "sealed while halted");
    assert!(a.released().iter().all(|(t, _)| *t != 1) || a.held() == 0);
    let held_before = a.held();
    // resume is refused while the device is away.
    ftctl(&api, "resume").unwrap();
    assert!(!ftctl(&api, "status").unwrap()["cycle"]["halted"].is_null());
    // The daemon restarts (fresh state) and the operator resumes.
    let b2 = FakeDevice::start("net0", dir.path().join("net0.ctl"), DeviceKind::Net);
    wait_for("reconnected", || {
        ftctl(&api, "status").unwrap()["devices"][1]["connected"] == true
    });
    b2.submit(7, 60);
    // `continue`: the cycle goes on by itself once every device is back.
    wait_for("halt cleared", || {
        ftctl(&api, "status").unwrap()["cycle"]["halted"].is_null()
    });
    wait_for("cycle runs again", || {
        !b2.released().is_empty() && a.held() == 0
    });
    assert!(held_before <= 1);
    // The restarted daemon was never sealed below what it had open, and commits are ordered.
    let e = b2.commit_epochs();
    assert!(e.windows(2).all(|w| w[0] < w[1]));
    assert!(b2.violations().is_empty() && a.violations().is_empty());
    c.shutdown();
}

/// A daemon under `--on-commit-error stop` refuses commits after a failure: a device failure,
/// so `stop-vm` halts the cycle and stops the VM.
#[test]
fn commit_failed_stops_the_cycle_and_the_vm_policy_is_reported() {
    let dir = TempDir::new("commitfail");
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    a.state.lock().unwrap().stop_on_commit_error = true;
    let cfg = config(dir.path(), &[("vda", &a.path)], "sim");
    let c = Coordinator::start(cfg).unwrap();
    wait_for("a commit", || !a.commit_epochs().is_empty());
    a.set_hooks(Hooks {
        fail_commits: Some("fdatasync: Input/output error".into()),
        check: None,
    });
    a.submit(1, 4096);
    wait_for("halt", || !status(&c)["cycle"]["halted"].is_null());
    let s = status(&c);
    assert!(s["cycle"]["halted"]
        .as_str()
        .unwrap()
        .contains("Input/output error"));
    assert_eq!(s["devices"][0]["commits_failed"], 1);
    assert_eq!(s["cycle"]["vm_stopped"], true);
    let commits = a.commit_epochs().len();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(a.commit_epochs().len(), commits);
    c.shutdown();
}

/// A daemon under `--on-commit-error report` survives a failed commit: the coordinator reports
/// it and keeps cutting and committing (even under `stop-vm`, and nothing waits for
/// `ftctl resume`); the failed epoch never counts as committed.
#[test]
fn a_reported_commit_failure_keeps_the_cycle_going() {
    let dir = TempDir::new("commitreport");
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    let cfg = config(dir.path(), &[("vda", &a.path)], "sim");
    let c = Coordinator::start(cfg).unwrap();
    wait_for("a commit", || !a.commit_epochs().is_empty());
    a.set_hooks(Hooks {
        fail_commits: Some("fdatasync: Input/output error".into()),
        check: None,
    });
    a.submit(1, 4096);
    wait_for("a failed commit", || {
        status(&c)["devices"][0]["commits_failed"].as_u64() >= Some(1)
    });
    a.set_hooks(Hooks::default());
    let s = status(&c);
    assert!(s["cycle"]["halted"].is_null(), "{s}");
    assert_eq!(s["cycle"]["vm_stopped"], false, "{s}");
    let failed = s["cycle"]["epochs_commit_failed"].as_u64().unwrap();
    assert!(failed >= 1, "{s}");
    // Later output is released without anyone resuming.
    a.submit(2, 4096);
    wait_for("released after the failure", || {
        a.released().iter().any(|(t, _)| *t == 2)
    });
    let s = status(&c);
    assert!(s["cycle"]["halted"].is_null(), "{s}");
    // `last_committed` is an epoch the device really committed.
    let last = s["cycle"]["last_committed"].as_u64().unwrap();
    assert!(
        a.released().iter().any(|(_, e)| e.0 <= last),
        "last_committed {last} released nothing: {s}"
    );
    c.shutdown();
}

/// The coordinator's one thread writes to and reads from every daemon without blocking: a
/// daemon that hangs in SEAL holds up the cut (it waits for every device), but neither the
/// other daemon's SEAL nor operator requests wait for it, and the cycle goes on once it
/// answers.
#[test]
fn a_daemon_hanging_in_seal_blocks_neither_the_other_daemon_nor_the_operator() {
    let dir = TempDir::new("hang");
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    let b = FakeDevice::start("net0", dir.path().join("net0.ctl"), DeviceKind::Net);
    let cfg = config(dir.path(), &[("vda", &a.path), ("net0", &b.path)], "sim");
    let c = Coordinator::start(cfg).unwrap();
    wait_for("commits", || b.commit_epochs().len() >= 2);
    let hang = Duration::from_millis(1500);
    // The epoch net0 is hanging in (its state lock is held meanwhile: the test reads this).
    let hanging: Arc<Mutex<Option<Epoch>>> = Arc::default();
    let h = hanging.clone();
    b.set_hooks(Hooks {
        fail_commits: None,
        check: Some(Box::new(move |r| {
            if let Request::Seal { epoch, .. } = r {
                *h.lock().unwrap() = Some(*epoch);
                std::thread::sleep(hang);
                *h.lock().unwrap() = None;
            }
            None
        })),
    });
    wait_for("net0 hanging in a SEAL", || {
        hanging.lock().unwrap().is_some()
    });
    let epoch = hanging.lock().unwrap().unwrap();
    let t = Instant::now();
    // The coordinator answers at once, and vda got its SEAL of the same epoch.
    assert_eq!(c.op(Op::Pause).unwrap()["paused"], true);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "pause took {:?}",
        t.elapsed()
    );
    wait_for("vda's SEAL", || a.seal_epochs().contains(&epoch));
    assert_eq!(
        *hanging.lock().unwrap(),
        Some(epoch),
        "net0 stopped hanging before the checks"
    );
    let seals_b = b.seal_epochs().len();
    c.op(Op::Resume).unwrap();
    b.set_hooks(Hooks::default());
    wait_for("the cycle goes on", || {
        b.commit_epochs().len() >= seals_b + 2
    });
    assert!(a.violations().is_empty() && b.violations().is_empty());
    c.shutdown();
}

/// A coordinator whose commands a daemon answers with FENCED (a newer coordinator spoke to it)
/// is deposed: `deposed: true`, halted, nothing sealed or committed any more.
#[test]
fn a_fenced_coordinator_shows_deposed() {
    let dir = TempDir::new("fenced");
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    let cfg = config(dir.path(), &[("vda", &a.path)], "sim:5");
    let c = Coordinator::start(cfg).unwrap();
    assert_eq!(c.generation(), Generation(1));
    wait_for("commits", || a.commit_epochs().len() >= 2);
    // A newer coordinator (generation 9) talks to the daemon.
    let mut newer = ControlClient::connect(&a.path, Duration::from_secs(5)).unwrap();
    assert!(matches!(
        newer.call(&Request::Abort {
            generation: Generation(9)
        }),
        Ok(Reply::Aborted { .. })
    ));
    wait_for("deposed", || status(&c)["cycle"]["deposed"] == true);
    let s = status(&c);
    assert!(
        s["cycle"]["halted"].as_str().unwrap().contains("FENCED"),
        "{s}"
    );
    let n = a.requests().len();
    std::thread::sleep(Duration::from_millis(100));
    assert!(a.requests()[n..]
        .iter()
        .all(|(_, r)| matches!(r, Request::Status)));
    c.shutdown();
}

#[test]
fn restarted_coordinator_takes_a_newer_generation_and_continues_epochs() {
    let dir = TempDir::new("restart");
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    let cfg = config(dir.path(), &[("vda", &a.path)], "sim:5");
    let c1 = Coordinator::start(cfg.clone()).unwrap();
    assert_eq!(c1.generation(), Generation(1));
    wait_for("commits", || a.commit_epochs().len() >= 3);
    c1.shutdown();
    let last_sealed = *a.seal_epochs().last().unwrap();
    a.submit(5, 10);
    let c2 = Coordinator::start(cfg.clone()).unwrap();
    assert_eq!(c2.generation(), Generation(2));
    assert_eq!(
        GenerationStore::new(&cfg.state_file).load().unwrap(),
        Generation(2)
    );
    wait_for("released by the new coordinator", || {
        a.released().iter().any(|(t, _)| *t == 5)
    });
    assert_eq!(a.newest_generation(), Generation(2));
    let seals = a.seal_epochs();
    assert!(seals.windows(2).all(|w| w[0] < w[1]), "{seals:?}");
    assert!(seals.iter().any(|e| *e > last_sealed));
    assert_eq!(status(&c2)["seal_failures"], 0);
    // Every request of the new coordinator carries generation 2.
    let gens: Vec<_> = a
        .requests()
        .into_iter()
        .filter_map(|(_, r)| r.generation())
        .collect();
    assert!(gens
        .iter()
        .skip_while(|g| **g == Generation(1))
        .all(|g| *g == Generation(2)));
    c2.shutdown();
}

#[test]
fn ftctl_abort_deposes_and_fences_the_older_coordinator() {
    let dir = TempDir::new("abort");
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    let b = FakeDevice::start("net0", dir.path().join("net0.ctl"), DeviceKind::Net);
    // Acks take long enough that output is held when the abort comes.
    let cfg = config(
        dir.path(),
        &[("vda", &a.path), ("net0", &b.path)],
        "sim:300",
    );
    let api = cfg.api.clone().unwrap();
    let c = Coordinator::start(cfg.clone()).unwrap();
    assert_eq!(c.generation(), Generation(1));
    wait_for("connected", || a.seal_epochs().len() >= 2);
    for i in 0..4 {
        a.submit(i, 4096);
        b.submit(i, 100);
    }
    let r = ftctl(&api, "abort").unwrap();
    assert_eq!(r["generation"], 2, "{r}");
    assert_eq!(r["devices"][0]["aborted"], true, "{r}");
    assert_eq!(r["devices"][0]["cancelled_requests"], 4, "{r}");
    assert_eq!(r["devices"][1]["cancelled_requests"], 4, "{r}");
    assert_eq!(
        GenerationStore::new(&cfg.state_file).load().unwrap(),
        Generation(2)
    );
    assert_eq!((a.held(), b.held()), (0, 0));
    // Deposed: no more seals or commits, even after the pending acks arrive.
    let n = a.requests().len();
    std::thread::sleep(Duration::from_millis(400));
    let later: Vec<_> = a.requests()[n..]
        .iter()
        .filter(|(_, r)| !matches!(r, Request::Status))
        .cloned()
        .collect();
    assert!(later.is_empty(), "deposed coordinator still sent {later:?}");
    assert!(a.released().is_empty() && b.released().is_empty());
    let s = status(&c);
    assert_eq!(s["cycle"]["deposed"], true);
    assert!(c.op(Op::Resume).is_ok());
    assert_eq!(status(&c)["cycle"]["deposed"], true);
    c.shutdown();
    // An older coordinator (generation 1) is refused by both daemons.
    for d in [&a, &b] {
        let mut old = ControlClient::connect(&d.path, Duration::from_secs(5)).unwrap();
        let seal = old
            .call(&Request::Seal {
                generation: Generation(1),
                epoch: Epoch(1000),
            })
            .unwrap();
        assert!(
            matches!(
                seal,
                Reply::Error {
                    code: ErrorCode::Fenced,
                    ..
                }
            ),
            "{seal:?}"
        );
        let commit = old
            .call(&Request::Commit {
                generation: Generation(1),
                epoch: Epoch(2),
                deadline: None,
            })
            .unwrap();
        assert!(
            matches!(
                commit,
                Reply::Error {
                    code: ErrorCode::Fenced,
                    ..
                }
            ),
            "{commit:?}"
        );
    }
    // The next coordinator goes above the abort's generation.
    let c3 = Coordinator::start(cfg).unwrap();
    assert_eq!(c3.generation(), Generation(3));
    c3.shutdown();
}
