// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Real checkpoints of a Linux guest: QEMU 7.2 (TCG, 320 MiB), vhost-user-blk-ft in hold mode,
//! ft-coordinator with `--checkpointer migrate:` (live mode) and an `ft-standby` process. The
//! guest writes its disk with fio (crc32c verify) while the coordinator checkpoints it.
//!
//! What is checked:
//! - the guest's fio write + verify passes: checkpointing (a full live migration every epoch,
//!   the daemon's dirty log in use) does not disturb the guest;
//! - checkpoints were published while fio had writes held (their SEALED records list held
//!   requests), each one is valid (length, CRC-32C) and restores into a new QEMU
//!   (`-S -incoming defer`, `migrate-incoming "exec:cat .../vmstate"`) that reaches `paused`;
//! - `ftctl status` and `ftctl metrics` report the per-checkpoint numbers (VM pause, capture
//!   time, bytes, standby fsync, newest durable epoch).
//!
//! Faults, refusals and "no COMMIT before DURABLE" are driven against QEMU without a guest in
//! ft-common/tests/checkpoint_migrate.rs and ft-common/tests/standby.rs.

use ft_common::coordinator::qmp::QmpClient;
use ft_common::standby::store::{CheckpointStore, MANIFEST, VMSTATE};
use ft_tests::guest::image::workspace_binary;
use ft_tests::guest::{Backend, BackendCommand, Guest, GuestConfig, GuestImage, ScratchDir};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MEM_MB: u32 = 320;
const DISK_SIZE: u64 = 64 << 20;
/// Checkpoints kept aside (hard links) and restored: each one is a full copy of guest RAM.
const KEEP: usize = 3;

/// One guest at a time: each is a busy TCG thread on a small shared machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn binary(package: &str, name: &str) -> PathBuf {
    workspace_binary(package, name).unwrap_or_else(|e| panic!("{name} binary: {e}"))
}

fn blk_daemon(s: &ScratchDir, name: &str, image: &Path, hold: bool) -> Backend {
    let sock = s.join(&format!("{name}.sock"));
    let mut args: Vec<OsString> = vec![
        "--socket".into(),
        sock.clone().into(),
        "--image".into(),
        image.into(),
    ];
    if hold {
        args.extend(["--ft".into(), "hold".into(), "--control".into()]);
        args.push(s.join(&format!("{name}.ctl")).into());
    }
    Backend::start(
        &BackendCommand::new(binary("vhost-user-blk-ft", "vhost-user-blk-ft"), args, sock),
        &s.join(&format!("{name}.log")),
        Duration::from_secs(10),
    )
    .expect("start vhost-user-blk-ft")
}

fn standby(s: &ScratchDir, store: &Path) -> Backend {
    let sock = s.join("standby.sock");
    // A killed standby leaves its socket file: the harness must wait for the new one.
    let _ = std::fs::remove_file(&sock);
    Backend::start(
        &BackendCommand::new(
            binary("ft-common", "ft-standby"),
            [
                OsString::from("--listen"),
                format!("unix:{}", sock.display()).into(),
                "--store".into(),
                store.into(),
            ],
            &sock,
        ),
        &s.join("standby.log"),
        Duration::from_secs(10),
    )
    .expect("start ft-standby")
}

/// ft-coordinator with the live migrate checkpointer on `qmp`, the block daemon `blk.ctl` and
/// the standby `standby.sock` of `s`; its API socket is `api.sock`.
fn coordinator(s: &ScratchDir, qmp: &Path) -> Backend {
    let api = s.join("api.sock");
    Backend::start(
        &BackendCommand::new(
            binary("ft-common", "ft-coordinator"),
            [
                OsString::from("--device"),
                format!("vda={}", s.join("blk.ctl").display()).into(),
                "--checkpointer".into(),
                format!(
                    "migrate:{},standby=unix:{}",
                    qmp.display(),
                    s.join("standby.sock").display()
                )
                .into(),
                "--interval-ms".into(),
                "500".into(),
                "--min-interval-ms".into(),
                "20".into(),
                "--checkpoint-timeout-ms".into(),
                "60000".into(),
                "--state-file".into(),
                s.join("coordinator.state").into(),
                "--api".into(),
                api.clone().into(),
            ],
            &api,
        ),
        &s.join("coordinator.log"),
        Duration::from_secs(10),
    )
    .expect("start ft-coordinator")
}

