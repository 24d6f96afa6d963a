// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `ftctl takeover` and `ftctl record-vm` without a VM: the order of the takeover's first
//! steps (generation persisted and the store fenced before anything is started; the old
//! primary's daemon fenced with the new generation) and clear errors for bad input.
//!
//! The end-to-end takeover with QEMU is tests/tests/e2e_failover.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ft_common::control::{ControlClient, Reply, Request};
use ft_common::epoch::{Epoch, Generation};
use ft_common::fence::GenerationStore;
use ft_common::standby::store::CheckpointStore;
use ft_common::takeover::vm_record::peer_pid;
use ft_tests::guest::{Backend, BackendCommand, ScratchDir};
use ft_tests::takeover_store::{binary, blk_args, store_with_checkpoint};

fn ftctl(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(binary("ft-common", "ftctl"))
        .args(args)
        .output()
        .expect("run ftctl")
}

/// The VM record's QEMU command: `qemu` with the guest's memory size.
fn qemu(qemu: &str) -> Vec<String> {
    vec![qemu.into(), "-m".into(), "320M".into()]
}

/// The takeover persists G+1 and fences the store and the reachable old daemon before it
/// starts anything; a QEMU that cannot start fails the takeover with a clear error.
#[test]
fn generation_and_fences_come_first_and_a_failed_start_is_reported() {
    let s = ScratchDir::new("tk-cli").expect("scratch");
    let image = s.raw_image("disk.raw", 1 << 20).expect("image");
    // The old primary's daemon, still reachable.
    let old = Backend::start(
        &BackendCommand::new(
            binary("vhost-user-blk-ft", "vhost-user-blk-ft"),
            blk_args(&s, &image, "old"),
            s.join("old.sock"),
        ),
        &s.join("old.log"),
        Duration::from_secs(10),
    )
    .expect("start the old daemon");
    let store = store_with_checkpoint(&s, 4, 9, qemu("/bin/false"), &image);
    let state = s.join("standby.state");
    GenerationStore::new(&state)
        .store(Generation(2))
        .expect("state");
    let fence = format!("blk={}", s.join("old.ctl").display());
    let out = ftctl(&[
        "takeover".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--state-file".as_ref(),
        state.as_os_str(),
        "--run-dir".as_ref(),
        s.join("run").as_os_str(),
        "--fence".as_ref(),
        fence.as_ref(),
        "--timeout-ms".as_ref(),
        "10000".as_ref(),
    ]);
    // The daemon the takeover started is detached: stop it through its control socket's pid.
    if let Ok(pid) = peer_pid(&s.join("new.ctl")) {
        // SAFETY: kill(2) on the daemon this test made ftctl start.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "takeover with QEMU /bin/false succeeded"
    );
    assert!(
        stderr.contains("QEMU exited"),
        "error does not say what failed: {stderr}"
    );
    // G+1 above the checkpoint's generation 4 (the state file said 2), persisted, and the
    // store fenced with it.
    assert_eq!(GenerationStore::new(&state).load().unwrap(), Generation(5));
    assert_eq!(
        CheckpointStore::open(&store)
            .unwrap()
            .fenced_generation()
            .unwrap(),
        Generation(5)
    );
    // The old daemon admitted generation 5 (the ABORT) and now refuses the deposed 4.
    let mut c = ControlClient::connect(s.join("old.ctl"), Duration::from_secs(5)).expect("connect");
    match c.call(&Request::Status) {
        Ok(Reply::Status(st)) => assert_eq!(st.generation, Generation(5)),
        other => panic!("STATUS: {other:?}"),
    }
    match c.call(&Request::Seal {
        generation: Generation(4),
        epoch: Epoch(1),
    }) {
        Ok(Reply::Error { code, .. }) => {
            assert_eq!(code, ft_common::control::ErrorCode::Fenced)
        }
        other => panic!("SEAL of the deposed generation: {other:?}"),
    }
    drop(old);
}

