// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The primary's end of replication (`vhost-user-blk-ft --replicate-to ADDR`): one epoch at a
//! time, shipped and acknowledged before any of its requests completes towards the guest.
//!
//! Use from the commit path: build the epoch into [`ReplicaLink::frame`] (`begin`, ops in guest
//! order, `finish`), [`ReplicaLink::send`] it (best effort: a failure only means the wait below
//! re-sends it), execute the epoch locally, then [`ReplicaLink::wait_ack`]. Until that returns
//! `Ok`, the frame stays in the link (the unacknowledged epoch) and a later `wait_ack`
//! reconnects and sends it again: at most one epoch is ever buffered, so the memory the link
//! holds is bounded by one epoch (the daemon's held-bytes limit): the lag limit is one epoch,
//! and the backpressure is the held-request queue that fills while the epoch waits.

use super::protocol::{self, EpochFrame, MsgType, ProtoError};
use crate::epoch::Epoch;
use crate::standby::protocol::{Conn, StandbyAddr};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The primary's view of its replica, in the block daemon's STATUS (`ftctl status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Where the replica service listens.
    pub target: String,
    pub connected: bool,
    /// Newest epoch the replica acknowledged (applied and synced).
    pub last_acked: Option<Epoch>,
    /// The epoch shipped and not yet acknowledged (its requests wait for the ack).
    pub unacked_epoch: Option<Epoch>,
    pub unacked_bytes: u64,
    pub epochs_acked: u64,
    pub bytes_acked: u64,
    /// Send to acknowledgement of the newest acknowledged epoch, microseconds.
    pub last_ack_us: u64,
    pub reconnects: u64,
    /// The newest failure (cleared by the next acknowledgement).
    pub error: Option<String>,
    /// Whether the replica's image is a copy of the primary's: false while an initial sync
    /// runs (`--replica-initial-sync`), true once its last chunk was acknowledged.
    #[serde(default)]
    pub in_sync: bool,
    /// Progress of the initial sync, if one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncProgress>,
}

/// How far the initial sync is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncProgress {
    /// Bytes of the image shipped and acknowledged.
    pub copied_bytes: u64,
    pub total_bytes: u64,
    pub percent: u32,
    /// Since the sync started.
    pub rate_kib_s: u64,
    /// Chunks that were all zeroes (shipped as a 24-byte WRITE_ZEROES op).
    pub zero_chunks: u64,
    /// `full` (initial sync: the whole image) or `dirty` (failback: the dirty blocks only).
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub image_bytes: u64,
    /// 4 KiB blocks copied and acknowledged, of `blocks_total` to copy (`dirty`: known once
    /// the replica's dirty set arrived), of `image_blocks` in the image.
    #[serde(default)]
    pub blocks_copied: u64,
    #[serde(default)]
    pub blocks_total: u64,
    #[serde(default)]
    pub image_blocks: u64,
    /// The last chunk was acknowledged: the replica is in sync.
    #[serde(default)]
    pub done: bool,
    /// Milliseconds since the copy started (until it finished).
    #[serde(default)]
    pub elapsed_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("replica {target}: epoch {epoch} not acknowledged within {waited:?}: {last}")]
    NotAcked {
        target: String,
        epoch: Epoch,
        waited: Duration,
        last: String,
    },
}

/// A session number no other daemon start is likely to draw (time, pid and an address mixed).
fn new_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

pub struct ReplicaLink {
    addr: StandbyAddr,
    image_size: u64,
    timeout: Duration,
    conn: Option<Conn>,
    frame: EpochFrame,
    /// Drawn at start: the replica orders epochs within a session.
    session: u64,
    /// Whether `frame` went out on `conn`.
    sent_at: Option<Instant>,
    status: ReplicaStatus,
    body: Vec<u8>,
    /// Ask the replica for its dirty set at the next connection (until one arrived).
    want_dirty: bool,
    /// The lineage of this side's dirty log: the replica's must be the same.
    lineage: u64,
    dirty_set: Option<Vec<(u64, u64)>>,
}

impl ReplicaLink {
    /// A link to `addr` for an image of `image_size` bytes; connects lazily. `timeout` bounds
    /// each wait for an acknowledgement (keep it below the coordinator's call timeout).
    pub fn new(addr: StandbyAddr, image_size: u64, timeout: Duration) -> ReplicaLink {
        ReplicaLink {
            status: ReplicaStatus {
                target: addr.to_string(),
                ..Default::default()
            },
            addr,
            image_size,
            timeout,
            conn: None,
            frame: EpochFrame::default(),
            session: new_session(),
            sent_at: None,
            body: Vec::new(),
            want_dirty: false,
            lineage: 0,
            dirty_set: None,
        }
    }

    /// Asks the replica for its dirty set (failback, `--replica-resync dirty`) when connecting;
    /// [`ReplicaLink::take_dirty_set`] hands it out once it arrived. The replica's log must be
    /// of `lineage` (this side's: both descend from the same sync), or the connection is refused.
    pub fn want_dirty_set(&mut self, lineage: u64) {
        self.want_dirty = true;
        self.lineage = lineage;
    }

    /// The replica's dirty runs (first block, blocks), once, after they arrived.
    pub fn take_dirty_set(&mut self) -> Option<Vec<(u64, u64)>> {
        self.dirty_set.take()
    }

    /// Connects now (at startup, to report a wrong address early); errors are in the status.
    pub fn try_connect(&mut self) {
        if let Err(e) = self.connect(Instant::now() + self.timeout) {
            self.fail(e);
        }
    }

    /// The epoch being built or waiting for its acknowledgement.
    pub fn frame(&mut self) -> &mut EpochFrame {
        &mut self.frame
    }

    /// Starts building `epoch` (the previous one must have been acknowledged).
    pub fn begin(&mut self, epoch: Epoch) -> &mut EpochFrame {
        debug_assert!(self.frame.epoch().is_none(), "unacknowledged epoch dropped");
        self.sent_at = None;
        self.frame.begin(self.session, epoch);
        &mut self.frame
    }

    /// The epoch shipped and not yet acknowledged, if any.
    pub fn unacked(&self) -> Option<Epoch> {
        self.frame.epoch()
    }

    pub fn status(&self) -> ReplicaStatus {
        let mut s = self.status.clone();
        s.connected = self.conn.is_some();
        s.unacked_epoch = self.frame.epoch();
        s.unacked_bytes = if s.unacked_epoch.is_some() {
            self.frame.data_bytes()
        } else {
            0
        };
        s
    }

    /// Drops the unacknowledged epoch without waiting (the daemon was deposed: ABORT).
    pub fn forget(&mut self) {
        self.frame.clear();
        self.sent_at = None;
    }

    fn fail(&mut self, e: String) {
        if self.status.error.as_deref() != Some(&e) {
            log::warn!("replica {}: {e}", self.status.target);
        }
        self.status.error = Some(e);
        if let Some(c) = self.conn.take() {
            c.shutdown();
        }
        self.sent_at = None;
    }

    fn connect(&mut self, deadline: Instant) -> Result<(), String> {
        if self.conn.is_some() {
            return Ok(());
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let mut c = self
            .addr
            .connect(left)
            .map_err(|e| format!("connect: {e}"))?;
        let flags = if self.want_dirty {
            protocol::HELLO_WANT_DIRTY
        } else {
            0
        };
        let hello = protocol::hello(self.session, self.image_size, flags);
        let talk = |c: &mut Conn, body: &mut Vec<u8>| -> Result<(u64, Option<Epoch>), String> {
            protocol::write_frame(c, MsgType::Hello, &hello).map_err(|e| format!("HELLO: {e}"))?;
            let h = protocol::read_header(c).map_err(|e| format!("WELCOME: {e}"))?;
            protocol::read_body(c, &h, 1 << 16, body).map_err(|e| format!("WELCOME: {e}"))?;
            match h.kind {
                MsgType::Welcome => protocol::parse_welcome(body).map_err(|e| e.to_string()),
                MsgType::Refused => Err(format!("refused: {}", String::from_utf8_lossy(body))),
                k => Err(format!("expected WELCOME, got {k:?}")),
            }
        };
        let (size, last) = talk(&mut c, &mut self.body)?;
        if size != self.image_size {
            return Err(format!(
                "replica image is {size} bytes, this image {}",
                self.image_size
            ));
        }
        if self.want_dirty {
            let h = protocol::read_header(&mut c).map_err(|e| format!("DIRTY: {e}"))?;
            let max = protocol::max_dirty_body(self.image_size);
            protocol::read_body(&mut c, &h, max, &mut self.body)
                .map_err(|e| format!("DIRTY: {e}"))?;
            let (lineage, runs) = match h.kind {
                MsgType::Dirty => protocol::parse_dirty_set(&self.body, self.image_size)
                    .map_err(|e| format!("DIRTY: {e}"))?,
                MsgType::Refused => {
                    return Err(format!("refused: {}", String::from_utf8_lossy(&self.body)))
                }
                k => return Err(format!("expected DIRTY, got {k:?}")),
            };
            if lineage != self.lineage {
                return Err(format!(
                    "refused: the replica's dirty log is of lineage {lineage:016x}, this side's \
                     {:016x}: the images do not descend from the same sync, so the dirty sets \
                     do not cover their differences (use --replica-resync full)",
                    self.lineage
                ));
            }
            log::info!(
                "replica {}: its dirty set: {} blocks in {} runs",
                self.status.target,
                runs.iter().map(|r| r.1).sum::<u64>(),
                runs.len()
            );
            self.dirty_set = Some(runs);
            self.want_dirty = false;
        }
        log::info!(
            "replica {}: connected (replica's last applied epoch {last:?})",
            self.status.target
        );
        self.status.reconnects += u64::from(self.status.epochs_acked > 0 || last.is_some());
        self.conn = Some(c);
        Ok(())
    }

    /// Ships the finished frame now (connecting if needed). Best effort: on failure the frame
    /// stays and [`ReplicaLink::wait_ack`] tries again.
    pub fn send(&mut self) {
        if let Err(e) = self.try_send(Instant::now() + self.timeout) {
            self.fail(e);
        }
    }

    fn try_send(&mut self, deadline: Instant) -> Result<(), String> {
        if self.frame.epoch().is_none() || self.sent_at.is_some() {
            return Ok(());
        }
        self.connect(deadline)?;
        let c = self.conn.as_mut().expect("connected");
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        c.set_timeouts(Some(left))
            .map_err(|e| format!("socket: {e}"))?;
        let t = Instant::now();
        std::io::Write::write_all(c, self.frame.bytes()).map_err(|e| format!("send: {e}"))?;
        self.sent_at = Some(t);
        Ok(())
    }

    /// Waits (up to the link's timeout) until the replica acknowledged the unacknowledged
    /// epoch, reconnecting and re-sending as often as needed. `Ok` at once if there is none.
    pub fn wait_ack(&mut self) -> Result<Epoch, LinkError> {
        let Some(epoch) = self.frame.epoch() else {
            return Ok(self.status.last_acked.unwrap_or(Epoch(0)));
        };
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut first_error: Option<String> = None;
        loop {
            let refused = match self.try_ack(epoch, deadline) {
                Ok(()) => return Ok(epoch),
                Err(e) => {
                    // A refusal (fenced, stale, the replica's disk failing) does not go away by
                    // asking again at once; the next commit retries. Anything else (a lost or
                    // slow connection) is retried until the deadline.
                    let refused = e.starts_with("refused");
                    // The first cause is the one worth reporting, not the final timeout.
                    if first_error.is_none() || refused {
                        first_error = Some(e.clone());
                    }
                    self.fail(e);
                    refused
                }
            };
            if refused || Instant::now() >= deadline {
                self.status.error = first_error.clone();
                return Err(LinkError::NotAcked {
                    target: self.status.target.clone(),
                    epoch,
                    waited: start.elapsed(),
                    last: first_error.unwrap_or_default(),
                });
            }
            // A refused or lost connection: try again soon, within the deadline.
            std::thread::sleep(Duration::from_millis(20).min(deadline - Instant::now()));
        }
    }

    fn try_ack(&mut self, epoch: Epoch, deadline: Instant) -> Result<(), String> {
        self.try_send(deadline)?;
        let c = self.conn.as_mut().expect("connected after send");
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no acknowledgement yet".into());
        }
        c.set_read_timeout(Some(left))
            .map_err(|e| format!("socket: {e}"))?;
        let h = protocol::read_header(c).map_err(|e| match e {
            ProtoError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                "no acknowledgement yet".to_string()
            }
            e => format!("reading ACK: {e}"),
        })?;
        protocol::read_body(c, &h, 1 << 16, &mut self.body)
            .map_err(|e| format!("reading ACK: {e}"))?;
        match h.kind {
            MsgType::Ack => {
                let (e, duplicate) = protocol::parse_ack(&self.body).map_err(|e| e.to_string())?;
                if e != epoch {
                    return Err(format!("ACK of epoch {e}, expected {epoch}"));
                }
                self.status.last_ack_us =
                    self.sent_at.map_or(0, |t| t.elapsed().as_micros() as u64);
                self.status.last_acked = Some(epoch);
                self.status.epochs_acked += 1;
                self.status.bytes_acked += self.frame.data_bytes();
                self.status.error = None;
                if duplicate {
                    log::info!("replica: epoch {epoch} was already applied");
                }
                self.frame.clear();
                self.sent_at = None;
                Ok(())
            }
            MsgType::Refused => Err(format!("refused: {}", String::from_utf8_lossy(&self.body))),
            k => Err(format!("expected ACK, got {k:?}")),
        }
    }
}