/// The fio guest of these tests (320 MiB, 256 KiB writes: each one waits for its checkpoint
/// in hold mode, so few large writes keep the run short while every checkpoint catches some
/// of them held) with a QMP socket.
fn fio_guest(
    image: &GuestImage,
    s: &ScratchDir,
    disk_sock: &Path,
) -> (GuestConfig, Guest, PathBuf) {
    let mut cfg = GuestConfig::fio_verify(image, s.path(), disk_sock, 16 << 20);
    cfg.mem_mb = MEM_MB;
    cfg.cmdline_extra.retain(|w| !w.starts_with("ft.bs="));
    cfg.cmdline_extra.push("ft.bs=256k".into());
    cfg.timeout = Duration::from_secs(600);
    let qmp = s.join("qmp.sock");
    let guest = Guest::start(&cfg.clone().with_qmp(&qmp)).expect("start guest");
    let t0 = Instant::now();
    while !qmp.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "QMP socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    (cfg, guest, qmp)
}

fn ftctl(api: &Path, cmd: &str) -> String {
    let out = Command::new(binary("ft-common", "ftctl"))
        .arg("--api")
        .arg(api)
        .arg(cmd)
        .output()
        .expect("run ftctl");
    assert!(out.status.success(), "ftctl {cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Hard-links every newly published checkpoint that holds blk writes into `kept/` (up to
/// [`KEEP`]), so it outlives the standby's pruning.
fn keeper(store: PathBuf, kept: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut seen = BTreeSet::new();
        let mut n = 0;
        while !stop.load(Ordering::Acquire) && n < KEEP {
            std::thread::sleep(Duration::from_millis(5));
            let Ok(s) = CheckpointStore::open(&store) else {
                continue;
            };
            for l in s.list().unwrap_or_default() {
                if !seen.insert(l.dir.clone()) {
                    continue;
                }
                let Ok(m) = CheckpointStore::read_manifest(&l.dir) else {
                    continue;
                };
                let held: usize = m
                    .transaction_states()
                    .unwrap_or_default()
                    .iter()
                    .flat_map(|d| d.queues.iter())
                    .map(|q| (q.held as usize).max(q.held_heads.len()))
                    .sum();
                if held == 0 || n >= KEEP {
                    continue;
                }
                let dst = kept.join(l.dir.file_name().unwrap());
                std::fs::create_dir_all(&dst).unwrap();
                let ok = std::fs::hard_link(l.dir.join(VMSTATE), dst.join(VMSTATE)).is_ok()
                    && std::fs::hard_link(l.dir.join(MANIFEST), dst.join(MANIFEST)).is_ok();
                if ok {
                    n += 1;
                } else {
                    // Pruned under our feet: a newer one is coming.
                    let _ = std::fs::remove_dir_all(&dst);
                }
            }
        }
    })
}

