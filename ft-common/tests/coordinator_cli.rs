// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `ft-coordinator` binary end to end: CLI parsing, generation persisted, ftctl over the
//! API socket, clean shutdown on SIGTERM, and refusal of a non-loopback metrics address.

mod common;

use common::fake_device::{FakeDevice, TestDevice};
use common::*;
use ft_common::control::message::DeviceKind;
use ft_common::epoch::Generation;
use std::process::{Command, Stdio};

#[test]
fn binary_runs_the_cycle_and_stops_on_sigterm() {
    let dir = TempDir::new("cli");
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    let b = FakeDevice::start("net0", dir.path().join("net0.ctl"), DeviceKind::Net);
    let api = dir.path().join("api.sock");
    let state = dir.path().join("gen.state");
    std::fs::write(&state, "{\"generation\":41}\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ft-coordinator"))
        .arg("--device")
        .arg(format!("vda={}", a.path.display()))
        .arg("--device")
        .arg(format!("net0={}", b.path.display()))
        .args([
            "--checkpointer",
            "sim:1",
            "--unsafe-no-checkpoint",
            "--interval-ms",
            "1000",
            "--min-interval-ms",
            "1",
        ])
        .args([
            "--on-device-failure",
            "continue",
            "--checkpoint-timeout-ms",
            "2000",
        ])
        .arg("--state-file")
        .arg(&state)
        .arg("--api")
        .arg(&api)
        .args(["--metrics", "127.0.0.1:0"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("api socket", || api.exists());
    a.submit(1, 4096);
    // Event-driven: released long before the 1 s periodic cut.
    wait_for("release", || a.released().len() == 1);
    assert_eq!(a.newest_generation(), Generation(42));
    let s = ftctl(&api, "status").unwrap();
    assert_eq!(s["generation"], 42);
    assert_eq!(s["checkpointer"]["kind"], "sim:1");
    assert_eq!(s["checkpointer"]["acks_protect_output"], false, "{s}");
    assert_eq!(s["devices"][1]["name"], "net0");
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(!api.exists(), "api socket left behind");
    assert!(std::fs::read_to_string(&state).unwrap().contains("42"));
}

#[test]
fn bad_arguments_are_refused() {
    let dir = TempDir::new("cli-bad");
    let state = dir.path().join("s");
    for args in [
        vec!["--device", "vda=/x", "--metrics", "0.0.0.0:9464"],
        vec!["--device", "novalue"],
        vec!["--device", "vda=/x", "--checkpointer", "remus"],
        vec!["--device", "vda=/x", "--on-device-failure", "shrug"],
        // No checkpointer: there is no silent default any more.
        vec!["--device", "vda=/x"],
        // sim acknowledges nothing real: refused without the explicit opt-in.
        vec!["--device", "vda=/x", "--checkpointer", "sim"],
        vec!["--device", "vda=/x", "--checkpointer", "sim:5"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ft-coordinator"))
            .args(&args)
            .arg("--state-file")
            .arg(&state)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
    }
    // Nothing was persisted by a refused start.
    assert!(!state.exists());
}

/// A `--device` socket that does not exist (a typo) shows in the log with its path and the OS
/// error, once rather than on every retry.
#[test]
fn connect_failures_are_logged_with_path_and_errno_rate_limited() {
    use std::io::Read;
    let dir = TempDir::new("cli-typo");
    let missing = dir.path().join("vdaa.ctl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ft-coordinator"))
        .arg("--device")
        .arg(format!("vda={}", missing.display()))
        .args(["--checkpointer", "exec:true"])
        .arg("--state-file")
        .arg(dir.path().join("s"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // About ten reconnect attempts (every 100 ms).
    std::thread::sleep(std::time::Duration::from_millis(1000));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(&*missing.to_string_lossy()))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("os error 2"), "{err}");
}
