// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-level block tests: a Linux guest under QEMU (TCG) runs fio with crc32c verification on a
//! vhost-user-blk disk. The backend is qemu-storage-daemon, the reference our vhost-user-blk-ft
//! daemon must match; swapping in another backend only changes the `BackendCommand`.
//!
//! Prerequisites are set up on demand (scripts/setup.sh, tests/guest/build-guest.sh); if that
//! fails the tests fail. Run with `--nocapture` to see boot and fio timings.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ft_tests::guest::{
    nonzero_blocks, Backend, BackendCommand, Guest, GuestConfig, GuestImage, GuestResult,
    ScratchDir,
};

const DISK_SIZE: u64 = 256 << 20;
const FIO_SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;

/// One guest at a time: each is a busy TCG thread on a small shared machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn guest_image() -> GuestImage {
    let t = Instant::now();
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("guest prerequisites: {e}"));
    println!("guest image ready in {:.1} s", t.elapsed().as_secs_f64());
    image
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1} s", d.as_secs_f64()))
        .unwrap_or_else(|| "n/a".into())
}

#[test]
fn fio_verify_on_qemu_storage_daemon() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = guest_image();
    let scratch = ScratchDir::new("guest-blk").expect("scratch dir");
    let disk = scratch
        .raw_image("disk.raw", DISK_SIZE)
        .expect("disk image");
    let backend = Backend::start(
        &BackendCommand::qemu_storage_daemon(&disk, &scratch.join("blk.sock")),
        &scratch.join("backend.log"),
        Duration::from_secs(10),
    )
    .expect("start qemu-storage-daemon");

    let config = GuestConfig::fio_verify(&image, scratch.path(), backend.socket(), FIO_SIZE);
    let outcome = Guest::start(&config)
        .expect("start QEMU")
        .wait()
        .expect("run guest");
    println!(
        "QEMU start to fio start {}, fio write+verify {}, fio verify-only {}, total {:.1} s",
        secs(outcome.stage("fio-write-start")),
        secs(outcome.between("fio-write-start", "fio-write-done")),
        secs(outcome.between("fio-verify-start", "fio-verify-done")),
        outcome.elapsed.as_secs_f64(),
    );
    assert!(outcome.passed(), "{}", outcome.report(60));
    // A PASS must mean both fio passes really ran.
    for stage in ["fio-write-done", "fio-verify-done"] {
        assert!(
            outcome.stage(stage).is_some(),
            "no {stage}\n{}",
            outcome.report(60)
        );
    }
    backend
        .stop(Duration::from_secs(5))
        .expect("stop qemu-storage-daemon");

    // The data reached the backend's file: fio's random map writes every 4 KiB block of the
    // first 64 MiB exactly once (each with a non-zero verify header), and nothing beyond.
    let (inside, outside) = nonzero_blocks(&disk, FIO_SIZE).expect("scan disk image");
    assert_eq!(inside, FIO_SIZE / BLOCK as u64, "blocks written by fio");
    assert_eq!(outside, 0, "blocks written beyond fio's area");
}

/// The verify pass must catch data that is not there: verifying a blank disk fails.
#[test]
fn fio_verify_fails_on_blank_disk() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = guest_image();
    let scratch = ScratchDir::new("guest-blk-neg").expect("scratch dir");
    let disk = scratch
        .raw_image("disk.raw", DISK_SIZE)
        .expect("disk image");
    let backend = Backend::start(
        &BackendCommand::qemu_storage_daemon(&disk, &scratch.join("blk.sock")),
        &scratch.join("backend.log"),
        Duration::from_secs(10),
    )
    .expect("start qemu-storage-daemon");

    let mut config = GuestConfig::new(&image, "fio-verify", scratch.path());
    config.disks.push(backend.socket().to_path_buf());
    config.cmdline_extra = vec!["ft.size=4M".into(), "ft.passes=verify".into()];
    let outcome = Guest::start(&config)
        .expect("start QEMU")
        .wait()
        .expect("run guest");
    println!(
        "negative run: {:?} after {:.1} s",
        outcome.result,
        outcome.elapsed.as_secs_f64()
    );
    assert!(
        matches!(&outcome.result, GuestResult::Fail(reason) if reason.contains("verify-only pass failed")),
        "expected a fio verify failure\n{}",
        outcome.report(40)
    );
    // Failed because the data was wrong, not because fio could not run.
    assert!(
        outcome.serial.contains("verify: bad magic header"),
        "{}",
        outcome.report(40)
    );
    assert!(outcome.stage("fio-verify-start").is_some());
    assert!(outcome.stage("fio-verify-done").is_none());
    drop(backend);
}

/// A QEMU that cannot reach its backend must come back as a failure with QEMU's reason.
#[test]
fn missing_backend_is_reported_as_failure() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = guest_image();
    let scratch = ScratchDir::new("guest-blk-nobackend").expect("scratch dir");
    let mut config = GuestConfig::new(&image, "fio-verify", scratch.path());
    config.disks.push(scratch.join("nobody-listens.sock"));
    config.timeout = Duration::from_secs(60);
    let outcome = Guest::start(&config)
        .expect("start QEMU")
        .wait()
        .expect("run guest");
    assert!(
        matches!(outcome.result, GuestResult::Exited(_)),
        "{}",
        outcome.report(10)
    );
    assert!(
        outcome.qemu_stderr.contains("nobody-listens.sock"),
        "{}",
        outcome.report(10)
    );
}

/// A guest that does not finish in time is killed and reported as a timeout.
#[test]
fn timeout_kills_qemu() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = guest_image();
    let scratch = ScratchDir::new("guest-timeout").expect("scratch dir");
    // Without a disk fio-verify waits 20 s for one: it cannot finish within the timeout.
    let mut config = GuestConfig::new(&image, "fio-verify", scratch.path());
    config.timeout = Duration::from_secs(3);
    let guest = Guest::start(&config).expect("start QEMU");
    let pid = guest.pid().expect("QEMU pid");
    let outcome = guest.wait().expect("run guest");
    assert_eq!(
        outcome.result,
        GuestResult::Timeout,
        "{}",
        outcome.report(10)
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} still exists"
    );
}
