// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared helpers of the coordinator tests.
#![allow(dead_code)]

pub mod fake_device;

use ft_common::coordinator::{
    CheckpointerSpec, Coordinator, CoordinatorConfig, CycleConfig, DeviceSpec, FailurePolicy,
    LinkConfig,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A fresh directory per test, removed on drop.
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ft-coord-{}-{}-{}",
            std::process::id(),
            name,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A coordinator config for `devices` (name, socket) in `dir`.
pub fn config(dir: &Path, devices: &[(&str, &Path)], ckpt: &str) -> CoordinatorConfig {
    CoordinatorConfig {
        devices: devices
            .iter()
            .map(|(n, p)| DeviceSpec {
                name: n.to_string(),
                socket: p.to_path_buf(),
            })
            .collect(),
        checkpointer: ckpt.parse::<CheckpointerSpec>().unwrap(),
        cycle: CycleConfig {
            interval: Some(Duration::from_millis(20)),
            min_interval: None,
            checkpoint_timeout: Duration::from_secs(5),
            on_device_failure: FailurePolicy::StopVm,
            max_pending: 64,
        },
        link: LinkConfig {
            call_timeout: Duration::from_secs(5),
            reconnect_interval: Duration::from_millis(20),
            status_interval: Duration::from_millis(200),
        },
        state_file: dir.join("coordinator.state"),
        api: Some(dir.join("api.sock")),
        metrics: None,
        claim: None,
    }
}

/// Waits until `f` holds, up to 10 s.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `ftctl --api PATH CMD`, the real binary; returns parsed JSON (or the raw text).
pub fn ftctl(api: &Path, cmd: &str) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftctl"))
        .arg("--api")
        .arg(api)
        .arg(cmd)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

pub fn status(c: &Coordinator) -> serde_json::Value {
    c.op(ft_common::coordinator::Op::Status).unwrap()
}
