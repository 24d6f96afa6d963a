// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The replica service (`ft-standby --replica-image PATH --replica-listen ADDR`): receives the
//! primary block daemon's committed epochs and applies them to the standby's own image.
//!
//! Per connection: `HELLO` -> `WELCOME` (or `REFUSED`), then `EPOCH` -> apply, one
//! `fdatasync` -> `ACK`, in order. A newer connection replaces the older one (the primary
//! reconnected; the old one may be half-open).
//!
//! Ordering and duplicates: epochs are ordered within the primary daemon's session (a random
//! number it draws at start). The newest applied one received again (its `ACK` was lost) is
//! acknowledged without being applied again; an older one is refused; a newer one is applied.
//! A new session (the primary's daemon restarted) starts the order again.
//!
//! Fencing against a takeover: the service shares the checkpoint store directory. It applies an
//! epoch only while holding an exclusive `flock` on `DIR/replica.lock`, after checking under
//! that lock that `DIR/replica.fenced` does not exist; a takeover creates that file under the
//! same lock ([`fence`]). So once [`fence`] returned, no epoch is being applied and none ever
//! will be on this store (a service started on it later refuses to run): the new primary's
//! daemon owns the image. `DIR/replica.json` names the image, so the takeover starts the
//! standby's daemon on it ([`replica_image`]).
//!
//! Failback target (`--replica-dirty-log PATH`, the log this host's block daemon kept while it
//! was the primary, [`super::dirty`]): the service counts the image as not in sync from its start
//! (it is stale by the new primary's writes, and by this host's own unacknowledged ones), sends
//! the log's dirty blocks to a primary that asks (`HELLO` flag, `DIRTY` frame), and once the
//! resync's SYNC_DONE epoch is applied and synced it empties the log, *then* records the image
//! in sync. A log that did not exist when the service started is created (this host's daemon
//! tracks into it after a takeover) but not sent: it says nothing about the past. The log is
//! read at start and opened again only to empty it, never kept open: after a takeover the new
//! primary's daemon tracks into it while this (fenced) service may still run.

use super::apply::ReplicaImage;
use super::dirty::DirtyLog;
use super::protocol::{self, EpochView, MsgType, Op, ProtoError};
use crate::epoch::Epoch;
use crate::standby::protocol::{Conn, Listener, StandbyAddr};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub const LOCK_FILE: &str = "replica.lock";
pub const RECORD_FILE: &str = "replica.json";
pub const FENCED_FILE: &str = "replica.fenced";

/// `DIR/replica.json`: which image the replica service feeds, and whether it is a copy of the
/// primary's (false from an initial sync's first chunk until its last one is applied and synced;
/// a takeover refuses an image that is not).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub format: u32,
    pub image: PathBuf,
    pub size: u64,
    #[serde(default = "yes")]
    pub in_sync: bool,
    /// The dirty log of this image (`--replica-dirty-log`): a takeover's block daemon tracks its
    /// writes there (`--dirty-log`), so that a later failback copies only those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_log: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

/// Replaces `DIR/replica.json` atomically and durably.
fn save_record(dir: &Path, record: &ReplicaRecord) -> io::Result<()> {
    let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(record).map_err(io::Error::other)?,
    )?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(RECORD_FILE))?;
    File::open(dir)?.sync_all()
}

