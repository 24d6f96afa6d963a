// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The commit path's hook for disk replication (`--replicate-to ADDR`): each committed batch is
//! shipped to the standby's replica service, and its requests are completed towards the guest
//! only after the replica acknowledged it (docs/architecture.md, "Disk replication").
//!
//! In a commit: [`Replication::ship`] copies the batch's writes (from guest memory: the guest
//! may not touch a buffer before its request completes) into the epoch frame and sends it
//! before the local writes start, so the replica applies while the primary writes; after the
//! local `fdatasync`, [`Replication::confirm`] waits for the acknowledgement. If it does not
//! come (replica unreachable, refused, disk full), the batch's completions are kept here
//! (`unacked`), not delivered: the guest sees nothing complete, so the output stays held; the
//! commit answers `COMMIT_FAILED`, and the next commit first retries the kept epoch
//! ([`Replication::retry`]) and takes nothing new until it is acknowledged.
//!
//! Broken guest memory: a write whose memory faulted during (or before) its copy into the frame
//! is dropped from the frame after the copy, so zeros from a fault's zero page never reach the
//! replica; the commit fails the same request without writing it (`gate::commit`).
//!
//! Bounded memory: one epoch frame and one batch of completions at most; meanwhile new writes
//! fill the held-request queue and the rings stop (backpressure), never a growing buffer.
//!
//! Initial sync (`--replica-initial-sync`, protection starting on a running VM with a replica
//! whose image is not a copy): every commit's frame starts with the next chunk of the image,
//! read from the primary's image at that moment, followed by the epoch's own ops. The image
//! then holds exactly what all earlier frames did (every write goes through a commit, and
//! commits run one at a time on this thread), and the replica applies the frames in the same
//! order, so a block written during the copy needs no dirty bitmap and no second pass: a write
//! before its chunk is read is in the chunk, a write after it follows the chunk in the stream.
//! The first chunk carries SYNC_START and the last SYNC_DONE; the replica records whether its
//! image is a copy (a takeover refuses one that is not), and STATUS reports `in_sync` only once
//! the last chunk was acknowledged. A commit happens at least every cut interval, so the copy
//! proceeds at up to one chunk per commit while the guest runs (the chunk also delays that
//! commit's completions: `--replica-sync-chunk-mib` trades sync rate against commit latency).
//!
//! Failback resync (`--replica-resync dirty`): the same stream and the same argument, but the
//! walk visits only the dirty blocks: this daemon's dirty log at start (every block written
//! since the split, [`ft_common::replica::dirty`]) united with the replica's own dirty set,
//! which it sends when the connection starts (the blocks its daemon wrote while it was the
//! primary that may not have reached this side). A run of dirty blocks (up to one chunk) goes
//! per commit; its blocks are cleared from the log when its frame is acknowledged. The status
//! reports blocks copied against the dirty total and the image size.

use crate::gate::hold::HeldReq;
use crate::image::SECTOR_SHIFT;
use crate::request::RequestKind;
use ft_common::aiocb::Aiocb;
use ft_common::epoch::Epoch;
use ft_common::replica::dirty::{next_set, DirtyLog, BLOCK_SIZE};
use ft_common::replica::{ReplicaLink, ReplicaStatus, SyncProgress};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

pub struct Replication {
    link: ReplicaLink,
    /// Completions of the shipped epoch that the replica has not acknowledged yet.
    unacked: Option<Vec<(HeldReq, u8)>>,
    sync: Option<InitialSync>,
}

/// What a resync walks.
enum Walk {
    /// The whole image (initial sync): the next offset to ship.
    Full { next: u64 },
    /// The dirty blocks (failback): this log's set at start, united with the replica's once it
    /// arrived (`set` is None until then); `cursor` is the next block to look at.
    Dirty {
        own: Vec<u64>,
        set: Option<Vec<u64>>,
        cursor: u64,
    },
}

