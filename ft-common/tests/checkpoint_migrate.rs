// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `migrate:` checkpointer against a real QEMU 7.2 (`-accel tcg`, 32 MiB, no guest disk:
//! the vCPU runs the BIOS) and a real `ft-standby` process, with fake device daemons whose
//! oracles check every SEAL and COMMIT:
//! - at SEAL the VM is paused (second QMP monitor), in both capture modes;
//! - at COMMIT E the standby's store already holds checkpoint E, durable and valid, even
//!   with a slow standby disk (`--fsync-delay-ms`): no commit before the acknowledgement;
//! - every published checkpoint restores into a new QEMU (`-incoming defer`) that reaches
//!   `paused`;
//! - faults (standby down, killed mid-stream, QEMU gone) acknowledge nothing, keep the output
//!   held, show the error in `ftctl status`, and the next cut retries; the published
//!   checkpoint stays valid throughout.
//!
//! The same checkpointer with a Linux guest running fio and real daemons:
//! tests/tests/checkpoint_qemu.rs.

mod common;

use common::fake_device::{FakeDevice, Hooks, TestDevice};
use common::*;
use ft_common::control::message::{DeviceKind, Request};
use ft_common::coordinator::qmp::QmpClient;
use ft_common::coordinator::Coordinator;
use ft_common::epoch::Epoch;
use ft_common::standby::CheckpointStore;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";

/// One QEMU or standby at a time: each capture copies the whole VM on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Guest RAM: a file of random bytes, so the migration stream is as big as the RAM (QEMU
/// sends zero pages as a flag only; BIOS-only RAM would make a ~0.6 MB stream).
fn ram_file(dir: &Path) -> PathBuf {
    let p = dir.join("ram");
    if !p.exists() {
        let mut data = vec![0u8; 32 << 20];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(&p, data).unwrap();
    }
    p
}

fn qemu_args(dir: &Path, name: &str) -> Vec<String> {
    let mut a: Vec<String> = ["-accel", "tcg", "-m", "32", "-nodefaults"]
        .iter()
        .chain(&["-display", "none", "-serial", "none", "-monitor", "none"])
        .map(|s| s.to_string())
        .collect();
    a.push("-object".into());
    if name == "qmp" {
        a.push(format!(
            "memory-backend-file,id=mem,size=32M,share=on,mem-path={}",
            ram_file(dir).display()
        ));
    } else {
        // A restore target: the same RAM block id and size, contents from the stream.
        a.push("memory-backend-memfd,id=mem,size=32M,share=on".into());
    }
    a.push("-machine".into());
    a.push("pc,memory-backend=mem".into());
    a.push("-qmp".into());
    a.push(format!(
        "unix:{},server=on,wait=off",
        dir.join(format!("{name}.qmp")).display()
    ));
    a
}

fn start_qemu(dir: &Path) -> Proc {
    let mut args = qemu_args(dir, "qmp");
    args.push("-qmp".into());
    args.push(format!(
        "unix:{},server=on,wait=off",
        dir.join("oracle.sock").display()
    ));
    let p = spawn(QEMU, &args);
    wait_for("QMP sockets", || {
        dir.join("qmp.qmp").exists() && dir.join("oracle.sock").exists()
    });
    p
}

fn spawn(prog: &str, args: &[String]) -> Proc {
    match Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => Proc(c),
        Err(e) => panic!("cannot run {prog}: {e} (run scripts/setup.sh)"),
    }
}

fn start_standby(dir: &Path, store: &Path, fsync_delay_ms: u64) -> Proc {
    start_standby_on(&unix_addr(dir), store, fsync_delay_ms)
}

fn unix_addr(dir: &Path) -> String {
    format!("unix:{}", dir.join("standby.sock").display())
}

/// `ft-standby --listen addr`, once it accepts connections.
fn start_standby_on(addr: &str, store: &Path, fsync_delay_ms: u64) -> Proc {
    if let Some(p) = addr.strip_prefix("unix:") {
        let _ = std::fs::remove_file(p);
    }
    let p = spawn(
        env!("CARGO_BIN_EXE_ft-standby"),
        &[
            "--listen".into(),
            addr.to_string(),
            "--store".into(),
            store.display().to_string(),
            "--fsync-delay-ms".into(),
            fsync_delay_ms.to_string(),
        ],
    );
    let a: ft_common::standby::StandbyAddr = addr.parse().unwrap();
    wait_for("standby listening", || {
        a.connect(Duration::from_secs(1)).is_ok()
    });
    p
}

