// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The checkpoint a takeover restores: the newest valid one in the standby's store
//! ([`crate::standby::store`], which validates length and CRC-32C and skips torn ones), with
//! each device's SEALED record kept as the exact JSON of the manifest, so a replay file handed
//! to a daemon is byte for byte what that daemon sealed, whatever fields its version adds.

use crate::control::{DeviceKind, TransactionState};
use crate::epoch::{Epoch, Generation};
use crate::standby::store::CheckpointStore;
use std::path::{Path, PathBuf};

/// One device's SEALED record in a checkpoint.
#[derive(Clone, Debug)]
pub struct DeviceRecord {
    /// `TransactionState::device`.
    pub device: String,
    pub kind: DeviceKind,
    /// The record exactly as the manifest holds it.
    pub json: serde_json::Value,
    /// Requests the record lists as outstanding (to be replayed), over all queues.
    pub outstanding: u64,
}

/// A published, validated checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub generation: Generation,
    pub epoch: Epoch,
    pub vmstate: PathBuf,
    pub vmstate_len: u64,
    pub incoming_uri: String,
    pub devices: Vec<DeviceRecord>,
}

impl Checkpoint {
    /// Requests to replay over all block devices.
    pub fn outstanding(&self) -> u64 {
        self.devices
            .iter()
            .filter(|d| d.kind == DeviceKind::Blk)
            .map(|d| d.outstanding)
            .sum()
    }
}

/// Requests a SEALED record lists as outstanding.
pub fn outstanding(state: &TransactionState) -> u64 {
    state
        .queues
        .iter()
        .map(|q| q.replay_heads().len() as u64)
        .sum()
}

/// The newest valid checkpoint in `store`.
pub fn newest_valid(store: &Path) -> Result<Checkpoint, String> {
    let s = CheckpointStore::open(store).map_err(|e| format!("{}: {e}", store.display()))?;
    let p = s
        .newest_valid()
        .map_err(|e| format!("{}: {e}", store.display()))?
        .ok_or_else(|| format!("no valid checkpoint in {}", store.display()))?;
    let states = p
        .devices()
        .map_err(|e| format!("{}: device records: {e}", p.dir.display()))?;
    let devices = states
        .iter()
        .zip(&p.manifest.devices)
        .map(|(state, json)| DeviceRecord {
            device: state.device.clone(),
            kind: state.kind,
            json: json.clone(),
            outstanding: outstanding(state),
        })
        .collect();
    Ok(Checkpoint {
        dir: p.dir.clone(),
        generation: p.generation(),
        epoch: p.epoch(),
        vmstate: p.vmstate_path(),
        vmstate_len: p.manifest.vmstate_len,
        incoming_uri: p.incoming_uri(),
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standby::store::PublishInfo;
    use std::fs;

    #[test]
    fn records_are_passed_on_exactly_and_outstanding_requests_counted() {
        let d = std::env::temp_dir().join(format!("ft-ckpt-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let store = CheckpointStore::create(&d).unwrap();
        assert!(newest_valid(&d)
            .unwrap_err()
            .contains("no valid checkpoint"));
        let mut inc = store.begin(Generation(3)).unwrap();
        inc.write(b"QEVM-stream").unwrap();
        let devices = vec![
            serde_json::json!({"device": "disk.raw", "kind": "blk", "extra": 1,
                "queues": [{"queue": 0, "next_avail": 9, "held_heads": [4, 7]}]}),
            serde_json::json!({"device": "tap0", "kind": "net", "queues": []}),
        ];
        inc.publish(PublishInfo {
            generation: Generation(3),
            epoch: Epoch(6),
            devices,
            mode: None,
            vm_paused_us: None,
            meta: None,
            fsync_delay: std::time::Duration::ZERO,
        })
        .unwrap();
        let c = newest_valid(&d).unwrap();
        assert_eq!((c.generation, c.epoch), (Generation(3), Epoch(6)));
        assert_eq!(c.outstanding(), 2);
        assert_eq!(c.devices[0].json["extra"], 1);
        assert!(c.incoming_uri.starts_with("exec:cat '"));
        fs::remove_dir_all(&d).unwrap();
    }
}