/// The initial copy of the image, or of its dirty blocks (see the module doc).
struct InitialSync {
    /// A buffered descriptor of the primary's image (the daemon's own may be O_DIRECT).
    image: File,
    size: u64,
    chunk: usize,
    walk: Walk,
    /// Bytes to copy in all (the image size, or the dirty blocks' bytes once known).
    total: u64,
    /// Shipped in frames that were acknowledged.
    acked: u64,
    blocks_copied: u64,
    /// Shipped in the unacknowledged frame (bytes, and the blocks for the dirty walk).
    in_frame: u64,
    in_frame_blocks: Vec<(u64, u64)>,
    /// SYNC_START went out (in an acknowledged frame: `start_acked`).
    start_sent: bool,
    start_acked: bool,
    /// SYNC_DONE is in the unacknowledged frame; `done` once it was acknowledged.
    done_in_frame: bool,
    done: bool,
    started: Option<Instant>,
    /// How long the copy took, once done.
    took: Option<std::time::Duration>,
    zero_chunks: u64,
    buf: Vec<u8>,
    /// Drawn with SYNC_DONE: both sides' dirty logs record it ([`DirtyLog::lineage`]).
    lineage: u64,
}

/// A lineage no other sync is likely to draw (never 0, a new log's).
fn new_lineage() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// The bytes blocks `[b, b+n)` cover in an image of `size` bytes.
fn block_bytes(b: u64, n: u64, size: u64) -> u64 {
    ((b + n) * BLOCK_SIZE).min(size) - (b * BLOCK_SIZE).min(size)
}

/// The byte range a request changes on the image (none for FLUSH and reads).
pub fn changed_range(req: &crate::request::BlkRequest) -> Option<(u64, u64)> {
    match req.kind() {
        RequestKind::Write { .. } => Some((req.offset(), u64::from(req.data_len()))),
        RequestKind::Discard { sectors, .. } | RequestKind::WriteZeroes { sectors, .. } => {
            Some((req.offset(), u64::from(sectors) << SECTOR_SHIFT))
        }
        _ => None,
    }
}

impl Replication {
    pub fn new(mut link: ReplicaLink) -> Replication {
        link.try_connect();
        Replication {
            link,
            unacked: None,
            sync: None,
        }
    }

    fn new_sync(image: File, size: u64, chunk: usize, walk: Walk) -> InitialSync {
        InitialSync {
            image,
            size,
            chunk: chunk.max(BLOCK_SIZE as usize),
            total: if matches!(walk, Walk::Full { .. }) {
                size
            } else {
                0
            },
            walk,
            acked: 0,
            blocks_copied: 0,
            in_frame: 0,
            in_frame_blocks: Vec::new(),
            start_sent: false,
            start_acked: false,
            done_in_frame: false,
            done: false,
            started: None,
            took: None,
            zero_chunks: 0,
            buf: Vec::new(),
            lineage: 0,
        }
    }

    /// Copies the whole image (read through `image`, `size` bytes) to the replica, one chunk of
    /// `chunk` bytes per commit, before the replica counts as in sync.
    pub fn with_initial_sync(mut self, image: File, size: u64, chunk: usize) -> Replication {
        self.sync = Some(Self::new_sync(image, size, chunk, Walk::Full { next: 0 }));
        self
    }

    /// Failback: copies only the dirty blocks, those of `own` (this daemon's dirty log at start,
    /// one bit per block) and those the replica reports (the link must have been told to ask
    /// for them, [`ReplicaLink::want_dirty_set`], before [`Replication::new`]).
    pub fn with_dirty_resync(
        mut self,
        image: File,
        size: u64,
        chunk: usize,
        own: Vec<u64>,
    ) -> Replication {
        let walk = Walk::Dirty {
            own,
            set: None,
            cursor: 0,
        };
        self.sync = Some(Self::new_sync(image, size, chunk, walk));
        self
    }

    /// Whether an earlier epoch still waits for its acknowledgement.
    pub fn blocked(&self) -> Option<Epoch> {
        self.unacked.as_ref().and(self.link.unacked())
    }

