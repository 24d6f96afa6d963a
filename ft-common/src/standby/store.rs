// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The standby's checkpoint store: one directory per published checkpoint, written aside and
//! published atomically, validated on every read.
//!
//! Layout of the store directory `DIR` (the contract the takeover tool reads):
//!
//! ```text
//! DIR/ckpt-<epoch, 20 digits>/vmstate        the raw QEMU migration stream, restorable with
//!                                            migrate-incoming "exec:cat DIR/ckpt-.../vmstate"
//! DIR/ckpt-<epoch, 20 digits>/manifest.json  Manifest (format 1): generation, epoch,
//!                                            vmstate_len, vmstate_crc32c, devices (the SEALED
//!                                            records, verbatim), captured_at_unix_ms, ...
//! DIR/.incoming-*                            a checkpoint being written (never read as one)
//! DIR/generation                             optional fence: the standby refuses streams of
//!                                            older generations (written by a takeover)
//! ```
//!
//! Invariants:
//! - A `ckpt-*` directory appears only by `rename` of a complete `.incoming-*` directory whose
//!   `vmstate`, `manifest.json` and the directory itself were fsynced first; the store
//!   directory is fsynced after the rename. A crash leaves either the old set or the new one.
//! - A reader trusts nothing it did not check: [`CheckpointStore::newest_valid`] re-reads
//!   `vmstate` and compares its length and CRC-32C with the manifest, and skips (with a log
//!   line) any checkpoint that fails, so a torn or corrupted checkpoint is never used.
//! - After a publish only the newest published checkpoint is kept (plus one being written);
//!   older ones are deleted only after the new one is durable.
//! - Newest means the largest (generation, epoch): a later generation (a new primary) wins
//!   even with smaller epoch numbers.

use crate::control::message::TransactionState;
use crate::epoch::{Epoch, Generation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The manifest format this code writes and reads.
pub const FORMAT: u32 = 1;
/// File of the migration stream inside a checkpoint directory.
pub const VMSTATE: &str = "vmstate";
/// File of the manifest inside a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";
/// Prefix of published checkpoint directories.
pub const CKPT_PREFIX: &str = "ckpt-";
/// Prefix of checkpoints being written.
pub const INCOMING_PREFIX: &str = ".incoming-";
/// The fence file (generation, decimal).
pub const GENERATION_FILE: &str = "generation";

/// Largest manifest read (the SEALED records of a few devices are far smaller).
const MAX_MANIFEST: u64 = 64 << 20;
/// Writeback of the stream is started every this many bytes, so the final fsync has little
/// left to do.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// `manifest.json` of a published checkpoint. Unknown fields are ignored when reading, so
/// later versions may add optional fields without a new format number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub generation: Generation,
    pub epoch: Epoch,
    pub vmstate_len: u64,
    pub vmstate_crc32c: u32,
    /// The SEALED `TransactionState` record of every device, exactly as the coordinator sent
    /// them (stored opaquely: fields added to the record later survive).
    pub devices: Vec<Value>,
    pub captured_at_unix_ms: u64,
    /// `live` or `paused`, as the checkpointer reported.
    #[serde(default)]
    pub mode: Option<String>,
    /// How long the VM was paused for this checkpoint, as the checkpointer measured it up to
    /// the seal (the resume comes after the stream, so it is not known here).
    #[serde(default)]
    pub vm_paused_us: Option<u64>,
    /// Opaque data the checkpointer was configured to attach (e.g. the primary's device
    /// configuration).
    #[serde(default)]
    pub meta: Option<Value>,
}

impl Manifest {
    /// The device records as this build's `TransactionState`.
    pub fn transaction_states(&self) -> Result<Vec<TransactionState>, serde_json::Error> {
        self.devices
            .iter()
            .map(|v| serde_json::from_value(v.clone()))
            .collect()
    }
}

