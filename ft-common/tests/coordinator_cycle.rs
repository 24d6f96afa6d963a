// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The coordinator against two fake daemons (real ControlServer + TxQueue): output is released
//! only after its checkpoint is acknowledged, in epoch order, on both devices together; a
//! failing checkpointer commits nothing and `ftctl status` says why.

mod common;

use common::fake_device::{FakeDevice, Hooks, TestDevice};
use common::*;
use ft_common::control::message::{DeviceKind, Request};
use ft_common::coordinator::{Coordinator, Op};
use ft_common::epoch::Epoch;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn two_devices(dir: &TempDir) -> (FakeDevice, FakeDevice) {
    (
        FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk),
        FakeDevice::start("net0", dir.path().join("net0.ctl"), DeviceKind::Net),
    )
}

/// Guest traffic on both devices until `stop`; tags count up per device.
fn traffic(devs: Vec<Arc<FakeDevice>>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut tag = 0u64;
        while !stop.load(Ordering::Acquire) {
            for d in &devs {
                d.submit(tag, 4096);
            }
            tag += 1;
            std::thread::sleep(Duration::from_micros(300));
        }
        tag
    })
}

/// Checks what every device released: in guest order, every tag released, epochs only up to
/// the newest COMMIT, and both devices received the same COMMIT sequence, strictly increasing.
fn check_release_order(devs: &[Arc<FakeDevice>], submitted: u64) {
    let first = devs[0].commit_epochs();
    assert!(first.len() >= 3, "too few commits: {first:?}");
    assert!(
        first.windows(2).all(|w| w[0] < w[1]),
        "commits out of order: {first:?}"
    );
    for d in devs {
        assert_eq!(
            d.commit_epochs(),
            first,
            "devices committed different epochs"
        );
        let rel = d.released();
        let tags: Vec<u64> = rel.iter().map(|r| r.0).collect();
        assert_eq!(
            tags,
            (0..submitted).collect::<Vec<_>>(),
            "{} lost or reordered",
            d.name
        );
        let newest = *first.last().unwrap();
        assert!(rel.iter().all(|(_, e)| *e <= newest));
        assert!(d.violations().is_empty(), "{:?}", d.violations());
    }
}