    /// Ships `batch` (guest order) as `epoch`. Nothing is shipped for a batch without output.
    pub fn ship(&mut self, epoch: Epoch, batch: &[Aiocb<HeldReq>]) {
        if let Some(s) = &mut self.sync {
            if let Some(runs) = self.link.take_dirty_set() {
                s.unite(runs);
            }
        }
        let syncing = self.sync.as_ref().is_some_and(InitialSync::wants_chunk);
        if batch.is_empty() && !syncing {
            return;
        }
        let frame = self.link.begin(epoch);
        if let Some(s) = self.sync.as_mut().filter(|_| syncing) {
            s.add_chunk(frame);
        }
        for a in batch {
            let req = &a.payload().req;
            let offset = req.offset();
            match req.kind() {
                RequestKind::Write { .. } => {
                    // SAFETY: a held request's iovecs point into guest memory the request
                    // keeps mapped (`BlkRequest::hold_memory`) and that the guest may not
                    // reuse before the request completes, which happens after this.
                    let segs = req.iovecs().iter().map(|v| unsafe {
                        std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                    });
                    let mark = frame.mark();
                    frame.write(offset, segs);
                    // Checked after the copy: a fault during it (ours, or another thread's
                    // on the same page) is recorded before its zero page is mapped, so data
                    // read from a zero page is never shipped. The commit fails the request
                    // for the same reason and never writes it locally either.
                    if req.memory_broken() {
                        frame.truncate(mark);
                    }
                }
                RequestKind::Discard { sectors, .. } => {
                    frame.discard(offset, u64::from(sectors) << SECTOR_SHIFT)
                }
                RequestKind::WriteZeroes { sectors, unmap, .. } => {
                    frame.write_zeroes(offset, u64::from(sectors) << SECTOR_SHIFT, unmap)
                }
                RequestKind::Flush => frame.flush(),
                RequestKind::Read { .. } | RequestKind::GetId => {}
            }
        }
        frame.finish();
        self.link.send();
    }

    /// After the local commit: waits for the shipped epoch's acknowledgement. `Ok(done)`: the
    /// completions may go to the guest. `Err`: they are kept (see the module doc). The
    /// acknowledged epoch's blocks are clean again in `log`.
    pub fn confirm(
        &mut self,
        done: Vec<(HeldReq, u8)>,
        mut log: Option<&mut DirtyLog>,
    ) -> Result<Vec<(HeldReq, u8)>, String> {
        match self.link.wait_ack() {
            Ok(epoch) => {
                if let Some(l) = log.as_deref_mut() {
                    l.ack(epoch);
                }
                if let Some(s) = &mut self.sync {
                    s.acked += std::mem::take(&mut s.in_frame);
                    s.start_acked |= s.start_sent;
                    for (b, n) in s.in_frame_blocks.drain(..) {
                        s.blocks_copied += n;
                        if let Some(l) = log.as_deref_mut() {
                            l.clear(b, n);
                        }
                    }
                    if std::mem::take(&mut s.done_in_frame) {
                        s.finished(log);
                    }
                }
                Ok(done)
            }
            Err(e) => {
                self.unacked = Some(done);
                Err(e.to_string())
            }
        }
    }

    /// Retries the kept epoch: its completions once acknowledged (empty if none was kept).
    pub fn retry(&mut self, log: Option<&mut DirtyLog>) -> Result<Vec<(HeldReq, u8)>, String> {
        let Some(done) = self.unacked.take() else {
            return Ok(Vec::new());
        };
        self.confirm(done, log)
    }