/// Bad input: an empty store, a store without vm.json, record-vm on a socket nobody serves.
#[test]
fn bad_input_is_a_clear_error_and_changes_nothing() {
    let s = ScratchDir::new("tk-bad").expect("scratch");
    let empty = s.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let state = s.join("state");
    let run = |store: &Path| {
        ftctl(&[
            "takeover".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            "--state-file".as_ref(),
            state.as_os_str(),
            "--run-dir".as_ref(),
            s.join("run").as_os_str(),
        ])
    };
    let out = run(&empty);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no valid checkpoint"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = s.raw_image("disk.raw", 1 << 20).expect("image");
    let store = store_with_checkpoint(&s, 1, 9, qemu("/bin/false"), &image);
    std::fs::remove_file(store.join("vm.json")).unwrap();
    let out = run(&store);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vm.json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was taken: no generation persisted, the store not fenced.
    assert!(!state.exists(), "a failed read persisted a generation");
    assert_eq!(
        CheckpointStore::open(&store)
            .unwrap()
            .fenced_generation()
            .unwrap(),
        Generation(0)
    );
    let out = ftctl(&[
        "record-vm".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--qmp".as_ref(),
        s.join("nobody.sock").as_os_str(),
        "--device".as_ref(),
        "blk=/nonexistent.ctl".as_ref(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nobody.sock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!store.join("vm.json").exists());
}

/// A store with a replica service (`ft-standby --replica-image`): `replica.json` as the service
/// writes it, for an image of `size` bytes in `standby-host/`.
fn replica_on(
    s: &ScratchDir,
    store: &Path,
    size: u64,
) -> (ft_common::replica::ReplicaServer, PathBuf) {
    std::fs::create_dir_all(s.join("standby-host")).expect("dir");
    let img = s
        .raw_image("standby-host/disk.raw", size)
        .expect("replica image");
    let server = ft_common::replica::ReplicaServer::start(ft_common::replica::ReplicaConfig {
        listen: "tcp:127.0.0.1:0".parse().unwrap(),
        image: img.clone(),
        store: store.to_path_buf(),
        max_epoch_bytes: 1 << 20,
        io_timeout: Duration::from_secs(5),
        dirty_log: None,
    })
    .expect("replica service");
    (server, img)
}

fn takeover_args(s: &ScratchDir, store: &Path) -> Output {
    ftctl(&[
        "takeover".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--state-file".as_ref(),
        s.join("standby.state").as_os_str(),
        "--run-dir".as_ref(),
        s.join("run").as_os_str(),
        "--timeout-ms".as_ref(),
        "10000".as_ref(),
    ])
}

/// Shared-nothing takeover: the block daemon starts on the replica's image without
/// `--replicate-to`, and the replica service is fenced for good; a replica whose initial sync
/// did not finish is refused before anything starts.
#[test]
fn a_takeover_runs_on_the_replica_image_and_refuses_one_not_in_sync() {
    // In sync: the daemon runs on the replica's image.
    let s = ScratchDir::new("tk-replica").expect("scratch");
    let image = s.raw_image("disk.raw", 1 << 20).expect("image");
    let dir = store_with_checkpoint(&s, 4, 9, qemu("/bin/false"), &image);
    let (server, replica_img) = replica_on(&s, &dir, 1 << 20);
    let out = takeover_args(&s, &dir);
    let pid = peer_pid(&s.join("new.ctl")).ok();
    let argv = pid
        .map(|p| ft_common::takeover::vm_record::cmdline(p).expect("cmdline"))
        .unwrap_or_default();
    if let Some(pid) = pid {
        // SAFETY: kill(2) on the daemon this test made ftctl start.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(!out.status.success(), "QEMU /bin/false cannot restore");
    let i = argv
        .iter()
        .position(|a| a == "--image")
        .unwrap_or_else(|| panic!("no daemon started, or no --image: {argv:?}"));
    assert_eq!(
        PathBuf::from(&argv[i + 1]),
        std::fs::canonicalize(&replica_img).unwrap(),
        "the daemon does not run on the replica's image: {argv:?}"
    );
    assert!(!argv.iter().any(|a| a.contains("replicate-to")), "{argv:?}");
    assert!(dir.join(ft_common::replica::server::FENCED_FILE).exists());
    drop(server);

    // Not in sync (an initial sync started and did not finish): refused, nothing started.
    let s = ScratchDir::new("tk-replica-sync").expect("scratch");
    let image = s.raw_image("disk.raw", 1 << 20).expect("image");
    let dir = store_with_checkpoint(&s, 4, 9, qemu("/bin/false"), &image);
    let (server, _img) = replica_on(&s, &dir, 1 << 20);
    let mut link = ft_common::replica::ReplicaLink::new(
        server.addr().clone(),
        1 << 20,
        Duration::from_secs(5),
    );
    let f = link.begin(Epoch(1));
    f.sync_start();
    f.write(0, [&[1u8; 4096][..]].into_iter());
    f.finish();
    link.send();
    link.wait_ack().expect("ack");
    let out = takeover_args(&s, &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("initial sync incomplete"), "{stderr}");
    assert!(
        peer_pid(&s.join("new.ctl")).is_err(),
        "a daemon was started on a half-copied image"
    );
}