/// Why a checkpoint directory is not usable.
#[derive(Debug, thiserror::Error)]
pub enum InvalidCheckpoint {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: bad manifest: {error}")]
    Manifest { path: PathBuf, error: String },
    #[error("{path}: vmstate is {actual} bytes, manifest says {expected}")]
    Length {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: vmstate CRC-32C {actual:#010x}, manifest says {expected:#010x}")]
    Checksum {
        path: PathBuf,
        expected: u32,
        actual: u32,
    },
}

/// A published checkpoint that passed validation.
#[derive(Clone, Debug)]
pub struct PublishedCheckpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl PublishedCheckpoint {
    pub fn generation(&self) -> Generation {
        self.manifest.generation
    }
    pub fn epoch(&self) -> Epoch {
        self.manifest.epoch
    }
    pub fn vmstate_path(&self) -> PathBuf {
        self.dir.join(VMSTATE)
    }
    /// The SEALED records (see [`Manifest::transaction_states`]).
    pub fn devices(&self) -> Result<Vec<TransactionState>, serde_json::Error> {
        self.manifest.transaction_states()
    }
    /// The URI for QMP `migrate-incoming` that restores this checkpoint.
    pub fn incoming_uri(&self) -> String {
        format!("exec:cat {}", shell_quote(&self.vmstate_path()))
    }
}

/// Quotes a path for `sh` (QEMU runs `exec:` URIs with `/bin/sh -c`).
pub fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// A `ckpt-*` directory as listed, valid or not.
#[derive(Debug)]
pub struct ListedCheckpoint {
    pub dir: PathBuf,
    /// The epoch from the directory name.
    pub epoch: Epoch,
}

/// Timings of one publish.
#[derive(Clone, Copy, Debug, Default)]
pub struct PublishTimings {
    /// fsync of vmstate, write + fsync of the manifest, fsync of the directory, rename and
    /// fsync of the store directory.
    pub fsync: Duration,
}

/// The store directory.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    dir: PathBuf,
}

/// Name of the directory of epoch `e`.
pub fn checkpoint_dir_name(e: Epoch) -> String {
    format!("{CKPT_PREFIX}{:020}", e.0)
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> InvalidCheckpoint + '_ {
    move |source| InvalidCheckpoint::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(p: &Path) -> io::Result<()> {
    File::open(p)?.sync_all()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl CheckpointStore {
    /// Opens an existing store directory (the reader's entry point: creates nothing).
    pub fn open(dir: impl AsRef<Path>) -> io::Result<CheckpointStore> {
        let dir = dir.as_ref().to_path_buf();
        if !fs::metadata(&dir)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(CheckpointStore { dir })
    }

    /// Opens the store for writing: creates the directory if needed and removes leftovers of
    /// checkpoints that were being written when a previous standby stopped.
    pub fn create(dir: impl AsRef<Path>) -> io::Result<CheckpointStore> {
        fs::create_dir_all(dir.as_ref())?;
        let s = CheckpointStore::open(dir)?;
        for e in fs::read_dir(&s.dir)? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with(INCOMING_PREFIX) {
                log::warn!("removing unfinished checkpoint {}", e.path().display());
                fs::remove_dir_all(e.path())?;
            }
        }
        Ok(s)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every `ckpt-*` directory, newest epoch first (unvalidated).
    pub fn list(&self) -> io::Result<Vec<ListedCheckpoint>> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            let Some(num) = name.strip_prefix(CKPT_PREFIX) else {
                continue;
            };
            if num.len() != 20 || !num.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(n) = num.parse::<u64>() else { continue };
            v.push(ListedCheckpoint {
                dir: e.path(),
                epoch: Epoch(n),
            });
        }
        v.sort_by_key(|l| std::cmp::Reverse(l.epoch));
        Ok(v)
    }

    /// Reads and checks the manifest only (cheap; no checksum of the stream).
    pub fn read_manifest(dir: &Path) -> Result<Manifest, InvalidCheckpoint> {
        let path = dir.join(MANIFEST);
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|f| f.take(MAX_MANIFEST).read_to_end(&mut bytes))
            .map_err(io_at(&path))?;
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| InvalidCheckpoint::Manifest {
                path: path.clone(),
                error: e.to_string(),
            })?;
        if m.format != FORMAT {
            return Err(InvalidCheckpoint::Manifest {
                path,
                error: format!("format {} (this build reads {FORMAT})", m.format),
            });
        }
        let named = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if named != checkpoint_dir_name(m.epoch) {
            return Err(InvalidCheckpoint::Manifest {
                path,
                error: format!("epoch {} does not match directory {named}", m.epoch),
            });
        }
        Ok(m)
    }

    /// Validates one checkpoint directory completely: manifest, then length and CRC-32C of
    /// the whole stream.
    pub fn validate(dir: &Path) -> Result<PublishedCheckpoint, InvalidCheckpoint> {
        let manifest = Self::read_manifest(dir)?;
        let path = dir.join(VMSTATE);
        let mut f = File::open(&path).map_err(io_at(&path))?;
        let actual = f.metadata().map_err(io_at(&path))?.len();
        if actual != manifest.vmstate_len {
            return Err(InvalidCheckpoint::Length {
                path,
                expected: manifest.vmstate_len,
                actual,
            });
        }
        let mut crc = 0u32;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_at(&path)(e)),
            };
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            total += n as u64;
        }
        if total != manifest.vmstate_len {
            return Err(InvalidCheckpoint::Length {
                path,
                expected: manifest.vmstate_len,
                actual: total,
            });
        }
        if crc != manifest.vmstate_crc32c {
            return Err(InvalidCheckpoint::Checksum {
                path,
                expected: manifest.vmstate_crc32c,
                actual: crc,
            });
        }
        Ok(PublishedCheckpoint {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The newest checkpoint (largest generation, then epoch) that passes validation; torn or
    /// corrupted ones are skipped with a warning.
    pub fn newest_valid(&self) -> io::Result<Option<PublishedCheckpoint>> {
        let mut candidates: Vec<(Manifest, PathBuf)> = Vec::new();
        for l in self.list()? {
            match Self::read_manifest(&l.dir) {
                Ok(m) => candidates.push((m, l.dir)),
                Err(e) => log::warn!("skipping checkpoint: {e}"),
            }
        }
        candidates.sort_by_key(|c| std::cmp::Reverse((c.0.generation, c.0.epoch)));
        for (_, dir) in candidates {
            match Self::validate(&dir) {
                Ok(p) => return Ok(Some(p)),
                Err(e) => log::warn!("skipping checkpoint: {e}"),
            }
        }
        Ok(None)
    }

    /// The newest published (generation, epoch) by manifest only (no checksum pass).
    pub fn newest_published(&self) -> io::Result<Option<(Generation, Epoch)>> {
        let mut best = None;
        for l in self.list()? {
            if let Ok(m) = Self::read_manifest(&l.dir) {
                best = best.max(Some((m.generation, m.epoch)));
            }
        }
        Ok(best)
    }

    /// The fence generation in `DIR/generation` (0 when absent).
    pub fn fenced_generation(&self) -> io::Result<Generation> {
        match fs::read_to_string(self.dir.join(GENERATION_FILE)) {
            Ok(s) => s.trim().parse::<u64>().map(Generation).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.dir.join(GENERATION_FILE).display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Generation(0)),
            Err(e) => Err(e),
        }
    }

    /// Durably records `g` as the fence: the standby refuses streams of generations below it.
    /// A takeover calls this with its new generation before it starts anything.
    pub fn fence(&self, g: Generation) -> io::Result<()> {
        crate::durable::replace_file(
            &self.dir.join(GENERATION_FILE),
            format!("{}\n", g.0).as_bytes(),
        )
    }

    /// Starts writing a checkpoint for `generation` in a fresh `.incoming-*` directory.
    pub fn begin(&self, generation: Generation) -> io::Result<Incoming> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = self.dir.join(format!(
            "{INCOMING_PREFIX}{}-{}-{}",
            generation.0,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(VMSTATE));
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(Incoming {
            store: self.clone(),
            dir,
            file: Some(file),
            len: 0,
            crc: 0,
            flushed_to: 0,
        })
    }

    /// Deletes every published checkpoint except `keep`.
    fn prune(&self, keep: &Path) {
        let Ok(list) = self.list() else { return };
        for l in list {
            if l.dir != keep {
                if let Err(e) = fs::remove_dir_all(&l.dir) {
                    log::warn!("cannot delete old checkpoint {}: {e}", l.dir.display());
                }
            }
        }
    }
}