/// The image a replica service in store `dir` feeds, if any.
pub fn replica_image(dir: &Path) -> io::Result<Option<ReplicaRecord>> {
    match std::fs::read(dir.join(RECORD_FILE)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// An exclusive `flock` on `DIR/replica.lock`, released on drop.
struct ApplyLock(File);

impl ApplyLock {
    fn take(dir: &Path) -> io::Result<ApplyLock> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        loop {
            // SAFETY: flock on a descriptor `f` owns.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(ApplyLock(f));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for ApplyLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// For a takeover: waits until no epoch is being applied and makes sure none ever is again on
/// store `dir` (`DIR/replica.fenced`, durable, checked by every apply under the same lock).
/// False if no replica service ever ran on this store.
pub fn fence(dir: &Path) -> io::Result<bool> {
    if !dir.join(LOCK_FILE).exists() {
        return Ok(false);
    }
    let _lock = ApplyLock::take(dir)?;
    let f = File::create(dir.join(FENCED_FILE))?;
    f.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(true)
}

fn taken_over(dir: &Path) -> bool {
    dir.join(FENCED_FILE).exists()
}

#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub listen: StandbyAddr,
    pub image: PathBuf,
    /// The standby's store directory (fence, lock and `replica.json`).
    pub store: PathBuf,
    /// Largest `EPOCH` body accepted (bounds the receive buffer).
    pub max_epoch_bytes: u64,
    /// Bound on a silent peer mid-frame (an idle connection waits forever).
    pub io_timeout: Duration,
    /// This image's dirty log (failback target; see the module doc).
    pub dirty_log: Option<PathBuf>,
}

/// What the replica has applied; [`ReplicaServer::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplicaStats {
    /// (session, epoch) of the newest epoch applied.
    pub last_applied: Option<(u64, Epoch)>,
    pub epochs_applied: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub bytes_applied: u64,
    pub connections: u64,
    pub last_error: Option<String>,
}

struct Shared {
    cfg: ReplicaConfig,
    record: Mutex<ReplicaRecord>,
    image: Mutex<ReplicaImage>,
    stats: Mutex<ReplicaStats>,
    /// The newest connection (shut down when a newer one arrives, or on stop).
    current: Mutex<Option<Conn>>,
    stop: AtomicBool,
    /// The dirty log (failback target), read at start.
    dirty: Mutex<Option<DirtySource>>,
}

/// This image's dirty set as read at start. The log itself is not kept open (and locked): after
/// a takeover the new primary's daemon tracks into it while this service may still run, fenced.
struct DirtySource {
    path: PathBuf,
    runs: Vec<(u64, u64)>,
    lineage: u64,
    /// Whether the log existed at start (only then is its set sent), or was reset by a resync.
    valid: bool,
}

pub struct ReplicaServer {
    shared: Arc<Shared>,
    addr: StandbyAddr,
    thread: Option<JoinHandle<()>>,
}

impl ReplicaServer {
    pub fn start(cfg: ReplicaConfig) -> io::Result<ReplicaServer> {
        if taken_over(&cfg.store) {
            return Err(io::Error::other(format!(
                "{}: a takeover made this replica's image the primary's ({} exists); a new \
                 replica needs a new store and image",
                cfg.store.display(),
                cfg.store.join(FENCED_FILE).display()
            )));
        }
        let image = ReplicaImage::open(&cfg.image)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", cfg.image.display())))?;
        std::fs::create_dir_all(&cfg.store)?;
        let image_path = std::fs::canonicalize(&cfg.image)?;
        let dirty = match &cfg.dirty_log {
            Some(p) => {
                let existed = p.exists();
                let log = DirtyLog::open(p, image.size(), Default::default())
                    .map_err(io::Error::other)?;
                log::info!(
                    "replica: dirty log {} {}: {} of {} blocks dirty",
                    p.display(),
                    if existed { "read" } else { "created" },
                    log.dirty_blocks(),
                    log.image_blocks()
                );
                let runs = log.runs();
                let lineage = log.lineage();
                log.close().map_err(io::Error::other)?;
                Some(DirtySource {
                    path: p.clone(),
                    runs,
                    lineage,
                    valid: existed,
                })
            }
            None => None,
        };
        // An image is taken to be a copy of the primary's (the operator made it so, or both
        // start empty) unless an initial sync into it was interrupted, or it is a failback
        // target (it has a dirty log from its time as the primary).
        let in_sync = dirty.as_ref().is_none_or(|d| !d.valid)
            && replica_image(&cfg.store)?
                .filter(|r| r.image == image_path)
                .is_none_or(|r| r.in_sync);
        let dirty_log = match &cfg.dirty_log {
            Some(p) => Some(std::fs::canonicalize(p)?),
            None => None,
        };
        let record = ReplicaRecord {
            format: 1,
            image: image_path,
            size: image.size(),
            in_sync,
            dirty_log,
        };
        save_record(&cfg.store, &record)?;
        drop(ApplyLock::take(&cfg.store)?);
        let listener = cfg.listen.bind()?;
        let addr = listener.local_addr()?;
        log::info!(
            "replica: feeding {} ({} bytes) from {addr}",
            record.image.display(),
            record.size
        );
        let shared = Arc::new(Shared {
            record: Mutex::new(record),
            cfg,
            image: Mutex::new(image),
            stats: Mutex::new(ReplicaStats::default()),
            current: Mutex::new(None),
            stop: AtomicBool::new(false),
            dirty: Mutex::new(dirty),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("replica-accept".into())
            .spawn(move || accept_loop(&s, listener))?;
        Ok(ReplicaServer {
            shared,
            addr,
            thread: Some(thread),
        })
    }

    /// The address bound (the real port when asked for port 0).
    pub fn addr(&self) -> &StandbyAddr {
        &self.addr
    }

    pub fn stats(&self) -> ReplicaStats {
        lock(&self.shared.stats).clone()
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(c) = lock(&self.shared.current).take() {
            c.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(shared: &Arc<Shared>, listener: Listener) {
    while !shared.stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: listener.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; 100 ms so that a stop is seen.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("replica: accept: {e}");
                continue;
            }
        };
        let Ok(clone) = conn.try_clone() else {
            continue;
        };
        if let Some(old) = lock(&shared.current).replace(clone) {
            log::info!("replica: a new primary connection replaces the previous one");
            old.shutdown();
        }
        lock(&shared.stats).connections += 1;
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("replica-conn".into())
            .spawn(move || {
                let mut conn = conn;
                if let Err(e) = serve(&s, &mut conn) {
                    log::warn!("replica: connection ended: {e}");
                }
                // `current` may hold a clone: close for real, so the peer sees the end.
                conn.shutdown();
            });
        if let Err(e) = spawned {
            log::error!("replica: cannot start a connection thread: {e}");
        }
    }
}

fn refuse(conn: &mut Conn, shared: &Shared, reason: String) -> io::Result<()> {
    log::warn!("replica: refused: {reason}");
    {
        let mut st = lock(&shared.stats);
        st.refused += 1;
        st.last_error = Some(reason.clone());
    }
    protocol::write_frame(conn, MsgType::Refused, reason.as_bytes())
}

/// Reads the next frame header; an idle connection may wait forever, a started frame not.
fn next_header(conn: &mut Conn) -> Result<Option<protocol::Header>, ProtoError> {
    match protocol::read_header(conn) {
        Ok(h) => Ok(Some(h)),
        Err(ProtoError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

fn serve(shared: &Shared, conn: &mut Conn) -> Result<(), ProtoError> {
    let io_timeout = Some(shared.cfg.io_timeout);
    conn.set_timeouts(io_timeout)?;
    let mut body = Vec::new();
    let Some(h) = next_header(conn)? else {
        return Ok(());
    };
    if h.kind != MsgType::Hello {
        refuse(conn, shared, format!("expected HELLO, got {:?}", h.kind))?;
        return Ok(());
    }
    protocol::read_body(conn, &h, 64, &mut body)?;
    let (session, size, flags) = protocol::parse_hello(&body)?;
    let (my_size, last) = {
        let img = lock(&shared.image);
        let st = lock(&shared.stats);
        (img.size(), st.last_applied.map(|(_, e)| e))
    };
    if taken_over(&shared.cfg.store) {
        refuse(conn, shared, "fenced: the standby took over".into())?;
        return Ok(());
    }
    if size != my_size {
        refuse(
            conn,
            shared,
            format!("primary image is {size} bytes, the replica's {my_size}"),
        )?;
        return Ok(());
    }
    let dirty_set = if flags & protocol::HELLO_WANT_DIRTY != 0 {
        match &*lock(&shared.dirty) {
            Some(d) if d.valid => Some((d.lineage, d.runs.clone())),
            Some(d) => {
                let why = format!(
                    "a dirty resync needs this host's dirty log, and {} did not exist when the \
                     replica service started: which blocks differ is unknown (use \
                     --replica-resync full)",
                    d.path.display()
                );
                refuse(conn, shared, why)?;
                return Ok(());
            }
            None => {
                refuse(
                    conn,
                    shared,
                    "a dirty resync needs the replica's dirty log (ft-standby \
                     --replica-dirty-log): without it which blocks differ is unknown (use \
                     --replica-resync full)"
                        .into(),
                )?;
                return Ok(());
            }
        }
    } else {
        None
    };
    protocol::write_frame(conn, MsgType::Welcome, &protocol::welcome(my_size, last))?;
    if let Some((lineage, runs)) = dirty_set {
        let blocks: u64 = runs.iter().map(|r| r.1).sum();
        log::info!(
            "replica: sending this image's dirty set ({blocks} blocks, lineage {lineage:016x}) \
             for a failback"
        );
        let body = protocol::dirty_set(my_size, lineage, &runs);
        protocol::write_frame(conn, MsgType::Dirty, &body)?;
    }
    log::info!("replica: primary (session {session:016x}) connected");
    loop {
        // Idle between epochs: no timeout (the primary commits only when it has writes).
        conn.set_read_timeout(None)?;
        let Some(h) = next_header(conn)? else {
            return Ok(());
        };
        conn.set_read_timeout(io_timeout)?;
        if h.kind != MsgType::Epoch {
            refuse(conn, shared, format!("expected EPOCH, got {:?}", h.kind))?;
            return Ok(());
        }
        if let Err(e) = protocol::read_body(conn, &h, shared.cfg.max_epoch_bytes, &mut body) {
            if !matches!(e, ProtoError::Io(_)) {
                refuse(conn, shared, e.to_string())?;
            }
            return Err(e);
        }
        let view = EpochView::parse(&body)?;
        match apply(shared, &view) {
            Ok(duplicate) => {
                protocol::write_frame(conn, MsgType::Ack, &protocol::ack(view.epoch, duplicate))?;
            }
            Err(reason) => {
                refuse(conn, shared, reason)?;
                return Ok(());
            }
        }
    }
}

fn set_in_sync(shared: &Shared, in_sync: bool) -> Result<(), String> {
    let mut r = lock(&shared.record);
    if r.in_sync != in_sync {
        r.in_sync = in_sync;
        save_record(&shared.cfg.store, &r).map_err(|e| format!("{RECORD_FILE}: {e}"))?;
    }
    Ok(())
}

/// Applies `view` under the lock after checking fence and order; true for a duplicate.
fn apply(shared: &Shared, view: &EpochView<'_>) -> Result<bool, String> {
    let mut img = lock(&shared.image);
    let _applying = ApplyLock::take(&shared.cfg.store).map_err(|e| format!("lock: {e}"))?;
    if taken_over(&shared.cfg.store) {
        return Err(format!(
            "epoch {}: fenced: the standby took over",
            view.epoch
        ));
    }
    let this = (view.session, view.epoch);
    let last = lock(&shared.stats)
        .last_applied
        .filter(|(session, _)| *session == view.session);
    if let Some(last) = last {
        if this == last {
            lock(&shared.stats).duplicates += 1;
            log::info!(
                "replica: epoch {} again (ack was lost): not re-applied",
                view.epoch
            );
            return Ok(true);
        }
        if this < last {
            return Err(format!(
                "epoch {} is older than the applied epoch {} of this primary",
                view.epoch, last.1
            ));
        }
    }
    let (sync_start, sync_done) = view.ops().flatten().fold((false, None), |(s, d), op| {
        let done = match op {
            Op::SyncDone { lineage } => Some(lineage),
            _ => d,
        };
        (s || op == Op::SyncStart, done)
    });
    // Durably out of sync before the first byte of an initial sync lands.
    if sync_start {
        set_in_sync(shared, false)?;
        log::info!("replica: initial sync starts");
    }
    let applied = img.apply(view).map_err(|e| {
        let msg = format!("epoch {}: {e}", view.epoch);
        log::error!("replica: {msg}");
        msg
    })?;
    // In sync only once the last chunk is applied and synced; this image's own dirty blocks are
    // then all overwritten, so its log is emptied first (a crash in between: empty log, not in
    // sync, and the next resync copies the primary's dirty set again).
    if let Some(lineage) = sync_done {
        if let Some(d) = &mut *lock(&shared.dirty) {
            DirtyLog::open(&d.path, img.size(), Default::default())
                .and_then(|mut log| {
                    log.reset()?;
                    log.set_lineage(lineage)?;
                    log.close()
                })
                .map_err(|e| format!("epoch {}: {e}", view.epoch))?;
            d.runs.clear();
            d.lineage = lineage;
            d.valid = true;
        }
        set_in_sync(shared, true)?;
        log::info!("replica: initial sync done: the image is a copy of the primary's");
    }
    let mut st = lock(&shared.stats);
    st.last_applied = Some(this);
    st.epochs_applied += 1;
    st.bytes_applied += applied.bytes;
    st.last_error = None;
    log::debug!(
        "replica: epoch {} applied: {} ops, {} bytes, apply {:?}, fdatasync {:?}",
        view.epoch,
        applied.ops,
        applied.bytes,
        applied.apply,
        applied.fdatasync
    );
    Ok(false)
}