    /// ABORT: the kept epoch is dropped; its requests are forgotten, never completed (and its
    /// blocks stay dirty in `log`: they may have reached this image and not the replica's).
    pub fn forget(&mut self, log: Option<&mut DirtyLog>) -> Vec<HeldReq> {
        self.link.forget();
        if let Some(l) = log {
            l.forget_pending();
        }
        if let Some(s) = &mut self.sync {
            // The chunk in the dropped frame was never applied: copy it again.
            let bytes = std::mem::take(&mut s.in_frame);
            match &mut s.walk {
                Walk::Full { next } => *next -= bytes,
                Walk::Dirty { cursor, .. } => {
                    if let Some(&(b, _)) = s.in_frame_blocks.first() {
                        *cursor = b;
                    }
                    s.in_frame_blocks.clear();
                }
            }
            s.done_in_frame = false;
            if !s.start_acked {
                s.start_sent = false;
            }
        }
        self.unacked
            .take()
            .map(|v| v.into_iter().map(|(h, _)| h).collect())
            .unwrap_or_default()
    }

    pub fn status(&self) -> ReplicaStatus {
        let mut st = self.link.status();
        st.in_sync = self.sync.as_ref().is_none_or(|s| s.done);
        st.sync = self.sync.as_ref().map(|s| {
            let secs = s
                .took
                .or(s.started.map(|t| t.elapsed()))
                .map_or(0.0, |d| d.as_secs_f64());
            let dirty = matches!(s.walk, Walk::Dirty { .. });
            SyncProgress {
                copied_bytes: s.acked,
                total_bytes: s.total,
                percent: if s.done {
                    100
                } else {
                    (s.acked.saturating_mul(100) / s.total.max(1)) as u32
                },
                rate_kib_s: if secs > 0.0 {
                    (s.acked as f64 / 1024.0 / secs) as u64
                } else {
                    0
                },
                zero_chunks: s.zero_chunks,
                mode: if dirty { "dirty" } else { "full" }.into(),
                image_bytes: s.size,
                blocks_copied: if dirty {
                    s.blocks_copied
                } else {
                    s.acked.div_ceil(BLOCK_SIZE)
                },
                blocks_total: s.total_blocks(),
                image_blocks: s.size.div_ceil(BLOCK_SIZE),
                done: s.done,
                elapsed_ms: (secs * 1000.0) as u64,
            }
        });
        st
    }
}

impl InitialSync {
    fn total_blocks(&self) -> u64 {
        match &self.walk {
            Walk::Full { .. } => self.size.div_ceil(BLOCK_SIZE),
            Walk::Dirty { set, .. } => set
                .as_ref()
                .map_or(0, |s| s.iter().map(|w| u64::from(w.count_ones())).sum()),
        }
    }