fn migrate_spec(dir: &Path, extra: &str) -> String {
    migrate_spec_to(dir, &unix_addr(dir), extra)
}

fn migrate_spec_to(dir: &Path, standby: &str, extra: &str) -> String {
    format!(
        "migrate:{},standby={standby}{extra}",
        dir.join("qmp.qmp").display()
    )
}

/// Oracle for the fake device: at SEAL the VM is paused; at COMMIT E the store holds a valid
/// checkpoint of epoch >= E.
fn oracle(dev: &FakeDevice, dir: &Path, store: PathBuf) {
    let q = QmpClient::connect(dir.join("oracle.sock"), Duration::from_secs(10)).unwrap();
    let q = Mutex::new(q);
    dev.set_hooks(Hooks {
        fail_commits: None,
        check: Some(Box::new(move |r| match r {
            Request::Seal { epoch, .. } => match q.lock().unwrap().running() {
                Ok(false) => None,
                Ok(true) => Some(format!("SEAL {epoch} while QEMU runs")),
                Err(e) => Some(format!("oracle: {e}")),
            },
            Request::Commit { epoch, .. } => {
                let newest = CheckpointStore::open(&store)
                    .ok()
                    .and_then(|s| s.newest_valid().ok().flatten());
                match newest {
                    Some(p) if p.epoch() >= *epoch => None,
                    other => Some(format!(
                        "COMMIT {epoch} but the store's newest valid checkpoint is {:?}",
                        other.map(|p| p.epoch())
                    )),
                }
            }
            _ => None,
        })),
    });
}

fn capture_status(c: &Coordinator) -> serde_json::Value {
    status(c)["checkpointer"]["capture"].clone()
}

fn wait_long(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Restores `vmstate` into a fresh QEMU with the same machine; it must reach `paused`.
fn restore(dir: &Path, p: &ft_common::standby::PublishedCheckpoint) {
    let rdir = dir.join(format!("restore-{}", p.epoch()));
    std::fs::create_dir_all(&rdir).unwrap();
    let mut args = qemu_args(&rdir, "r");
    args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    let _q = spawn(QEMU, &args);
    wait_for("restore QMP", || rdir.join("r.qmp").exists());
    // Loading blocks QEMU's monitor: allow for a slow machine.
    let mut c = QmpClient::connect(rdir.join("r.qmp"), Duration::from_secs(60)).unwrap();
    let t0 = Instant::now();
    c.execute_with("migrate-incoming", json!({"uri": p.incoming_uri()}))
        .unwrap();
    let mut last = json!(null);
    wait_long("restored VM paused", 60, || {
        last = c.execute("query-status").unwrap();
        last["status"] == "paused"
    });
    let m = c.execute("query-migrate").unwrap();
    assert_eq!(m["status"], "completed", "{m}");
    eprintln!("restored epoch {} in {:?}", p.epoch(), t0.elapsed());
}

/// The paused-mode test streams over TCP (QEMU's `tcp:` migration URI, a port from this
/// project's test range), the live one over a unix socket.
fn run_mode(mode: &str) {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = TempDir::new(&format!("migrate-{mode}"));
    let store = dir.path().join("store");
    let _qemu = start_qemu(dir.path());
    // A slow standby disk: every acknowledgement waits 300 ms more.
    let addr = if mode == "paused" {
        "tcp:127.0.0.1:22011".to_string()
    } else {
        unix_addr(dir.path())
    };
    let _standby = start_standby_on(&addr, &store, 300);
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    oracle(&a, dir.path(), store.clone());
    let mut cfg = config(
        dir.path(),
        &[("vda", &a.path)],
        &migrate_spec_to(dir.path(), &addr, &format!(",mode={mode}")),
    );
    cfg.cycle.interval = Some(Duration::from_millis(50));
    cfg.cycle.checkpoint_timeout = Duration::from_secs(30);
    let c = Coordinator::start(cfg).unwrap();
    for i in 0..3 {
        a.submit(i, 4096);
        wait_long("release", 60, || a.released().len() as u64 > i);
    }
    let st = status(&c);
    let cap = capture_status(&c);
    c.shutdown();
    assert!(a.violations().is_empty(), "{:?}", a.violations());
    assert_eq!(cap["mode"], mode);
    assert_eq!(cap["standby"], addr.as_str());
    assert!(cap["checkpoints_durable"].as_u64().unwrap() >= 3, "{cap}");
    assert!(cap["vm_pause"]["count"].as_u64().unwrap() >= 3, "{cap}");
    assert!(cap["last"]["bytes"].as_u64().unwrap() > 30 << 20, "{cap}");
    assert!(
        cap["standby_fsync"]["p50_us"].as_u64().unwrap() > 0,
        "{cap}"
    );
    // The slow disk is in every acknowledgement (a lower bound: never timing-flaky).
    let s2c = st["latency"]["seal_to_commit"]["p50_us"].as_u64().unwrap();
    assert!(
        s2c >= 300_000,
        "seal to commit {s2c} us with a 300 ms fsync delay"
    );
    let newest = CheckpointStore::open(&store)
        .unwrap()
        .newest_valid()
        .unwrap()
        .unwrap();
    // The store may be newer: checkpoints went on between the status read and the shutdown.
    assert!(
        cap["newest_durable_epoch"].as_u64().unwrap() <= newest.epoch().0,
        "{cap}"
    );
    assert_eq!(newest.manifest.mode.as_deref(), Some(mode));
    assert_eq!(newest.devices().unwrap()[0].device, "vda");
    restore(dir.path(), &newest);
    // The coordinator left the VM running (drop the oracle's session first: QEMU serves one
    // client per monitor).
    a.set_hooks(Hooks::default());
    let mut q = QmpClient::connect(dir.path().join("oracle.sock"), Duration::from_secs(10));
    let q = q.as_mut().unwrap();
    assert!(q.running().unwrap(), "coordinator left the VM paused");
}

#[test]
fn live_checkpoints_are_durable_before_commit_and_restore() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    run_mode("live");
}