/// Restores `ckpt` into a new QEMU with the guest's virtual hardware and a fresh block
/// daemon on the same image; the VM must reach `paused`.
fn restore(s: &ScratchDir, base: &GuestConfig, ckpt: &Path, image: &Path, i: usize) {
    let p = CheckpointStore::validate(ckpt).expect("kept checkpoint is valid");
    let blk = blk_daemon(s, &format!("restore-blk{i}"), image, false);
    let qmp = s.join(&format!("restore{i}.qmp"));
    let mut cfg = base.clone();
    cfg.disks = vec![blk.socket().to_path_buf()];
    cfg.extra_args.clear();
    let cfg = cfg.with_qmp(&qmp);
    let mut args = cfg.qemu_args();
    args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    let mut q = Command::new(&cfg.qemu)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start restore QEMU");
    let t0 = Instant::now();
    while !qmp.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "restore QMP socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Loading runs in QEMU's main loop and blocks the monitor meanwhile.
    let mut c = QmpClient::connect(&qmp, Duration::from_secs(120)).expect("restore QMP");
    c.execute_with(
        "migrate-incoming",
        serde_json::json!({"uri": p.incoming_uri()}),
    )
    .expect("migrate-incoming");
    let status = loop {
        let st = c.execute("query-status").expect("query-status");
        let m = c.execute("query-migrate").expect("query-migrate");
        if m["status"] == "failed" {
            panic!("restore of epoch {} failed: {m}", p.epoch());
        }
        if st["status"] != "inmigrate" {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "restore timed out");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status["status"], "paused", "epoch {}: {status}", p.epoch());
    eprintln!(
        "restored epoch {} ({} bytes) in {:?}",
        p.epoch(),
        p.manifest.vmstate_len,
        t0.elapsed()
    );
    let _ = q.kill();
    let _ = q.wait();
    drop(blk);
}

#[test]
fn checkpoints_of_a_guest_running_fio_are_durable_and_restore() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = GuestImage::ensure().expect("guest image (tests/guest/build-guest.sh)");
    let s = ScratchDir::new("ckpt-qemu").expect("scratch dir");
    let disk = s.raw_image("disk.img", DISK_SIZE).expect("disk image");
    let store = s.join("store");
    let blk = blk_daemon(&s, "blk", &disk, true);
    let _standby = standby(&s, &store);

    let (base, guest, qmp) = fio_guest(&image, &s, blk.socket());
    let api = s.join("api.sock");
    let coordinator = coordinator(&s, &qmp);
    let stop = Arc::new(AtomicBool::new(false));
    let kept = s.join("kept");
    let keep = keeper(store.clone(), kept.clone(), stop.clone());

    let outcome = guest.wait().expect("guest run");
    let status: serde_json::Value = serde_json::from_str(&ftctl(&api, "status")).unwrap();
    let metrics = ftctl(&api, "metrics");
    stop.store(true, Ordering::Release);
    keep.join().unwrap();
    coordinator.stop(Duration::from_secs(10)).ok();
    assert!(outcome.passed(), "guest failed:\n{}", outcome.report(40));

    let cap = &status["checkpointer"]["capture"];
    eprintln!("capture status: {cap}");
    assert_eq!(cap["mode"], "live", "{cap}");
    let durable = cap["checkpoints_durable"].as_u64().unwrap();
    assert!(durable >= KEEP as u64, "{cap}");
    assert!(
        cap["vm_pause"]["count"].as_u64().unwrap() >= KEEP as u64,
        "{cap}"
    );
    assert!(cap["last"]["bytes"].as_u64().unwrap() > 16 << 20, "{cap}");
    assert!(cap["standby_fsync"]["count"].as_u64().unwrap() >= KEEP as u64);
    let newest = cap["newest_durable_epoch"].as_u64().unwrap();
    let committed = status["cycle"]["last_committed"].as_u64().unwrap();
    assert!(
        committed <= newest,
        "committed {committed} > durable {newest}"
    );
    for m in [
        "ft_checkpoint_vm_pause_seconds",
        "ft_checkpoint_capture_seconds",
        "ft_checkpoint_standby_fsync_seconds",
        "ft_checkpoint_bytes_total",
        "ft_checkpoint_newest_durable_epoch",
    ] {
        assert!(metrics.contains(m), "metrics lack {m}");
    }
    // The store's newest checkpoint is valid and not older than anything committed.
    let p = CheckpointStore::open(&store)
        .unwrap()
        .newest_valid()
        .unwrap()
        .expect("a published checkpoint");
    assert!(p.epoch().0 >= committed);

    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&kept)
        .expect("kept checkpoints")
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert_eq!(
        dirs.len(),
        KEEP,
        "checkpoints taken while fio had writes held"
    );
    for (i, d) in dirs.iter().enumerate() {
        restore(&s, &base, d, &disk, i);
    }
}

