// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The qmp checkpointer against a real QEMU (7.2, `-accel tcg`, no guest disk: the vCPU runs
//! the BIOS). A second QMP monitor is the oracle: at every SEAL the VM must be paused.
//! Fails when qemu-system-x86_64 is not installed (scripts/setup.sh installs it).

mod common;

use common::fake_device::{FakeDevice, Hooks, TestDevice};
use common::*;
use ft_common::control::message::{DeviceKind, Request};
use ft_common::coordinator::qmp::QmpClient;
use ft_common::coordinator::Coordinator;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

const QEMU: &str = "qemu-system-x86_64";

struct Qemu(Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qemu(dir: &Path) -> Qemu {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "tcg", "-machine", "pc", "-m", "32", "-nodefaults"])
        .args(["-display", "none", "-serial", "none", "-monitor", "none"])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("qmp.sock").display()
        ))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("oracle.sock").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match cmd.spawn() {
        Ok(c) => Qemu(c),
        Err(e) => panic!("cannot run {QEMU}: {e} (run scripts/setup.sh)"),
    }
}

#[test]
fn real_qemu_is_paused_at_every_seal_and_running_after() {
    let dir = TempDir::new("qemu");
    let _qemu = start_qemu(dir.path());
    wait_for("QMP sockets", || {
        dir.path().join("qmp.sock").exists() && dir.path().join("oracle.sock").exists()
    });
    let oracle = QmpClient::connect(dir.path().join("oracle.sock"), Duration::from_secs(10))
        .expect("QMP oracle");
    let oracle = Mutex::new(oracle);
    assert!(
        oracle.lock().unwrap().running().unwrap(),
        "VM should start running"
    );
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    a.set_hooks(Hooks {
        fail_commits: None,
        check: Some(Box::new(move |r| match r {
            Request::Seal { epoch, .. } => match oracle.lock().unwrap().running() {
                Ok(false) => None,
                Ok(true) => Some(format!("SEAL {epoch} while QEMU runs")),
                Err(e) => Some(format!("oracle: {e}")),
            },
            _ => None,
        })),
    });
    let mut cfg = config(
        dir.path(),
        &[("vda", &a.path)],
        &format!("qmp:{}", dir.path().join("qmp.sock").display()),
    );
    cfg.cycle.interval = Some(Duration::from_millis(30));
    let c = Coordinator::start(cfg).unwrap();
    for i in 0..3 {
        a.submit(i, 4096);
        wait_for("release", || a.released().len() as u64 > i);
    }
    c.shutdown();
    assert!(a.violations().is_empty(), "{:?}", a.violations());
    assert!(a.seal_epochs().len() >= 3);
    // Drop the oracle connection (QEMU serves one client per monitor), then ask again.
    a.set_hooks(Hooks::default());
    let q = QmpClient::connect(dir.path().join("oracle.sock"), Duration::from_secs(10));
    assert!(
        q.unwrap().running().unwrap(),
        "coordinator left the VM paused"
    );
}
