// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A real Linux guest (QEMU TCG, virtio-blk-pci over vhost-user, 2 queues) runs fio with
//! crc32c verification on a disk served by the vhost-user-blk-ft binary; the image file is then
//! checked block by block. Uses the shared guest harness (`ft_tests::guest`).

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use ft_tests::guest::{
    nonzero_blocks, Backend, BackendCommand, Guest, GuestConfig, GuestImage, QemuFlavor, ScratchDir,
};

const DISK_SIZE: u64 = 128 << 20;
const FIO_SIZE: u64 = 32 << 20;
const BLOCK: usize = 4096;

fn daemon(disk: &Path, sock: &Path) -> BackendCommand {
    daemon_with(disk, sock, &[])
}

fn daemon_with(disk: &Path, sock: &Path, extra: &[&OsStr]) -> BackendCommand {
    let mut args: Vec<&OsStr> = vec![
        "--socket".as_ref(),
        sock.as_os_str(),
        "--image".as_ref(),
        disk.as_os_str(),
        "--queues".as_ref(),
        "2".as_ref(),
    ];
    args.extend_from_slice(extra);
    BackendCommand::new(env!("CARGO_BIN_EXE_vhost-user-blk-ft"), args, sock)
}

/// How the first daemon goes away mid-I/O.
enum Restart {
    /// SIGTERM: the daemon finishes what it has in flight and exits.
    Term,
    /// SIGKILL of a daemon in `--ft hold` that was never told to commit: every write fio has
    /// outstanding is held (in flight, not written) when the process dies. QEMU hands the
    /// inflight region to the new daemon (`--ft off`), which must resubmit them.
    Kill,
}

/// The daemon is restarted (SIGTERM, then a new process on the same socket) while the guest's
/// fio write pass runs; QEMU reconnects and the guest never sees an error or lost data.
#[test]
fn guest_survives_daemon_restart_mid_io() {
    restart_mid_io(Restart::Term, QemuFlavor::Host);
}

/// The daemon is killed with SIGKILL while it holds requests and is restarted: QEMU
/// (`reconnect=1`) reconnects, the new daemon resubmits the held requests from the inflight
/// region, and fio's verify pass still passes.
#[test]
fn guest_survives_daemon_kill9_mid_io() {
    restart_mid_io(Restart::Kill, QemuFlavor::Host);
}

/// The same on QEMU 10, which runs every ring with 1024 entries (whatever `queue-size` says),
/// asks GET_INFLIGHT_FD for 128, reconnects with `reconnect-ms` and sends RESET_DEVICE when
/// the guest driver resets the device. Covers, on today's QEMU: fio verify on 2 queues, kill -9
/// and reconnect with resubmission from the inflight region, RESET_DEVICE.
#[test]
fn guest_survives_daemon_kill9_mid_io_qemu10() {
    let (first, second) = restart_mid_io(Restart::Kill, QemuFlavor::Qemu10);
    assert!(
        first.contains("vhost-user: RESET_DEVICE"),
        "QEMU 10 resets the device when the guest driver probes it:\n{first}"
    );
    for log in [&first, &second] {
        assert!(!log.contains("not tracked"), "{log}");
        assert!(!log.contains("cannot start"), "{log}");
    }
}

