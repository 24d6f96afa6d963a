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

use crate::gate::hold::HeldReq;
use crate::image::SECTOR_SHIFT;
use crate::request::RequestKind;
use ft_common::aiocb::Aiocb;
use ft_common::epoch::Epoch;
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

/// The initial copy of the image (see the module doc).
struct InitialSync {
    /// A buffered descriptor of the primary's image (the daemon's own may be O_DIRECT).
    image: File,
    size: u64,
    chunk: usize,
    /// Next offset to ship; `size` once the last chunk is in a frame.
    next: u64,
    /// Shipped in frames that were acknowledged.
    acked: u64,
    /// Shipped in the unacknowledged frame.
    in_frame: u64,
    started: Option<Instant>,
    /// How long the copy took, once done.
    took: Option<std::time::Duration>,
    zero_chunks: u64,
    buf: Vec<u8>,
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

    /// Copies the whole image (read through `image`, `size` bytes) to the replica, one chunk of
    /// `chunk` bytes per commit, before the replica counts as in sync.
    pub fn with_initial_sync(mut self, image: File, size: u64, chunk: usize) -> Replication {
        self.sync = Some(InitialSync {
            image,
            size,
            chunk: chunk.max(4096),
            next: 0,
            acked: 0,
            in_frame: 0,
            started: None,
            took: None,
            zero_chunks: 0,
            buf: Vec::new(),
        });
        self
    }

    /// Whether an earlier epoch still waits for its acknowledgement.
    pub fn blocked(&self) -> Option<Epoch> {
        self.unacked.as_ref().and(self.link.unacked())
    }

    /// Ships `batch` (guest order) as `epoch`. Nothing is shipped for a batch without output.
    pub fn ship(&mut self, epoch: Epoch, batch: &[Aiocb<HeldReq>]) {
        let syncing = self.sync.as_ref().is_some_and(|s| s.next < s.size);
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
    /// completions may go to the guest. `Err`: they are kept (see the module doc).
    pub fn confirm(&mut self, done: Vec<(HeldReq, u8)>) -> Result<Vec<(HeldReq, u8)>, String> {
        match self.link.wait_ack() {
            Ok(_) => {
                if let Some(s) = &mut self.sync {
                    s.acked += std::mem::take(&mut s.in_frame);
                    // (`started` is taken only once the copy is complete.)
                    if let Some(t) = s.started.filter(|_| s.acked == s.size) {
                        s.started = None;
                        let took = t.elapsed();
                        log::info!(
                            "replica: initial sync done ({} bytes in {took:?}): in sync",
                            s.size
                        );
                        s.took = Some(took);
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
    pub fn retry(&mut self) -> Result<Vec<(HeldReq, u8)>, String> {
        let Some(done) = self.unacked.take() else {
            return Ok(Vec::new());
        };
        self.confirm(done)
    }

    /// ABORT: the kept epoch is dropped; its requests are forgotten, never completed.
    pub fn forget(&mut self) -> Vec<HeldReq> {
        self.link.forget();
        if let Some(s) = &mut self.sync {
            // The chunk in the dropped frame was never applied: copy it again.
            s.next -= std::mem::take(&mut s.in_frame);
        }
        self.unacked
            .take()
            .map(|v| v.into_iter().map(|(h, _)| h).collect())
            .unwrap_or_default()
    }

    pub fn status(&self) -> ReplicaStatus {
        let mut st = self.link.status();
        st.in_sync = self.sync.as_ref().is_none_or(|s| s.acked == s.size);
        st.sync = self.sync.as_ref().map(|s| {
            let secs = s
                .took
                .or(s.started.map(|t| t.elapsed()))
                .map_or(0.0, |d| d.as_secs_f64());
            SyncProgress {
                copied_bytes: s.acked,
                total_bytes: s.size,
                percent: (s.acked.saturating_mul(100) / s.size.max(1)) as u32,
                rate_kib_s: if secs > 0.0 {
                    (s.acked as f64 / 1024.0 / secs) as u64
                } else {
                    0
                },
                zero_chunks: s.zero_chunks,
            }
        });
        st
    }
}

impl InitialSync {
    /// The next chunk into `frame`: WRITE of its bytes, or WRITE_ZEROES (unmap) if all zero.
    fn add_chunk(&mut self, frame: &mut ft_common::replica::protocol::EpochFrame) {
        if self.next == 0 {
            frame.sync_start();
            self.started = Some(Instant::now());
            log::info!("replica: initial sync of {} bytes starts", self.size);
        }
        let len = (self.size - self.next).min(self.chunk as u64) as usize;
        self.buf.resize(len, 0);
        let ok = match self.image.read_exact_at(&mut self.buf, self.next) {
            Ok(()) => true,
            Err(e) => {
                // Not shipped: the replica stays out of sync and the chunk is tried again.
                log::error!(
                    "replica: initial sync: reading the image at {}: {e}",
                    self.next
                );
                false
            }
        };
        if ok {
            if self.buf.iter().all(|&b| b == 0) {
                frame.write_zeroes(self.next, len as u64, true);
                self.zero_chunks += 1;
            } else {
                frame.write(self.next, [&self.buf[..]].into_iter());
            }
            self.next += len as u64;
            self.in_frame = len as u64;
            if self.next == self.size {
                frame.sync_done();
            }
        }
    }
}
