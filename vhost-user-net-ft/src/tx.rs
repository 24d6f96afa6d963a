// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! TX: frames from the guest's TX ring to a sink (the tap directly, or the epoch hold buffer).
//!
//! Each chain is one frame: virtio-net header then Ethernet frame, spread over any number of
//! device-readable descriptors. The chain is gathered as iovecs straight over guest memory (no
//! copy here), validated, and pushed to the sink in ring order.
//!
//! Validation (each failure drops the frame, bumps a counter, logs rate-limited, returns the
//! descriptors to the guest; never panics): no device-writable descriptor, every descriptor
//! inside guest memory, at most [`MAX_IOV`] segments, at least a full virtio-net header, a frame
//! of [`ETH_HLEN`]..=[`MAX_FRAME_LEN`] bytes, and a header that [`VnetHdr::validate_tx`] accepts.
//!
//! `--ft off` ([`TapSink`]): single-segment frames are not written one `writev` each but
//! collected and handed to the tap in batches of up to [`TAP_BATCH`] by [`TapBatch`] (one
//! io_uring submission, in guest order: its module docs say when the writes are linked); their
//! chains are completed only after the batch was written, since the iovecs point into the
//! guest's buffers. A multi-segment frame first flushes the batch, then goes out with `writev`.
//! The batch is always flushed before a pass returns, so no pointer into guest memory outlives
//! a pass. In the hold mode the same batching happens at COMMIT, which is why `--ft off` was
//! the slower of the two before (docs/benchmarks.md).
//!
//! Backpressure: when the sink is full the chain is put back (next_avail rewound) and the pass
//! stops with `blocked`; nothing is dropped. Invariant: every chain popped is either pushed and
//! completed, dropped and completed, or put back; it is never completed twice.

use crate::ring::Ring;
use crate::stats::{DropReason, NetCounters};
use crate::tap::Tap;
use crate::tap_batch::TapBatch;
use crate::vnet_hdr::{VnetHdr, ETH_HLEN, MAX_FRAME_LEN, VNET_HDR_LEN};
use std::io;
use std::ops::Deref;
use vm_memory::{GuestMemory, Permissions};

/// Most segments one frame may have (Linux's UIO_MAXIOV, the writev limit).
pub const MAX_IOV: usize = 1024;

/// Most frames written to the tap in one batch in `--ft off` (see the module docs).
pub const TAP_BATCH: usize = 64;

/// What a sink did with a frame.
#[derive(Debug)]
pub enum Push {
    /// Taken (sent, or copied into the hold buffer): complete the chain.
    Done,
    /// No room now: put the chain back and stop taking from the ring.
    Full,
    /// Refused: drop it (counted under the reason).
    Failed(DropReason, io::Error),
}

/// Where TX frames go.
pub trait TxSink {
    /// Takes one frame of `len` bytes (virtio-net header included) gathered over `iov`. The
    /// iovecs are only valid during the call.
    fn push(&mut self, iov: &[libc::iovec], len: usize) -> Push;

    /// The tap this sink writes to at once, if it is that plain: [`TxPath::process`] then
    /// batches the frames to it itself (see the module docs) instead of calling `push`.
    fn batch_tap(&self) -> Option<&Tap> {
        None
    }
}

/// `--ft off`: write each frame to the tap at once.
pub struct TapSink<'a>(pub &'a Tap);

impl TxSink for TapSink<'_> {
    fn push(&mut self, iov: &[libc::iovec], len: usize) -> Push {
        write_now(self.0, iov, len)
    }

    fn batch_tap(&self) -> Option<&Tap> {
        Some(self.0)
    }
}

/// One frame to the tap with `writev`.
fn write_now(tap: &Tap, iov: &[libc::iovec], len: usize) -> Push {
    // SAFETY: the iovecs point into guest memory that TxPath validated and that stays mapped
    // while the chain is outstanding (it is completed only after this returns).
    match unsafe { tap.writev(iov) } {
        Ok(n) if n == len => Push::Done,
        Ok(n) => Push::Failed(
            DropReason::TapError,
            io::Error::other(format!("short write {n}/{len}")),
        ),
        Err(e) => Push::Failed(DropReason::TapError, e),
    }
}

/// Result of one TX pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxPass {
    /// Frames handed to the sink.
    pub frames: usize,
    /// Used-ring entries written (the caller notifies the guest if this is not zero).
    pub used: usize,
    /// The sink is full: the ring still holds frames; resume after the sink frees room.
    pub blocked: bool,
}