/// Returns both daemons' logs.
fn restart_mid_io(how: Restart, flavor: QemuFlavor) -> (String, String) {
    flavor
        .ensure()
        .unwrap_or_else(|e| panic!("{flavor:?} prerequisites: {e}"));
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("guest prerequisites: {e}"));
    let scratch = ScratchDir::new("blkft-restart").expect("scratch dir");
    let disk = scratch
        .raw_image("disk.raw", DISK_SIZE)
        .expect("disk image");
    let sock = scratch.join("blk.sock");
    let cmd = daemon(&disk, &sock);
    let control = scratch.join("control.sock");
    let first_cmd = match how {
        Restart::Term => daemon(&disk, &sock),
        Restart::Kill => daemon_with(
            &disk,
            &sock,
            &[
                "--ft".as_ref(),
                "hold".as_ref(),
                "--control".as_ref(),
                control.as_os_str(),
            ],
        ),
    };
    let log1 = scratch.join("backend1.log");
    let first = Backend::start(&first_cmd, &log1, Duration::from_secs(10)).expect("start daemon");

    let mut config = GuestConfig::fio_verify(&image, scratch.path(), &sock, FIO_SIZE).on(flavor);
    config.disk_queues = 2;
    config.reconnect_secs = Some(1);
    let guest = Guest::start(&config).expect("start QEMU");
    assert!(guest.wait_for_stage("fio-write-start"), "fio never started");
    std::thread::sleep(Duration::from_secs(3));
    let text1;
    match how {
        Restart::Term => {
            let status = first.stop(Duration::from_secs(5)).expect("stop daemon");
            text1 = std::fs::read_to_string(&log1).unwrap_or_default();
            assert!(status.success(), "daemon exit {status}\n{text1}");
        }
        Restart::Kill => {
            let status = first.kill().expect("kill daemon");
            text1 = std::fs::read_to_string(&log1).unwrap_or_default();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{text1}");
            // Output commit: nothing held by the killed daemon reached the image.
            assert_eq!(
                nonzero_blocks(&disk, FIO_SIZE).expect("scan disk image"),
                (0, 0),
                "held writes on disk"
            );
        }
    }
    let log2 = scratch.join("backend2.log");
    let second = Backend::start(&cmd, &log2, Duration::from_secs(10)).expect("restart daemon");
    let outcome = guest.wait().expect("run guest");
    let text2 = std::fs::read_to_string(&log2).unwrap_or_default();
    println!("first daemon: {}", text1.lines().last().unwrap_or(""));
    let resubmitted: Vec<&str> = text2
        .lines()
        .filter(|l| l.contains("resubmitting"))
        .collect();
    println!("second daemon: {resubmitted:?}");
    if matches!(how, Restart::Kill) {
        assert!(!resubmitted.is_empty(), "no resubmission\n{text2}");
    }
    assert!(
        outcome.passed(),
        "{}\n--- daemon 2 ---\n{text2}",
        outcome.report(60)
    );
    for stage in ["fio-write-done", "fio-verify-done"] {
        assert!(
            outcome.stage(stage).is_some(),
            "no {stage}\n{}",
            outcome.report(60)
        );
    }
    second.stop(Duration::from_secs(5)).expect("stop daemon");
    let (inside, outside) = nonzero_blocks(&disk, FIO_SIZE).expect("scan disk image");
    assert_eq!(inside, FIO_SIZE / BLOCK as u64, "blocks written by fio");
    assert_eq!(outside, 0, "blocks written beyond fio's area");
    (text1, text2)
}

#[test]
fn guest_fio_verify_on_vhost_user_blk_ft() {
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("guest prerequisites: {e}"));
    let scratch = ScratchDir::new("blkft-guest").expect("scratch dir");
    let disk = scratch
        .raw_image("disk.raw", DISK_SIZE)
        .expect("disk image");
    let sock = scratch.join("blk.sock");
    let cmd = daemon(&disk, &sock);
    let log = scratch.join("backend.log");
    let backend = Backend::start(&cmd, &log, Duration::from_secs(10)).expect("start daemon");

    let mut config = GuestConfig::fio_verify(&image, scratch.path(), &sock, FIO_SIZE);
    config.disk_queues = 2;
    let outcome = Guest::start(&config)
        .expect("start QEMU")
        .wait()
        .expect("run guest");
    assert!(outcome.passed(), "{}", outcome.report(60));
    for stage in ["fio-write-done", "fio-verify-done"] {
        assert!(
            outcome.stage(stage).is_some(),
            "no {stage}\n{}",
            outcome.report(60)
        );
    }
    let status = backend.stop(Duration::from_secs(5)).expect("stop daemon");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "daemon exit {status}\n{text}");
    assert!(text.contains("stopped; requests"), "{text}");

    // fio's random map writes every 4 KiB block of its area once (non-zero verify headers).
    let (inside, outside) = nonzero_blocks(&disk, FIO_SIZE).expect("scan disk image");
    assert_eq!(inside, FIO_SIZE / BLOCK as u64, "blocks written by fio");
    assert_eq!(outside, 0, "blocks written beyond fio's area");
}

