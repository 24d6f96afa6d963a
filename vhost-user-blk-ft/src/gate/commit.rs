//! The commit engine: executes the held requests of a `COMMIT` on the control thread's own
//! io_uring ([`Engine`] with AIOCB slots), then makes them durable with one `fdatasync`.
//!
//! Ordering: requests are submitted in *waves*. A request's wave is one more than the highest
//! wave of any earlier (in guest order) request whose byte range overlaps it, so overlapping
//! writes land in guest order while disjoint ones share a wave and run in parallel. Each wave
//! is one `io_uring_enter` (more only if it exceeds the ring) and is drained before the next.
//! FLUSH requests are not submitted: the commit's single `fdatasync` satisfies every one of
//! them (Kemari review: drain, then one fsync, never a fsync per request).
//!
//! Errors: a failed or short write fails itself, and every FLUSH after it in guest order; a
//! failed `fdatasync` fails everything in the batch (nothing is reported durable that is not).
//! Nothing is retried.
//!
//! Cost per commit of N writes with no overlaps: one `io_uring_enter` to submit (plus waits for
//! completions) and one `fdatasync`, no allocation once the buffers have grown.

use crate::engine::{Completion, Engine};
use crate::gate::hold::{held_bytes, HeldReq};
use crate::image::{Image, SECTOR_SHIFT};
use crate::request::{RequestKind, STATUS_IOERR, STATUS_OK};
use ft_common::aiocb::{Aiocb, AiocbId, InFlight};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one commit did.
#[derive(Debug, Default)]
pub struct CommitOutcome {
    /// Every request of the batch with the status its guest completion must carry.
    pub done: Vec<(HeldReq, u8)>,
    pub requests: u64,
    pub bytes: u64,
    /// Submit of the first wave to the drain of the last.
    pub submit_to_drain: Duration,
    pub fdatasync: Duration,
    /// Whether an `fdatasync` was issued (not for an empty batch).
    pub synced: bool,
    pub waves: u32,
    /// `io_uring_enter` calls made to submit.
    pub submit_calls: u64,
    /// The first failure: message and errno, if any.
    pub error: Option<(String, Option<i32>)>,
}

pub struct CommitEngine {
    engine: Engine<InFlight<HeldReq>>,
    image: Arc<Image>,
    /// Per batch: the queued AIOCBs (taken out wave by wave) and their waves.
    pending: Vec<Option<Aiocb<HeldReq>>>,
    wave: Vec<u32>,
    fdatasyncs: u64,
}

/// The byte range a request changes on the image; None for FLUSH (no range).
fn range(req: &crate::request::BlkRequest) -> Option<(u64, u64)> {
    let len = match req.kind() {
        RequestKind::Write { .. } => u64::from(req.data_len()),
        RequestKind::Discard { sectors, .. } | RequestKind::WriteZeroes { sectors, .. } => {
            u64::from(sectors) << SECTOR_SHIFT
        }
        _ => return None,
    };
    Some((req.offset(), req.offset().saturating_add(len)))
}

impl CommitEngine {
    /// `depth`: requests in flight at once (the held-request limit is a good choice).
    pub fn new(image: Arc<Image>, depth: u32) -> std::io::Result<CommitEngine> {
        Ok(CommitEngine {
            engine: Engine::new(image.clone(), depth)?,
            image,
            pending: Vec::new(),
            wave: Vec::new(),
            fdatasyncs: 0,
        })
    }

    /// `fdatasync` calls that succeeded so far.
    pub fn fdatasyncs(&self) -> u64 {
        self.fdatasyncs
    }

