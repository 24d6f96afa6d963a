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