/// `--ft hold` under a real guest: a coordinator thread seals and commits an epoch every 20 ms
/// while fio writes and verifies; every write completion the guest sees comes from a commit,
/// and the image holds exactly fio's data at the end.
#[test]
fn guest_fio_verify_with_output_commit() {
    use ft_common::control::{ControlClient, Reply, Request};
    use ft_common::epoch::{Epoch, Generation};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("guest prerequisites: {e}"));
    let scratch = ScratchDir::new("blkft-hold").expect("scratch dir");
    let disk = scratch
        .raw_image("disk.raw", DISK_SIZE)
        .expect("disk image");
    let sock = scratch.join("blk.sock");
    let ctl = scratch.join("ctl.sock");
    let cmd = BackendCommand::new(
        env!("CARGO_BIN_EXE_vhost-user-blk-ft"),
        [
            "--socket".as_ref(),
            sock.as_os_str(),
            "--image".as_ref(),
            disk.as_os_str(),
            "--queues".as_ref(),
            "2".as_ref(),
            "--ft".as_ref(),
            "hold".as_ref(),
            "--control".as_ref(),
            ctl.as_os_str(),
        ],
        &sock,
    );
    let log = scratch.join("backend.log");
    let backend = Backend::start(&cmd, &log, Duration::from_secs(10)).expect("start daemon");
    let mut client = ControlClient::connect(&ctl, Duration::from_secs(10)).expect("control");
    let stop = Arc::new(AtomicBool::new(false));
    let coordinator = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let g = Generation(1);
            let mut e = 1u64;
            let mut committed = (0u64, 0u64); // (requests, bytes)
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                let r = client
                    .call(&Request::Seal {
                        generation: g,
                        epoch: Epoch(e),
                    })
                    .expect("seal");
                assert!(matches!(r, Reply::Sealed { .. }), "{r:?}");
                match client
                    .call(&Request::Commit {
                        generation: g,
                        epoch: Epoch(e),
                        deadline: None,
                    })
                    .expect("commit")
                {
                    Reply::Committed { stats, .. } => {
                        committed.0 += stats.requests;
                        committed.1 += stats.bytes;
                    }
                    r => panic!("commit {e}: {r:?}"),
                }
                e += 1;
            }
            let st = match client.call(&Request::Status).expect("status") {
                Reply::Status(s) => s,
                r => panic!("{r:?}"),
            };
            (e - 1, committed, st)
        })
    };

    let mut config = GuestConfig::fio_verify(&image, scratch.path(), &sock, FIO_SIZE);
    config.disk_queues = 2;
    let outcome = Guest::start(&config)
        .expect("start QEMU")
        .wait()
        .expect("run guest");
    stop.store(true, Ordering::Relaxed);
    let (epochs, (requests, bytes), st) = coordinator.join().expect("coordinator");
    println!(
        "{epochs} epochs committed: {requests} requests, {bytes} bytes; fdatasyncs {}, last {:?}",
        st.fdatasyncs, st.last_commit
    );
    assert!(outcome.passed(), "{}", outcome.report(60));
    for stage in ["fio-write-done", "fio-verify-done"] {
        assert!(
            outcome.stage(stage).is_some(),
            "no {stage}\n{}",
            outcome.report(60)
        );
    }
    assert_eq!(st.commits_failed, 0);
    assert!(st.fdatasyncs <= epochs, "more fdatasyncs than commits");
    // Every 4 KiB write of fio's area went through a commit (held bytes count write data only;
    // nothing else in the guest writes to this raw disk).
    assert_eq!(bytes, FIO_SIZE, "bytes committed for {FIO_SIZE} written");
    let status = backend.stop(Duration::from_secs(5)).expect("stop daemon");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "daemon exit {status}\n{text}");
    let (inside, outside) = nonzero_blocks(&disk, FIO_SIZE).expect("scan disk image");
    assert_eq!(inside, FIO_SIZE / BLOCK as u64, "blocks written by fio");
    assert_eq!(outside, 0, "blocks written beyond fio's area");
}