    /// Executes `batch` (guest order, as `take_committable` hands it out) and syncs once.
    pub fn run(&mut self, batch: Vec<Aiocb<HeldReq>>) -> CommitOutcome {
        let mut out = CommitOutcome {
            requests: batch.len() as u64,
            ..Default::default()
        };
        if batch.is_empty() {
            return out;
        }
        out.done.reserve(batch.len());
        self.assign_waves(&batch);
        let submit_calls0 = self.engine.stats().submit_calls;
        // Flushes wait for the sync; their ids decide whether a failed write precedes them.
        let mut flushes: Vec<(AiocbId, HeldReq)> = Vec::new();
        self.pending.clear();
        for a in batch {
            out.bytes += held_bytes(&a.payload().req);
            if a.payload().req.kind() == RequestKind::Flush {
                flushes.push((a.id(), a.cancel()));
            } else {
                self.pending.push(Some(a));
            }
        }
        let mut first_failed: Option<AiocbId> = None;
        let mut results: Vec<(AiocbId, HeldReq, u8)> = Vec::with_capacity(self.pending.len());
        let max_wave = self.wave.iter().copied().max().unwrap_or(0);
        let t0 = Instant::now();
        let mut collect = |c: Completion<InFlight<HeldReq>>,
                           ff: &mut Option<AiocbId>,
                           err: &mut Option<(String, Option<i32>)>| {
            let status = c.status();
            let done = c.req.complete(c.result);
            if status != STATUS_OK {
                *ff = Some(ff.map_or(done.id, |f| f.min(done.id)));
                if err.is_none() {
                    let errno = (c.result < 0).then(|| -c.result);
                    let what = match errno {
                        Some(e) => std::io::Error::from_raw_os_error(e).to_string(),
                        None => format!("short transfer ({} bytes)", c.result),
                    };
                    *err = Some((
                        format!(
                            "{:?} of request {}: {what}",
                            done.payload.req.kind(),
                            done.id
                        ),
                        errno,
                    ));
                }
            }
            results.push((done.id, done.payload, status));
        };
        for w in 0..=max_wave {
            for i in 0..self.pending.len() {
                if self.wave[i] != w {
                    continue;
                }
                let Some(a) = self.pending[i].take() else {
                    continue;
                };
                let tag = a.id().get();
                let mut f = a.submit();
                loop {
                    match self.engine.push(f, tag, false) {
                        Ok(()) => break,
                        Err(back) => {
                            // Ring full: finish what is in flight, then retry.
                            f = back;
                            let _ = self.engine.submit();
                            if self.engine.in_flight() == 0 {
                                // Cannot reach the kernel at all: fail the request.
                                let errno = libc::EIO;
                                collect(
                                    Completion {
                                        req: f,
                                        tag,
                                        result: -errno,
                                    },
                                    &mut first_failed,
                                    &mut out.error,
                                );
                                break;
                            }
                            let ff = &mut first_failed;
                            let err = &mut out.error;
                            if let Err(e) = self.engine.wait_idle(|c| collect(c, ff, err)) {
                                log::error!("commit: io_uring wait: {e}");
                            }
                        }
                    }
                }
            }
            let _ = self.engine.submit();
            let ff = &mut first_failed;
            let err = &mut out.error;
            if let Err(e) = self.engine.wait_idle(|c| collect(c, ff, err)) {
                log::error!("commit: io_uring wait: {e}");
            }
        }
        out.waves = max_wave + 1;
        out.submit_to_drain = t0.elapsed();
        out.submit_calls = self.engine.stats().submit_calls - submit_calls0;

        let t1 = Instant::now();
        // SAFETY: plain syscall on the image's fd, which lives as long as `self.image`.
        let rc = unsafe { libc::fdatasync(self.image.as_raw_fd()) };
        out.fdatasync = t1.elapsed();
        out.synced = true;
        let sync_err = if rc == 0 {
            self.fdatasyncs += 1;
            None
        } else {
            let e = std::io::Error::last_os_error();
            let errno = e.raw_os_error();
            if out.error.is_none() {
                out.error = Some((format!("fdatasync: {e}"), errno));
            }
            Some(e)
        };
        for (_, held, status) in results {
            let status = if sync_err.is_some() {
                STATUS_IOERR
            } else {
                status
            };
            out.done.push((held, status));
        }
        for (id, held) in flushes {
            let ok = sync_err.is_none() && first_failed.is_none_or(|f| f > id);
            out.done
                .push((held, if ok { STATUS_OK } else { STATUS_IOERR }));
        }
        out
    }

    /// Wave of each request in `batch` (FLUSH included, it gets wave 0 and is never
    /// submitted): one more than the highest wave of an earlier overlapping request.
    fn assign_waves(&mut self, batch: &[Aiocb<HeldReq>]) {
        self.wave.clear();
        let mut waves_of_non_flush: Vec<u32> = Vec::new();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for a in batch {
            let Some((s, e)) = range(&a.payload().req) else {
                continue;
            };
            // Quadratic in the batch only when ranges are checked pairwise; batches are bounded
            // by the held-request limit.
            let mut w = 0;
            for (j, &(s2, e2)) in ranges.iter().enumerate() {
                if s < e2 && s2 < e {
                    w = w.max(waves_of_non_flush[j] + 1);
                }
            }
            ranges.push((s, e));
            waves_of_non_flush.push(w);
        }
        self.wave = waves_of_non_flush;
    }
}
