// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The qmp checkpointer against a small in-test QMP server speaking the real exchange
//! (greeting, qmp_capabilities, stop, cont, events): every SEAL happens with the VM stopped,
//! and the VM runs again after each cut.

mod common;

use common::fake_device::{FakeDevice, Hooks, TestDevice};
use common::*;
use ft_common::control::message::{DeviceKind, Request};
use ft_common::coordinator::qmp::QmpClient;
use ft_common::coordinator::Coordinator;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A QMP server with QEMU's message shapes; `log` records the commands executed.
struct FakeQmp {
    running: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
}

impl FakeQmp {
    fn start(path: &Path) -> FakeQmp {
        let listener = UnixListener::bind(path).unwrap();
        let running = Arc::new(AtomicBool::new(true));
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (r, l) = (running.clone(), log.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (r, l) = (r.clone(), l.clone());
                std::thread::spawn(move || serve(conn, &r, &l));
            }
        });
        FakeQmp { running, log }
    }
}

fn send(w: &mut UnixStream, v: Value) {
    let mut s = v.to_string();
    s.push_str("\r\n");
    let _ = w.write_all(s.as_bytes());
}

fn event(name: &str) -> Value {
    json!({"event": name, "timestamp": {"seconds": 1, "microseconds": 2}})
}

fn serve(conn: UnixStream, running: &AtomicBool, log: &Mutex<Vec<String>>) {
    let mut w = conn.try_clone().unwrap();
    send(
        &mut w,
        json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                       "capabilities": ["oob"]}}),
    );
    let mut negotiated = false;
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            send(
                &mut w,
                json!({"error": {"class": "GenericError", "desc": "JSON parse error"}}),
            );
            continue;
        };
        let cmd = v["execute"].as_str().unwrap_or("").to_string();
        if !negotiated && cmd != "qmp_capabilities" {
            send(
                &mut w,
                json!({"error": {"class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}),
            );
            continue;
        }
        log.lock().unwrap().push(cmd.clone());
        match cmd.as_str() {
            "qmp_capabilities" => {
                negotiated = true;
                send(&mut w, json!({"return": {}}));
            }
            "stop" => {
                running.store(false, Ordering::Release);
                send(&mut w, event("STOP"));
                send(&mut w, json!({"return": {}}));
            }
            "cont" => {
                running.store(true, Ordering::Release);
                send(&mut w, json!({"return": {}}));
                send(&mut w, event("RESUME"));
            }
            "query-status" => {
                let r = running.load(Ordering::Acquire);
                send(
                    &mut w,
                    json!({"return": {"running": r,
                    "status": if r { "running" } else { "paused" }}}),
                );
            }
            other => send(
                &mut w,
                json!({"error": {"class": "CommandNotFound",
                "desc": format!("The command {other} has not been found")}}),
            ),
        }
    }
}

#[test]
fn qmp_client_negotiates_and_reports_errors() {
    let dir = TempDir::new("qmpc");
    let q = FakeQmp::start(&dir.path().join("qmp.sock"));
    let mut c = QmpClient::connect(dir.path().join("qmp.sock"), Duration::from_secs(5)).unwrap();
    c.stop().unwrap();
    assert!(!c.running().unwrap());
    c.cont().unwrap();
    assert!(c.running().unwrap());
    let e = c
        .execute("migrate-set-capabilities-bogus")
        .unwrap_err()
        .to_string();
    assert!(e.contains("CommandNotFound"), "{e}");
    assert_eq!(q.log.lock().unwrap()[0], "qmp_capabilities");
    // A peer that is not QMP is an error, not a hang.
    let l = UnixListener::bind(dir.path().join("mute.sock")).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"{\"hello\": 1}\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    assert!(QmpClient::connect(dir.path().join("mute.sock"), Duration::from_secs(2)).is_err());
    t.join().unwrap();
}

#[test]
fn qmp_checkpointer_seals_only_a_stopped_vm() {
    let dir = TempDir::new("qmp");
    let qmp_path = dir.path().join("qmp.sock");
    let q = FakeQmp::start(&qmp_path);
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    let b = FakeDevice::start("net0", dir.path().join("net0.ctl"), DeviceKind::Net);
    for d in [&a, &b] {
        let running = q.running.clone();
        d.set_hooks(Hooks {
            fail_commits: None,
            check: Some(Box::new(move |r| match r {
                Request::Seal { epoch, .. } if running.load(Ordering::Acquire) => {
                    Some(format!("SEAL {epoch} while the VM runs"))
                }
                _ => None,
            })),
        });
    }
    let cfg = config(
        dir.path(),
        &[("vda", &a.path), ("net0", &b.path)],
        &format!("qmp:{}", qmp_path.display()),
    );
    let c = Coordinator::start(cfg).unwrap();
    for i in 0..3 {
        a.submit(i, 512);
        b.submit(i, 64);
        wait_for("release", || {
            a.released().len() as u64 > i && b.released().len() as u64 > i
        });
    }
    c.shutdown();
    assert!(a.violations().is_empty(), "{:?}", a.violations());
    assert!(b.violations().is_empty(), "{:?}", b.violations());
    // The VM was left running, and stop/cont alternate.
    assert!(q.running.load(Ordering::Acquire));
    let log = q.log.lock().unwrap().clone();
    let cmds: Vec<&str> = log
        .iter()
        .map(String::as_str)
        .filter(|c| *c != "qmp_capabilities")
        .collect();
    assert!(cmds.len() >= 6, "{cmds:?}");
    for pair in cmds.chunks(2) {
        assert_eq!(pair[0], "stop", "{cmds:?}");
        if pair.len() == 2 {
            assert_eq!(pair[1], "cont", "{cmds:?}");
        }
    }
}

#[test]
fn unreachable_qmp_means_no_cut() {
    let dir = TempDir::new("qmpdown");
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    let cfg = config(
        dir.path(),
        &[("vda", &a.path)],
        &format!("qmp:{}", dir.path().join("nobody.sock").display()),
    );
    let c = Coordinator::start(cfg).unwrap();
    a.submit(1, 1);
    wait_for("halt", || !status(&c)["cycle"]["halted"].is_null());
    assert!(status(&c)["cycle"]["halted"]
        .as_str()
        .unwrap()
        .contains("pause"));
    std::thread::sleep(Duration::from_millis(100));
    assert!(a.seal_epochs().is_empty());
    assert_eq!(a.held(), 1);
    c.shutdown();
}
