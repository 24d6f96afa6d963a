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
//! Bounded memory: one epoch frame and one batch of completions at most; meanwhile new writes
//! fill the held-request queue and the rings stop (backpressure), never a growing buffer.

use crate::gate::hold::HeldReq;
use crate::image::SECTOR_SHIFT;
use crate::request::RequestKind;
use ft_common::aiocb::Aiocb;
use ft_common::epoch::Epoch;
use ft_common::replica::{ReplicaLink, ReplicaStatus};

pub struct Replication {
    link: ReplicaLink,
    /// Completions of the shipped epoch that the replica has not acknowledged yet.
    unacked: Option<Vec<(HeldReq, u8)>>,
}

impl Replication {
    pub fn new(mut link: ReplicaLink) -> Replication {
        link.try_connect();
        Replication {
            link,
            unacked: None,
        }
    }

    /// Whether an earlier epoch still waits for its acknowledgement.
    pub fn blocked(&self) -> Option<Epoch> {
        self.unacked.as_ref().and(self.link.unacked())
    }

    /// Ships `batch` (guest order) as `epoch`. Nothing is shipped for a batch without output.
    pub fn ship(&mut self, epoch: Epoch, batch: &[Aiocb<HeldReq>]) {
        if batch.is_empty() {
            return;
        }
        let frame = self.link.begin(epoch);
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
                    frame.write(offset, segs);
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
            Ok(_) => Ok(done),
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
        self.unacked
            .take()
            .map(|v| v.into_iter().map(|(h, _)| h).collect())
            .unwrap_or_default()
    }

    pub fn status(&self) -> ReplicaStatus {
        self.link.status()
    }
}
