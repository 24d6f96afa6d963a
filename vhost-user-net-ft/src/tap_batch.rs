//! Batched frame output for COMMIT: many frames to one tap fd with one io_uring submission
//! instead of one write(2) each.
//!
//! A tap takes exactly one frame per write, and has no sendmmsg; io_uring is the way to hand
//! it a batch in one syscall. Order is guest order: the writes of a batch are hard-linked
//! (IOSQE_IO_HARDLINK), so each starts only after the previous one finished, and a failed
//! write does not cancel the rest. If io_uring is unavailable (old kernel, seccomp) the writer
//! falls back to a write(2) loop; the result is the same, only slower.
//!
//! Invariant: every frame passed to [`TapBatch::write_all`] is handed to the tap exactly once,
//! in order, before it returns (it waits for all completions), so the caller may free the
//! memory afterwards.

use crate::tap::Tap;
use io_uring::{opcode, squeue, types, IoUring};
use log::warn;
use std::io;
use std::os::fd::AsRawFd;

/// Submission queue size: frames per io_uring_enter.
const BATCH: usize = 256;

pub struct TapBatch {
    ring: Option<IoUring>,
}

/// Outcome of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchResult {
    pub frames: u64,
    /// Frames the tap refused or wrote short.
    pub errors: u64,
    /// io_uring_enter (or write) calls made.
    pub syscalls: u64,
}

impl Default for TapBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl TapBatch {
    pub fn new() -> TapBatch {
        let ring = match IoUring::new(BATCH as u32) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!("io_uring unavailable ({e}); commits use one write per frame");
                None
            }
        };
        TapBatch { ring }
    }

    /// A writer that always uses write(2) (tests of the fallback).
    pub fn without_io_uring() -> TapBatch {
        TapBatch { ring: None }
    }

    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Writes every frame (virtio-net header included) to `tap`, in order.
    ///
    /// # Safety
    /// Each iovec must describe memory valid for reads until this returns.
    pub unsafe fn write_all(&mut self, tap: &Tap, frames: &[libc::iovec]) -> BatchResult {
        let mut r = BatchResult::default();
        let Some(ring) = self.ring.as_mut() else {
            for f in frames {
                let buf = std::slice::from_raw_parts(f.iov_base as *const u8, f.iov_len);
                r.syscalls += 1;
                r.frames += 1;
                if !matches!(tap.write(buf), Ok(n) if n == f.iov_len) {
                    r.errors += 1;
                }
            }
            return r;
        };
        let fd = types::Fd(tap.as_raw_fd());
        for chunk in frames.chunks(BATCH) {
            {
                let mut sq = ring.submission();
                for (i, f) in chunk.iter().enumerate() {
                    let mut e = opcode::Write::new(fd, f.iov_base as *const u8, f.iov_len as u32)
                        .offset(u64::MAX)
                        .build()
                        .user_data(f.iov_len as u64);
                    if i + 1 < chunk.len() {
                        e = e.flags(squeue::Flags::IO_HARDLINK);
                    }
                    // SAFETY: the buffer outlives the wait below (caller's contract); the SQ
                    // has room for a whole chunk because every chunk is fully reaped first.
                    if sq.push(&e).is_err() {
                        break;
                    }
                }
            }
            let mut done = 0usize;
            while done < chunk.len() {
                r.syscalls += 1;
                match ring.submit_and_wait(chunk.len() - done) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // The kernel refused the batch: count what did not complete.
                        warn!("io_uring submit: {e}");
                        r.frames += (chunk.len() - done) as u64;
                        r.errors += (chunk.len() - done) as u64;
                        break;
                    }
                }
                for cqe in ring.completion() {
                    done += 1;
                    r.frames += 1;
                    if cqe.result() < 0 || cqe.result() as u64 != cqe.user_data() {
                        r.errors += 1;
                    }
                }
            }
        }
        r
    }
}