    /// The replica's dirty runs arrived: the set to copy is ours united with them.
    fn unite(&mut self, runs: Vec<(u64, u64)>) {
        let size = self.size;
        let Walk::Dirty { own, set, .. } = &mut self.walk else {
            return;
        };
        if set.is_some() {
            return;
        }
        let mut bits = std::mem::take(own);
        for (s, n) in runs {
            for b in s..s + n {
                bits[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
        let nblocks = size.div_ceil(BLOCK_SIZE);
        let mut total = 0;
        let mut b = 0;
        while let Some(x) = next_set(&bits, nblocks, b) {
            total += block_bytes(x, 1, size);
            b = x + 1;
        }
        self.total = total;
        *set = Some(bits);
        log::info!(
            "replica: failback resync of {} blocks ({total} bytes) of {nblocks} ({size} bytes)",
            self.total_blocks()
        );
    }

    /// Whether the next frame should carry a chunk (or the closing SYNC_DONE).
    fn wants_chunk(&self) -> bool {
        let ready = match &self.walk {
            Walk::Full { .. } => true,
            Walk::Dirty { set, .. } => set.is_some(),
        };
        ready && !self.done && !self.done_in_frame
    }

    /// The copy is complete and acknowledged.
    fn finished(&mut self, log: Option<&mut DirtyLog>) {
        self.done = true;
        let took = self.started.take().map(|t| t.elapsed()).unwrap_or_default();
        self.took = Some(took);
        let full = matches!(self.walk, Walk::Full { .. });
        if full {
            log::info!(
                "replica: initial sync done ({} bytes in {took:?}): in sync",
                self.size
            );
        } else {
            log::info!(
                "replica: failback resync done: {} blocks ({} bytes) copied of {} in the image \
                 ({} bytes) in {took:?}: in sync",
                self.blocks_copied,
                self.acked,
                self.size.div_ceil(BLOCK_SIZE),
                self.size
            );
        }
        if let Some(l) = log {
            // Full: everything is equal now. Dirty: the copied blocks were cleared as their
            // frames were acknowledged; write the exact set down.
            // Both sides' logs now descend from this sync (the replica recorded the lineage
            // before its acknowledgement).
            let r = if full { l.reset() } else { l.flush() };
            if let Err(e) = r.and_then(|()| l.set_lineage(self.lineage)) {
                log::error!("replica: after the resync: {e}");
            }
        }
    }

    /// The next chunk into `frame`: WRITE of its bytes, or WRITE_ZEROES (unmap) if all zero;
    /// for the dirty walk, runs of dirty blocks up to a chunk's worth, one op each. SYNC_START
    /// before the first, SYNC_DONE after the last.
    fn add_chunk(&mut self, frame: &mut ft_common::replica::protocol::EpochFrame) {
        if !self.start_sent {
            frame.sync_start();
            self.start_sent = true;
            if self.started.is_none() {
                self.started = Some(Instant::now());
                log::info!("replica: {} of {} bytes starts", self.what(), self.total);
            }
        }
        let nblocks = self.size.div_ceil(BLOCK_SIZE);
        let mut budget = self.chunk as u64 / BLOCK_SIZE;
        loop {
            // The next piece: (offset, len) and, for the dirty walk, its blocks.
            let (offset, len, run) = match &self.walk {
                Walk::Full { next } => {
                    if *next >= self.size || budget == 0 {
                        break;
                    }
                    let len = (self.size - next).min(self.chunk as u64);
                    (*next, len, None)
                }
                Walk::Dirty { set, cursor, .. } => {
                    let set = set.as_ref().expect("wants_chunk checked");
                    let Some(s) = next_set(set, nblocks, *cursor).filter(|_| budget > 0) else {
                        break;
                    };
                    let mut e = s + 1;
                    while e < nblocks
                        && e - s < budget
                        && set[(e / 64) as usize] & (1 << (e % 64)) != 0
                    {
                        e += 1;
                    }
                    let len = block_bytes(s, e - s, self.size);
                    (s * BLOCK_SIZE, len, Some((s, e - s)))
                }
            };
            self.buf.resize(len as usize, 0);
            if let Err(e) = self.image.read_exact_at(&mut self.buf, offset) {
                // Not shipped: the replica stays out of sync and this piece is tried again.
                log::error!(
                    "replica: {}: reading the image at {offset}: {e}",
                    self.what()
                );
                return;
            }
            if self.buf.iter().all(|&b| b == 0) {
                frame.write_zeroes(offset, len, true);
                self.zero_chunks += 1;
            } else {
                frame.write(offset, [&self.buf[..]].into_iter());
            }
            self.in_frame += len;
            match (&mut self.walk, run) {
                (Walk::Full { next }, _) => {
                    *next += len;
                    budget = 0;
                }
                (Walk::Dirty { cursor, .. }, Some((s, n))) => {
                    *cursor = s + n;
                    budget -= n;
                    self.in_frame_blocks.push((s, n));
                }
                (Walk::Dirty { .. }, None) => unreachable!("a dirty piece has its blocks"),
            }
        }
        let last = match &self.walk {
            Walk::Full { next } => *next >= self.size,
            Walk::Dirty { set, cursor, .. } => {
                next_set(set.as_ref().expect("set"), nblocks, *cursor).is_none()
            }
        };
        if last {
            self.lineage = new_lineage();
            frame.sync_done(self.lineage);
            self.done_in_frame = true;
        }
    }

    fn what(&self) -> &'static str {
        match self.walk {
            Walk::Full { .. } => "initial sync",
            Walk::Dirty { .. } => "failback resync",
        }
    }
}