#[test]
fn paused_checkpoints_are_durable_before_commit_and_restore() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    run_mode("paused");
}

/// Commits seen by the fake device so far.
fn committed(a: &FakeDevice) -> Vec<Epoch> {
    a.commit_epochs()
}

#[test]
fn faults_hold_output_show_the_error_and_retry() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = TempDir::new("migrate-faults");
    let store = dir.path().join("store");
    let qemu = start_qemu(dir.path());
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    oracle(&a, dir.path(), store.clone());
    // 24 MB/s: a 32 MiB VM takes more than a second to copy, time to cut the stream.
    let mut cfg = config(
        dir.path(),
        &[("vda", &a.path)],
        &migrate_spec(dir.path(), ",max-bandwidth=24000000,timeout-ms=20000"),
    );
    cfg.cycle.interval = Some(Duration::from_millis(50));
    cfg.cycle.checkpoint_timeout = Duration::from_secs(30);
    let api = cfg.api.clone().unwrap();
    let c = Coordinator::start(cfg).unwrap();

    // 1. No standby: nothing acknowledged, output held, the error visible.
    a.submit(1, 4096);
    wait_long("standby unreachable reported", 30, || {
        ftctl(&api, "status").unwrap()["checkpointer"]["capture"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unreachable"))
    });
    assert!(committed(&a).is_empty());
    assert!(a.released().is_empty());
    let st = ftctl(&api, "status").unwrap();
    assert!(
        st["cycle"]["checkpointer_last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unreachable")),
        "{st}"
    );
    assert!(st["cycle"]["halted"].is_null(), "{st}");

    // 2. The standby comes up: the next cut succeeds and releases the held output.
    let mut standby = start_standby(dir.path(), &store, 0);
    wait_long("first release", 60, || !a.released().is_empty());
    let published = CheckpointStore::open(&store)
        .unwrap()
        .newest_valid()
        .unwrap()
        .unwrap();

    // 3. The standby dies mid-stream.
    a.submit(2, 4096);
    let incoming_len = || -> u64 {
        std::fs::read_dir(&store)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".incoming"))
            .filter_map(|e| std::fs::metadata(e.path().join("vmstate")).ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0)
    };
    wait_long("a stream in progress", 60, || incoming_len() > 1 << 20);
    let cap_before = capture_status(&c);
    let _ = standby.0.kill();
    let _ = standby.0.wait();
    let before = committed(&a);
    let failures = |cap: &serde_json::Value| {
        cap["checkpoints_failed"].as_u64().unwrap() + cap["cuts_abandoned"].as_u64().unwrap()
    };
    wait_long("failure reported", 60, || {
        failures(&capture_status(&c)) > failures(&cap_before)
    });
    // Nothing of the interrupted epoch was committed, output 2 is held.
    assert_eq!(committed(&a), before);
    assert!(!a.released().iter().any(|(id, _)| *id == 2));
    let s = CheckpointStore::open(&store).unwrap();
    let still = s.newest_valid().unwrap().unwrap();
    assert!(still.epoch() >= published.epoch());
    let newest_committed = before.iter().max().copied().unwrap_or(Epoch(0));
    assert!(still.epoch() >= newest_committed);
    let st = ftctl(&api, "status").unwrap();
    assert!(st["cycle"]["checkpointer_last_error"].is_string(), "{st}");

    // 4. The standby restarts on the same store: the retries succeed.
    let standby = start_standby(dir.path(), &store, 0);
    wait_long("release after restart", 60, || {
        a.released().iter().any(|(id, _)| *id == 2)
    });

    // 5. QEMU gone: cuts are abandoned and retried, the error is visible, nothing commits.
    drop(qemu);
    a.submit(3, 4096);
    wait_long("QEMU gone reported", 30, || {
        ftctl(&api, "status").unwrap()["cycle"]["checkpointer_last_error"]
            .as_str()
            .is_some_and(|e| e.contains("QMP"))
    });
    let n = committed(&a).len();
    let abandoned = capture_status(&c)["cuts_abandoned"].as_u64().unwrap();
    wait_long("retries", 30, || {
        capture_status(&c)["cuts_abandoned"].as_u64().unwrap() > abandoned + 2
    });
    assert_eq!(committed(&a).len(), n);
    assert!(!a.released().iter().any(|(id, _)| *id == 3));
    c.shutdown();
    drop(standby);
    assert!(a.violations().is_empty(), "{:?}", a.violations());
    let p = CheckpointStore::open(&store)
        .unwrap()
        .newest_valid()
        .unwrap()
        .unwrap();
    assert!(p.epoch() >= *committed(&a).iter().max().unwrap());
}