#[test]
fn held_output_released_only_after_ack_in_epoch_order_on_both_devices() {
    let dir = TempDir::new("sim");
    let (a, b) = two_devices(&dir);
    let devs = vec![Arc::new(a), Arc::new(b)];
    // Oracle for sim:40: COMMIT E may only arrive >= 40 ms after SEAL E (the ack delay).
    for d in &devs {
        let seals: Arc<Mutex<HashMap<Epoch, Instant>>> = Arc::default();
        d.set_hooks(Hooks {
            fail_commits: None,
            check: Some(Box::new(move |r| match r {
                Request::Seal { epoch, .. } => {
                    seals.lock().unwrap().insert(*epoch, Instant::now());
                    None
                }
                Request::Commit { epoch, .. } => match seals.lock().unwrap().get(epoch) {
                    Some(t) if t.elapsed() >= Duration::from_millis(40) => None,
                    Some(t) => Some(format!(
                        "commit {epoch} only {:?} after its seal",
                        t.elapsed()
                    )),
                    None => Some(format!("commit of never-sealed epoch {epoch}")),
                },
                _ => None,
            })),
        });
    }
    let cfg = config(
        dir.path(),
        &[("vda", &devs[0].path), ("net0", &devs[1].path)],
        "sim:40",
    );
    let c = Coordinator::start(cfg).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let t = traffic(devs.clone(), stop.clone());
    // Pipelining: with a 20 ms interval and a 40 ms ack, several epochs wait at once.
    let mut max_waiting = 0;
    let end = Instant::now() + Duration::from_millis(600);
    while Instant::now() < end {
        let s = status(&c);
        max_waiting = max_waiting.max(s["cycle"]["awaiting_ack"].as_u64().unwrap());
        // Nothing newer than the last committed epoch is ever out.
        for d in &devs {
            // Released first: a commit landing between the two reads must not look like a
            // release ahead of its commit.
            let released = d.released();
            let committed = d.commit_epochs().last().copied().unwrap_or(Epoch(0));
            assert!(
                released.iter().all(|(_, e)| *e <= committed),
                "released beyond commit {committed}: {released:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Release);
    let submitted = t.join().unwrap();
    assert!(max_waiting >= 2, "no pipelining observed ({max_waiting})");
    // Periodic cuts keep going: everything is released eventually.
    wait_for("all output released", || devs.iter().all(|d| d.held() == 0));
    c.op(Op::Pause).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    check_release_order(&devs, submitted);
    let s = status(&c);
    assert!(s["cycle"]["epochs_committed"].as_u64().unwrap() >= 3);
    assert!(s["latency"]["seal_to_commit"]["p50_us"].as_u64().unwrap() >= 40_000);
    // The cycle's breakdown: cut to cut, the daemon's whole commit and its writes.
    assert!(s["latency"]["cut_to_cut"]["count"].as_u64().unwrap() >= 2);
    assert!(s["latency"]["cut_to_cut"]["p50_us"].as_u64().unwrap() >= 15_000);
    assert!(s["devices"][0]["commit_total"]["count"].as_u64().unwrap() >= 3);
    assert!(s["devices"][0]["writes"]["count"].as_u64().is_some());
    assert_eq!(s["devices"][0]["commits_failed"], 0);
    c.shutdown();
}

#[test]
fn exec_checkpointer_acks_are_the_oracle_and_event_driven_cuts_bound_latency() {
    let dir = TempDir::new("exec");
    let (a, b) = two_devices(&dir);
    let devs = vec![Arc::new(a), Arc::new(b)];
    let acks = dir.path().join("acks");
    std::fs::write(&acks, "").unwrap();
    // The command acknowledges by appending its epoch; a COMMIT must find its epoch there.
    for d in &devs {
        let acks = acks.clone();
        d.set_hooks(Hooks {
            fail_commits: None,
            check: Some(Box::new(move |r| match r {
                Request::Commit { epoch, .. } => {
                    let text = std::fs::read_to_string(&acks).unwrap();
                    (!text.lines().any(|l| l.trim() == epoch.0.to_string()))
                        .then(|| format!("commit of unacknowledged epoch {epoch}"))
                }
                _ => None,
            })),
        });
    }
    let mut cfg = config(
        dir.path(),
        &[("vda", &devs[0].path), ("net0", &devs[1].path)],
        &format!("exec:echo captured; echo $FT_EPOCH >> {}", acks.display()),
    );
    // No periodic cut: only OUTPUT_PENDING (Kemari) drives epochs.
    cfg.cycle.interval = None;
    cfg.cycle.min_interval = Some(Duration::from_millis(5));
    let c = Coordinator::start(cfg).unwrap();
    wait_for("first epoch committed", || {
        !devs[0].commit_epochs().is_empty()
    });
    let mut submitted = 0;
    for round in 0..5u64 {
        for d in &devs {
            d.submit(round, 512);
        }
        submitted += 1;
        let t0 = Instant::now();
        wait_for("event-driven release", || {
            devs.iter().all(|d| d.released().len() as u64 == submitted)
        });
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
    check_release_order(&devs, submitted);
    c.shutdown();
}

#[test]
fn failing_exec_checkpointer_commits_nothing_and_status_says_why() {
    let dir = TempDir::new("execfail");
    let (a, b) = two_devices(&dir);
    let cfg = config(
        dir.path(),
        &[("vda", &a.path), ("net0", &b.path)],
        "exec:echo secondary unreachable; exit 7",
    );
    let api = cfg.api.clone().unwrap();
    let c = Coordinator::start(cfg).unwrap();
    for i in 0..10 {
        a.submit(i, 4096);
        b.submit(i, 1500);
    }
    wait_for("several failed checkpoints", || {
        status(&c)["checkpointer"]["failures"].as_u64().unwrap() >= 3
    });
    assert!(a.commit_epochs().is_empty() && b.commit_epochs().is_empty());
    assert!(a.released().is_empty() && b.released().is_empty());
    assert_eq!((a.held(), b.held()), (10, 10));
    let s = ftctl(&api, "status").unwrap();
    let why = s["checkpointer"]["last_error"].as_str().unwrap();
    assert!(
        why.contains("exit status: 7") && why.contains("unreachable"),
        "{why}"
    );
    assert_eq!(s["cycle"]["epochs_committed"], 0);
    assert!(s["cycle"]["epochs_dropped"].as_u64().unwrap() >= 3);
    assert_eq!(s["devices"][0]["held_requests"], 10);
    assert_eq!(s["devices"][1]["held_bytes"], 15000);
    assert!(s["devices"][0]["oldest_held_age_us"].as_u64().unwrap() > 0);
    c.shutdown();
}

#[test]
fn ftctl_pause_resume_checkpoint_and_metrics() {
    let dir = TempDir::new("ftctl");
    let (a, b) = two_devices(&dir);
    let mut cfg = config(dir.path(), &[("vda", &a.path), ("net0", &b.path)], "sim");
    cfg.cycle.interval = Some(Duration::from_secs(3600));
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
    let api = cfg.api.clone().unwrap();
    let c = Coordinator::start(cfg).unwrap();
    wait_for("first epoch", || a.commit_epochs().len() == 1);
    a.submit(1, 100);
    ftctl(&api, "pause").unwrap();
    assert!(ftctl(&api, "status").unwrap()["cycle"]["paused"]
        .as_bool()
        .unwrap());
    ftctl(&api, "checkpoint").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(a.released().is_empty(), "a paused cycle cut an epoch");
    ftctl(&api, "resume").unwrap();
    // The requested cut happens on resume.
    wait_for("released after resume", || a.released().len() == 1);
    a.submit(2, 100);
    ftctl(&api, "checkpoint").unwrap();
    wait_for("released after checkpoint", || a.released().len() == 2);
    let ann = ftctl(&api, "announce").unwrap();
    assert_eq!(ann["devices"][0]["announced"], false);
    assert_eq!(ann["devices"][1]["announced"], true);
    // Prometheus over HTTP.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(c.metrics_addr().unwrap()).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    for m in [
        "ft_epochs_committed_total 3",
        "ft_device_connected{device=\"vda\"} 1",
        "ft_device_commits_failed_total{device=\"net0\"} 0",
        "ft_seal_to_commit_seconds{quantile=\"0.99\"}",
        "ft_device_fdatasync_seconds_count{device=\"vda\"} 2",
    ] {
        assert!(body.contains(m), "missing {m} in\n{body}");
    }
    assert!(ftctl(&api, "bogus").is_err());
    c.shutdown();
}