fn status(api: &Path) -> serde_json::Value {
    serde_json::from_str(&ftctl(api, "status")).expect("status JSON")
}

fn image_hash(path: &Path) -> u32 {
    crc32c::crc32c(&std::fs::read(path).expect("read image"))
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The standby dies in the middle of a checkpoint's stream while the guest's writes are held:
/// the published checkpoint stays valid, nothing of the interrupted epoch is committed, the
/// image does not change and the daemon keeps holding; a restarted standby (same store) lets
/// the next cut commit everything and the guest's fio verify passes.
#[test]
fn a_standby_killed_mid_stream_acknowledges_nothing_and_the_next_cut_retries() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = GuestImage::ensure().expect("guest image (tests/guest/build-guest.sh)");
    let s = ScratchDir::new("ckpt-kill").expect("scratch dir");
    let disk = s.raw_image("disk.img", DISK_SIZE).expect("disk image");
    let store = s.join("store");
    let blk = blk_daemon(&s, "blk", &disk, true);
    let sb = standby(&s, &store);
    let (_cfg, guest, qmp) = fio_guest(&image, &s, blk.socket());
    let api = s.join("api.sock");
    let coordinator = coordinator(&s, &qmp);
    assert!(
        guest.wait_for_stage("fio-write-start"),
        "guest never started fio"
    );
    let incoming = || -> u64 {
        std::fs::read_dir(&store)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with(".incoming"))
                    .filter_map(|e| std::fs::metadata(e.path().join(VMSTATE)).ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    // A checkpoint with held writes is published, and the next one is streaming.
    wait_until("a published checkpoint while fio writes", 120, || {
        status(&api)["checkpointer"]["capture"]["checkpoints_durable"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    });
    wait_until("a stream in progress", 120, || incoming() > 8 << 20);
    sb.kill().expect("kill ft-standby");
    let before = CheckpointStore::open(&store)
        .unwrap()
        .newest_valid()
        .unwrap()
        .expect("published checkpoint survives");
    // Let the commit of the last acknowledged epoch (if running) finish, then freeze. (The
    // store may hold a newer one than was acknowledged: published, DURABLE never sent.)
    let mut durable = 0;
    wait_until("commits settled", 60, || {
        let st = status(&api);
        durable = st["checkpointer"]["capture"]["newest_durable_epoch"]
            .as_u64()
            .unwrap_or(0);
        st["cycle"]["commit_in_flight"].is_null()
            && st["cycle"]["last_committed"].as_u64() == Some(durable)
    });
    assert!(before.epoch().0 >= durable);
    let h0 = image_hash(&disk);
    let st0 = status(&api);
    std::thread::sleep(Duration::from_secs(3));
    let st1 = status(&api);
    assert_eq!(
        image_hash(&disk),
        h0,
        "image changed with no durable checkpoint"
    );
    assert_eq!(
        st1["cycle"]["last_committed"],
        st0["cycle"]["last_committed"]
    );
    assert_eq!(
        st1["checkpointer"]["capture"]["newest_durable_epoch"].as_u64(),
        Some(durable)
    );
    let held = st1["devices"][0]["held_requests"].as_u64().unwrap_or(0);
    assert!(held > 0, "the daemon holds the guest's writes: {st1}");
    assert!(
        st1["cycle"]["checkpointer_last_error"].is_string(),
        "error visible: {st1}"
    );
    let after = CheckpointStore::open(&store)
        .unwrap()
        .newest_valid()
        .unwrap()
        .unwrap();
    assert_eq!(after.epoch(), before.epoch(), "published checkpoint intact");

    // The standby comes back on the same store: the retries commit everything held.
    let _sb = standby(&s, &store);
    let outcome = guest.wait().expect("guest run");
    let st = status(&api);
    coordinator.stop(Duration::from_secs(10)).ok();
    assert!(outcome.passed(), "guest failed:\n{}", outcome.report(40));
    assert!(
        st["cycle"]["last_committed"].as_u64().unwrap() > durable,
        "{st}"
    );
}