/// A checkpoint being written. Dropping it without [`Incoming::publish`] deletes it.
#[derive(Debug)]
pub struct Incoming {
    store: CheckpointStore,
    dir: PathBuf,
    file: Option<File>,
    len: u64,
    crc: u32,
    flushed_to: u64,
}

/// What [`Incoming::publish`] needs besides the stream.
#[derive(Clone, Debug)]
pub struct PublishInfo {
    pub generation: Generation,
    pub epoch: Epoch,
    pub devices: Vec<Value>,
    pub mode: Option<String>,
    pub vm_paused_us: Option<u64>,
    pub meta: Option<Value>,
    /// Extra time to sleep before the fsyncs (a test hook: a slow disk).
    pub fsync_delay: Duration,
}

impl Incoming {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of stream written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends stream bytes (checksummed as they pass).
    pub fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("checkpoint already closed"))?;
        f.write_all(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        self.len += buf.len() as u64;
        if self.len - self.flushed_to >= WRITEBACK_CHUNK {
            // Start writeback of what is complete so the final fsync waits for little. Only a
            // hint: durability comes from the fsync at publish.
            // SAFETY: plain syscall on an open fd with in-range offsets.
            unsafe {
                libc::sync_file_range(
                    f.as_raw_fd(),
                    self.flushed_to as libc::off64_t,
                    (self.len - self.flushed_to) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.flushed_to = self.len;
        }
        Ok(())
    }

    /// Makes the checkpoint durable and visible as `ckpt-<epoch>`, then deletes older ones.
    pub fn publish(
        mut self,
        info: PublishInfo,
    ) -> io::Result<(PublishedCheckpoint, PublishTimings)> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("checkpoint already closed"))?;
        if !info.fsync_delay.is_zero() {
            std::thread::sleep(info.fsync_delay);
        }
        let t0 = Instant::now();
        file.sync_all()?;
        drop(file);
        let manifest = Manifest {
            format: FORMAT,
            generation: info.generation,
            epoch: info.epoch,
            vmstate_len: self.len,
            vmstate_crc32c: self.crc,
            devices: info.devices,
            captured_at_unix_ms: unix_ms(),
            mode: info.mode,
            vm_paused_us: info.vm_paused_us,
            meta: info.meta,
        };
        let body = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
        let mut mf = File::create(self.dir.join(MANIFEST))?;
        mf.write_all(&body)?;
        mf.sync_all()?;
        drop(mf);
        fsync_dir(&self.dir)?;
        let target = self.store.dir.join(checkpoint_dir_name(info.epoch));
        if target.exists() {
            // Same epoch number from an earlier generation (a new primary restarted its
            // numbering): move it aside first, rename cannot replace a non-empty directory.
            let aside = self.store.dir.join(format!(
                "{INCOMING_PREFIX}replaced-{}-{}",
                info.epoch.0,
                std::process::id()
            ));
            fs::rename(&target, &aside)?;
            let _ = fs::remove_dir_all(&aside);
        }
        fs::rename(&self.dir, &target)?;
        fsync_dir(&self.store.dir)?;
        let fsync = t0.elapsed();
        // Renamed: nothing left for Drop to delete.
        self.dir = PathBuf::new();
        self.store.prune(&target);
        let published = PublishedCheckpoint {
            dir: target,
            manifest,
        };
        Ok((published, PublishTimings { fsync }))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.file.take();
        if !self.dir.as_os_str().is_empty() {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!(
                        "cannot delete unfinished checkpoint {}: {e}",
                        self.dir.display()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ft-store-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    fn info(g: u64, e: u64) -> PublishInfo {
        PublishInfo {
            generation: Generation(g),
            epoch: Epoch(e),
            devices: vec![serde_json::json!({"device":"vda","kind":"blk","queues":[],
                "future_field": 7})],
            mode: Some("paused".into()),
            vm_paused_us: Some(5),
            meta: None,
            fsync_delay: Duration::ZERO,
        }
    }

    fn publish(s: &CheckpointStore, g: u64, e: u64, data: &[u8]) -> PublishedCheckpoint {
        let mut inc = s.begin(Generation(g)).unwrap();
        inc.write(data).unwrap();
        inc.publish(info(g, e)).unwrap().0
    }

    #[test]
    fn publish_keeps_only_the_newest_and_validates() {
        let d = tmp("keep");
        let s = CheckpointStore::create(&d).unwrap();
        assert!(s.newest_valid().unwrap().is_none());
        publish(&s, 1, 3, b"QEVMone");
        let p = publish(&s, 1, 4, b"QEVMtwo");
        assert_eq!(s.list().unwrap().len(), 1);
        let n = s.newest_valid().unwrap().unwrap();
        assert_eq!((n.generation(), n.epoch()), (Generation(1), Epoch(4)));
        assert_eq!(fs::read(n.vmstate_path()).unwrap(), b"QEVMtwo");
        assert_eq!(n.dir, p.dir);
        assert!(n.dir.ends_with("ckpt-00000000000000000004"));
        // Unknown record fields survive; the typed view still parses.
        assert_eq!(n.manifest.devices[0]["future_field"], 7);
        assert_eq!(n.devices().unwrap()[0].device, "vda");
        assert!(n.incoming_uri().starts_with("exec:cat '"));
        // An abandoned incoming is deleted on drop.
        let inc = s.begin(Generation(1)).unwrap();
        let idir = inc.dir().to_path_buf();
        drop(inc);
        assert!(!idir.exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn torn_and_corrupt_checkpoints_are_skipped() {
        let d = tmp("torn");
        let s = CheckpointStore::create(&d).unwrap();
        let old = publish(&s, 1, 5, b"QEVM-old-state");
        // Simulate a newer checkpoint left torn (no pruning of the old one happened).
        let keep = tmp("torn-keep");
        fs::rename(&old.dir, &keep).unwrap();
        let newer = publish(&s, 1, 6, b"QEVM-new-state");
        fs::rename(&keep, &old.dir).unwrap();
        // Truncated stream.
        let f = OpenOptions::new()
            .write(true)
            .open(newer.vmstate_path())
            .unwrap();
        f.set_len(4).unwrap();
        let n = s.newest_valid().unwrap().unwrap();
        assert_eq!(n.epoch(), Epoch(5));
        // Same length, flipped byte: checksum.
        fs::write(newer.vmstate_path(), b"QEVM-new-statX").unwrap();
        assert!(matches!(
            CheckpointStore::validate(&newer.dir),
            Err(InvalidCheckpoint::Checksum { .. })
        ));
        assert_eq!(s.newest_valid().unwrap().unwrap().epoch(), Epoch(5));
        // Garbage manifest.
        fs::write(newer.dir.join(MANIFEST), b"{not json").unwrap();
        assert_eq!(s.newest_valid().unwrap().unwrap().epoch(), Epoch(5));
        // Leftover incoming directories are removed when the standby opens the store.
        fs::create_dir(d.join(".incoming-9-9-9")).unwrap();
        let s = CheckpointStore::create(&d).unwrap();
        assert!(!d.join(".incoming-9-9-9").exists());
        assert_eq!(s.newest_valid().unwrap().unwrap().epoch(), Epoch(5));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn newer_generation_wins_and_fence_persists() {
        let d = tmp("gen");
        let s = CheckpointStore::create(&d).unwrap();
        publish(&s, 1, 40, b"QEVMa");
        publish(&s, 2, 40, b"QEVMb");
        let n = s.newest_valid().unwrap().unwrap();
        assert_eq!((n.generation(), n.epoch()), (Generation(2), Epoch(40)));
        assert_eq!(fs::read(n.vmstate_path()).unwrap(), b"QEVMb");
        assert_eq!(s.fenced_generation().unwrap(), Generation(0));
        s.fence(Generation(3)).unwrap();
        assert_eq!(
            CheckpointStore::open(&d)
                .unwrap()
                .fenced_generation()
                .unwrap(),
            Generation(3)
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