/// A tmpfs of `mb` MiB at `path`, unmounted on drop.
struct Tmpfs(PathBuf);
impl Tmpfs {
    fn mount(path: &Path, mb: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(path.to_path_buf()))
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_standby_disk_fails_the_checkpoint_and_keeps_the_published_one() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("migrate-enospc");
    let store = dir.path().join("store");
    // Room for one checkpoint of the 32 MiB VM, not for a second one beside it.
    let Some(_fs) = Tmpfs::mount(&store, 48) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cannot mount a tmpfs (needs root)"
        );
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let _qemu = start_qemu(dir.path());
    let _standby = start_standby(dir.path(), &store, 0);
    let a = FakeDevice::start("vda", dir.path().join("vda.ctl"), DeviceKind::Blk);
    oracle(&a, dir.path(), store.clone());
    let mut cfg = config(
        dir.path(),
        &[("vda", &a.path)],
        &migrate_spec(dir.path(), ""),
    );
    cfg.cycle.interval = Some(Duration::from_millis(50));
    cfg.cycle.checkpoint_timeout = Duration::from_secs(30);
    let c = Coordinator::start(cfg).unwrap();
    a.submit(1, 4096);
    wait_long("first release", 60, || !a.released().is_empty());
    let first = CheckpointStore::open(&store)
        .unwrap()
        .newest_valid()
        .unwrap()
        .unwrap();
    a.submit(2, 4096);
    wait_long("disk full reported", 60, || {
        capture_status(&c)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device"))
    });
    let st = status(&c);
    assert!(
        st["cycle"]["checkpointer_last_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "{st}"
    );
    assert!(st["cycle"]["halted"].is_null(), "{st}");
    // Output 2 held, nothing committed past the published checkpoint, which is intact.
    assert!(!a.released().iter().any(|(id, _)| *id == 2));
    let s = CheckpointStore::open(&store).unwrap();
    let p = s.newest_valid().unwrap().unwrap();
    assert_eq!(p.epoch(), first.epoch());
    assert!(committed(&a).iter().all(|e| *e <= p.epoch()));
    c.shutdown();
    assert!(a.violations().is_empty(), "{:?}", a.violations());
}