pub struct TxPath {
    iov: Vec<libc::iovec>,
    hdr_len: usize,
    features: u64,
    /// `--ft off` batching: the writer (created at first use), and the frames collected for
    /// it with their chain heads and lengths.
    batch: Option<TapBatch>,
    pending: Vec<libc::iovec>,
    pending_heads: Vec<(u16, usize)>,
}

// SAFETY: the iovec scratch and the pending batch hold pointers only between gathering and
// writing frames, inside one call of `process`; between calls they hold no live pointers.
unsafe impl Send for TxPath {}

impl Default for TxPath {
    fn default() -> Self {
        Self::new()
    }
}

enum Gathered {
    Frame(usize),
    Drop(DropReason, String),
}

impl TxPath {
    pub fn new() -> TxPath {
        TxPath {
            iov: Vec::with_capacity(MAX_IOV),
            hdr_len: VNET_HDR_LEN,
            features: 0,
            batch: None,
            pending: Vec::with_capacity(TAP_BATCH),
            pending_heads: Vec::with_capacity(TAP_BATCH),
        }
    }

    /// Applies negotiated features: header length and the offloads TX headers may request.
    pub fn set_features(&mut self, hdr_len: usize, features: u64) {
        self.hdr_len = hdr_len;
        self.features = features;
    }

    /// Takes frames from `q` into `sink` until the ring is empty or the sink is full.
    pub fn process<R: Ring, S: TxSink>(
        &mut self,
        q: &mut R,
        sink: &mut S,
        counters: &NetCounters,
    ) -> TxPass {
        if let Some(tap) = sink.batch_tap() {
            return self.process_batched(q, tap, counters);
        }
        let mut pass = TxPass::default();
        let mut idle_rechecks = 0;
        loop {
            let used_before = pass.used;
            q.disable_notification();
            while let Some(chain) = q.pop() {
                let head = chain.head_index();
                let res = self.gather(chain);
                let completed = match res {
                    Gathered::Frame(len) => match sink.push(&self.iov, len) {
                        Push::Done => {
                            counters.tx.count_frame(len - self.hdr_len);
                            pass.frames += 1;
                            true
                        }
                        Push::Full => {
                            q.unpop(head);
                            pass.blocked = true;
                            false
                        }
                        Push::Failed(why, e) => {
                            counters.drop_tx(why, format_args!("{e}"));
                            true
                        }
                    },
                    Gathered::Drop(why, detail) => {
                        counters.drop_tx(why, format_args!("chain {head}: {detail}"));
                        true
                    }
                };
                self.iov.clear();
                if !completed {
                    // Blocked: notifications stay as they are; the caller resumes us when the
                    // sink frees room, not on a kick.
                    return pass;
                }
                if q.add_used(head, 0) {
                    pass.used += 1;
                }
            }
            if !q.enable_notification() {
                return pass;
            }
            // New chains were announced; a ring that keeps announcing without yielding any
            // is broken (unreadable memory): stop rather than spin.
            if pass.used == used_before {
                idle_rechecks += 1;
                if idle_rechecks > 1 {
                    return pass;
                }
            }
        }
    }

    /// [`process`](Self::process) for a plain tap: frames go out in batches (module docs).
    fn process_batched<R: Ring>(&mut self, q: &mut R, tap: &Tap, counters: &NetCounters) -> TxPass {
        let mut pass = TxPass::default();
        let mut idle_rechecks = 0;
        loop {
            let used_before = pass.used;
            q.disable_notification();
            while let Some(chain) = q.pop() {
                let head = chain.head_index();
                match self.gather(chain) {
                    Gathered::Frame(len) if self.iov.len() == 1 => {
                        self.pending.push(self.iov[0]);
                        self.pending_heads.push((head, len));
                        if self.pending.len() >= TAP_BATCH {
                            self.flush(q, tap, counters, &mut pass);
                        }
                    }
                    Gathered::Frame(len) => {
                        // Guest order on the wire: the batch goes first.
                        self.flush(q, tap, counters, &mut pass);
                        match write_now(tap, &self.iov, len) {
                            Push::Done => {
                                counters.tx.count_frame(len - self.hdr_len);
                                pass.frames += 1;
                            }
                            Push::Failed(why, e) => counters.drop_tx(why, format_args!("{e}")),
                            Push::Full => unreachable!("write_now never reports Full"),
                        }
                        if q.add_used(head, 0) {
                            pass.used += 1;
                        }
                    }
                    Gathered::Drop(why, detail) => {
                        counters.drop_tx(why, format_args!("chain {head}: {detail}"));
                        if q.add_used(head, 0) {
                            pass.used += 1;
                        }
                    }
                }
                self.iov.clear();
            }
            self.flush(q, tap, counters, &mut pass);
            if !q.enable_notification() {
                return pass;
            }
            if pass.used == used_before {
                idle_rechecks += 1;
                if idle_rechecks > 1 {
                    return pass;
                }
            }
        }
    }

