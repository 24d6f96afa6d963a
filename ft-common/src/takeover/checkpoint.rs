//! The checkpoint a takeover restores: the newest valid one in the standby's store.
//!
//! Store layout (written by the standby, see docs/operations.md): one directory per published
//! checkpoint, `ckpt-<epoch, 20 digits>`, holding `vmstate` (QEMU's migration stream) and
//! `manifest.json` (`format`, `generation`, `epoch`, `vmstate_len`, `devices`: every device's
//! SEALED transaction state as the control protocol serializes it). A checkpoint is valid when
//! its manifest parses and its stream has the recorded length; directories being written (other
//! names) and invalid ones are skipped, newest first, so a torn checkpoint is never used.
//!
//! Each device record is kept as the exact JSON of the manifest, so a replay file handed to a
//! daemon is byte for byte what that daemon sealed, whatever fields its version adds.

use crate::control::{DeviceKind, TransactionState};
use crate::epoch::{Epoch, Generation};
use serde::Deserialize;
use std::fs;
use std::path::{Path, PathBuf};

/// Largest manifest accepted.
const MAX_MANIFEST: u64 = 16 << 20;

#[derive(Deserialize)]
struct Manifest {
    format: u32,
    generation: Generation,
    epoch: Epoch,
    vmstate_len: u64,
    devices: Vec<serde_json::Value>,
}

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

/// Reads and validates the checkpoint in `dir`.
pub fn read(dir: &Path) -> Result<Checkpoint, String> {
    let mpath = dir.join("manifest.json");
    let md = fs::metadata(&mpath).map_err(|e| format!("{}: {e}", mpath.display()))?;
    if md.len() > MAX_MANIFEST {
        return Err(format!(
            "{}: larger than {MAX_MANIFEST} bytes",
            mpath.display()
        ));
    }
    let text = fs::read_to_string(&mpath).map_err(|e| format!("{}: {e}", mpath.display()))?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", mpath.display()))?;
    if m.format != 1 {
        return Err(format!("{}: unknown format {}", mpath.display(), m.format));
    }
    let vmstate = dir.join("vmstate");
    let len = fs::metadata(&vmstate)
        .map_err(|e| format!("{}: {e}", vmstate.display()))?
        .len();
    if len != m.vmstate_len || len == 0 {
        return Err(format!(
            "{}: {len} bytes, the manifest says {}",
            vmstate.display(),
            m.vmstate_len
        ));
    }
    let mut devices = Vec::new();
    for json in m.devices {
        let state: TransactionState = serde_json::from_value(json.clone())
            .map_err(|e| format!("{}: device record: {e}", mpath.display()))?;
        devices.push(DeviceRecord {
            device: state.device.clone(),
            kind: state.kind,
            outstanding: state.queues.iter().map(|q| q.held_heads.len() as u64).sum(),
            json,
        });
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        generation: m.generation,
        epoch: m.epoch,
        vmstate,
        vmstate_len: len,
        devices,
    })
}

/// The newest valid checkpoint in `store`, with the reasons older or broken ones were skipped.
pub fn newest_valid(store: &Path) -> Result<(Checkpoint, Vec<String>), String> {
    let mut dirs: Vec<(u64, PathBuf)> = fs::read_dir(store)
        .map_err(|e| format!("{}: {e}", store.display()))?
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let digits = name.strip_prefix("ckpt-")?;
            (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| Some((digits.parse().ok()?, e.path())))?
        })
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    let mut skipped = Vec::new();
    for (epoch, dir) in dirs {
        match read(&dir) {
            Ok(c) if c.epoch.0 == epoch => return Ok((c, skipped)),
            Ok(c) => skipped.push(format!(
                "{}: manifest epoch {} does not match the name",
                dir.display(),
                c.epoch
            )),
            Err(e) => skipped.push(e),
        }
    }
    Err(format!(
        "no valid checkpoint in {}{}",
        store.display(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(" (skipped: {})", skipped.join("; "))
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ft-ckpt-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn publish(store: &Path, epoch: u64, stream: &[u8], claimed_len: u64) {
        let dir = store.join(format!("ckpt-{epoch:020}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vmstate"), stream).unwrap();
        let manifest = serde_json::json!({
            "format": 1, "generation": 3, "epoch": epoch, "vmstate_len": claimed_len,
            "devices": [
                {"device": "disk.raw", "kind": "blk", "extra": 1,
                 "queues": [{"queue": 0, "next_avail": 9, "held_heads": [4, 7]}]},
                {"device": "tap0", "kind": "net", "queues": []}
            ]
        });
        fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    }

    #[test]
    fn the_newest_valid_checkpoint_wins_and_torn_ones_are_skipped() {
        let s = tmp("newest");
        publish(&s, 5, b"state-5", 7);
        publish(&s, 6, b"state-6", 7);
        publish(&s, 7, b"torn", 7);
        fs::create_dir_all(s.join("incoming-8")).unwrap();
        let (c, skipped) = newest_valid(&s).unwrap();
        assert_eq!(c.epoch, Epoch(6));
        assert_eq!(c.generation, Generation(3));
        assert_eq!(c.outstanding(), 2);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        // The record is passed on exactly, unknown fields included.
        assert_eq!(c.devices[0].json["extra"], 1);
        fs::remove_dir_all(&s).unwrap();
    }

    #[test]
    fn an_empty_store_is_an_error() {
        let s = tmp("empty");
        assert!(newest_valid(&s)
            .unwrap_err()
            .contains("no valid checkpoint"));
        fs::remove_dir_all(&s).unwrap();
    }
}
