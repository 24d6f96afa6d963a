// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Takeover fixtures without a VM: a standby store holding one stand-in checkpoint and a
//! vm.json whose block daemon runs on `new.*` sockets, for tests that drive `ftctl takeover`
//! up to the point where QEMU would start (tests/tests/takeover_cli.rs, partition_etcd.rs).

use crate::guest::image::workspace_binary;
use crate::guest::ScratchDir;
use ft_common::control::DeviceKind;
use ft_common::epoch::{Epoch, Generation};
use ft_common::standby::store::{CheckpointStore, PublishInfo};
use ft_common::takeover::vm_record::{DaemonRecord, VmRecord, FORMAT};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A workspace binary, or a panic naming it.
pub fn binary(package: &str, name: &str) -> PathBuf {
    workspace_binary(package, name).unwrap_or_else(|e| panic!("{name} binary: {e}"))
}

/// `vhost-user-blk-ft` arguments for `image` in hold mode on the `{tag}.sock` / `{tag}.ctl`
/// sockets of `s`.
pub fn blk_args(s: &ScratchDir, image: &Path, tag: &str) -> Vec<OsString> {
    vec![
        "--socket".into(),
        s.join(&format!("{tag}.sock")).into(),
        "--image".into(),
        image.into(),
        "--ft".into(),
        "hold".into(),
        "--control".into(),
        s.join(&format!("{tag}.ctl")).into(),
    ]
}

/// `s/store`: one published checkpoint of `generation` and `epoch` (a block device, nothing
/// outstanding; the VM state is not a real stream) and a vm.json with QEMU command `qemu` and a
/// block daemon on `image` with the `new.*` sockets.
pub fn store_with_checkpoint(
    s: &ScratchDir,
    generation: u64,
    epoch: u64,
    qemu: Vec<String>,
    image: &Path,
) -> PathBuf {
    let dir = s.join("store");
    let st = CheckpointStore::create(&dir).expect("store");
    let mut inc = st.begin(Generation(generation)).expect("begin");
    inc.write(b"QEVM-not-a-real-stream").expect("write");
    inc.publish(PublishInfo {
        generation: Generation(generation),
        epoch: Epoch(epoch),
        devices: vec![serde_json::json!({
            "device": "disk.raw", "kind": "blk",
            "queues": [{"queue": 0, "next_avail": 0, "outstanding": [], "held_heads": []}]
        })],
        mode: Some("paused".into()),
        vm_paused_us: None,
        meta: None,
        fsync_delay: Duration::ZERO,
    })
    .expect("publish");
    let mut argv = vec![binary("vhost-user-blk-ft", "vhost-user-blk-ft")
        .to_string_lossy()
        .into_owned()];
    argv.extend(
        blk_args(s, image, "new")
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned()),
    );
    VmRecord {
        format: FORMAT,
        qemu,
        daemons: vec![DaemonRecord {
            name: "blk".into(),
            device: "disk.raw".into(),
            kind: DeviceKind::Blk,
            control: s.join("new.ctl"),
            argv,
        }],
    }
    .save(&dir)
    .expect("vm.json");
    dir
}