    /// Writes the pending batch to `tap` and completes its chains.
    fn flush<R: Ring>(&mut self, q: &mut R, tap: &Tap, counters: &NetCounters, pass: &mut TxPass) {
        if self.pending.is_empty() {
            return;
        }
        let batch = self.batch.get_or_insert_with(TapBatch::new);
        // SAFETY: the iovecs point into the guest buffers of chains popped in this pass and
        // not completed yet (that happens below, after write_all returned and the kernel holds
        // no reference to them any more: TapBatch's invariant).
        let r = unsafe { batch.write_all(tap, &self.pending) };
        // A refused frame is not identified by the batch result: count the first ones sent.
        let ok = self.pending_heads.len() - r.errors as usize;
        for (i, &(head, len)) in self.pending_heads.iter().enumerate() {
            if i < ok {
                counters.tx.count_frame(len - self.hdr_len);
                pass.frames += 1;
            }
            if q.add_used(head, 0) {
                pass.used += 1;
            }
        }
        for _ in 0..r.errors {
            counters.drop_tx(
                DropReason::TapError,
                format_args!("the tap refused a frame of a batch"),
            );
        }
        self.pending.clear();
        self.pending_heads.clear();
    }

    fn gather<M>(&mut self, chain: virtio_queue::DescriptorChain<M>) -> Gathered
    where
        M: Deref<Target: GuestMemory> + Clone,
    {
        self.iov.clear();
        let mem = chain.memory();
        let limit = self.hdr_len + MAX_FRAME_LEN;
        let mut total = 0usize;
        for d in chain.clone() {
            if d.is_write_only() {
                return Gathered::Drop(
                    DropReason::BadDescriptor,
                    "device-writable descriptor in a TX chain".into(),
                );
            }
            total += d.len() as usize;
            if total > limit {
                return Gathered::Drop(
                    DropReason::Oversized,
                    format!("more than {limit} bytes (header included)"),
                );
            }
            let slices = match mem.get_slices(d.addr(), d.len() as usize, Permissions::Read) {
                Ok(s) => s,
                Err(e) => return Gathered::Drop(DropReason::BadDescriptor, e.to_string()),
            };
            for s in slices {
                let s = match s {
                    Ok(s) => s,
                    Err(e) => return Gathered::Drop(DropReason::BadDescriptor, e.to_string()),
                };
                if self.iov.len() == MAX_IOV {
                    return Gathered::Drop(
                        DropReason::BadDescriptor,
                        format!("more than {MAX_IOV} segments"),
                    );
                }
                if s.is_empty() {
                    continue;
                }
                self.iov.push(libc::iovec {
                    iov_base: s.ptr_guard().as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                });
            }
        }
        if total < self.hdr_len {
            return Gathered::Drop(
                DropReason::ShortHeader,
                format!("{total} bytes, header needs {}", self.hdr_len),
            );
        }
        let frame_len = total - self.hdr_len;
        if frame_len < ETH_HLEN {
            return Gathered::Drop(DropReason::Runt, format!("{frame_len}-byte frame"));
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        copy_from_iov(&self.iov, &mut hdr[..self.hdr_len]);
        let h = VnetHdr::decode(&hdr, self.hdr_len);
        if let Err(e) = h.validate_tx(self.features, frame_len) {
            return Gathered::Drop(DropReason::BadHeader, e.to_string());
        }
        Gathered::Frame(total)
    }
}

/// Copies the first `out.len()` bytes described by `iov` into `out`; returns bytes copied.
pub fn copy_from_iov(iov: &[libc::iovec], out: &mut [u8]) -> usize {
    let mut done = 0;
    for v in iov {
        if done == out.len() {
            break;
        }
        let n = v.iov_len.min(out.len() - done);
        // SAFETY: callers pass iovecs over memory valid for reads for the duration of the call
        // (guest memory gathered by TxPath, or test buffers); `out` is ours.
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base as *const u8, out[done..].as_mut_ptr(), n)
        };
        done += n;
    }
    done
}
