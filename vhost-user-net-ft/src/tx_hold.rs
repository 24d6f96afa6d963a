// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The TX hold buffer of `--ft hold`: frames the guest sent, copied out of its ring and tagged
//! with the epoch they were sent in, waiting for that epoch's checkpoint to be acknowledged.
//!
//! Storage is one byte arena used as a ring, allocated once, plus ft-common's [`TxQueue`] of
//! (offset, length) slots, which owns the epoch bookkeeping (open/sealed/committed/aborted
//! epochs, stale and unsealed commits refused, per-epoch stats, "first frame in an empty epoch"
//! for OUTPUT_PENDING). Holding a frame is a memcpy, never a heap allocation. Frames are pushed in
//! guest order and epochs only grow, so "all frames of epochs <= E" is a prefix of the queue and
//! a commit releases from the front of the arena.
//!
//! Invariants:
//! - Bounded: at most `max_packets` frames and `max_bytes` bytes (arena size; fragmentation at
//!   the wrap point counts against it) are held; a frame that does not fit makes
//!   [`TxHold::push`] answer [`Push::Full`], and the caller stops taking from the ring
//!   (backpressure; nothing is dropped).
//! - A frame leaves only through [`TxHold::commit`] (in guest order, epochs <= E, E sealed) or
//!   [`TxHold::abort`]; nothing of an epoch later than the committed one is ever handed out.

use crate::stats::DropReason;
use crate::tx::{copy_from_iov, Push, TxSink};
use ft_common::aiocb::Aiocb;
use ft_common::epoch::Epoch;
use ft_common::txqueue::{Limits, SealSummary, TxError, TxQueue};
use ft_common::vhost_user::GuestMem;
use std::io;

/// Where a held frame lives in the arena.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    off: usize,
    len: usize,
}

/// Totals of a release or discard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub frames: u64,
    pub bytes: u64,
    /// Frames the output function refused (counted, not retried).
    pub errors: u64,
}

pub struct TxHold {
    arena: Box<[u8]>,
    q: TxQueue<Slot>,
    /// Start of the oldest held frame (meaningful when not empty).
    head: usize,
    /// Where the next frame goes.
    tail: usize,
    /// Reused buffers for the frames a commit takes.
    taken: Vec<Aiocb<Slot>>,
    iov: Vec<libc::iovec>,
    output_pending: Option<Epoch>,
}

// SAFETY: `iov` holds pointers into `arena` (owned by this struct) only during `commit`; between
// calls it is empty. Nothing else is shared.
unsafe impl Send for TxHold {}

impl TxHold {
    /// A buffer of `max_bytes` bytes (headers included) and `max_packets` frames.
    pub fn new(max_bytes: usize, max_packets: usize) -> TxHold {
        TxHold {
            arena: vec![0u8; max_bytes].into_boxed_slice(),
            q: TxQueue::new(Limits {
                max_requests: max_packets,
                max_bytes: max_bytes as u64,
            }),
            head: 0,
            tail: 0,
            taken: Vec::with_capacity(max_packets.min(1 << 14)),
            iov: Vec::with_capacity(max_packets.min(1 << 14)),
            output_pending: None,
        }
    }

    pub fn len(&self) -> usize {
        self.q.held_requests()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of frames held (headers included).
    pub fn bytes(&self) -> usize {
        self.q.held_bytes() as usize
    }

    /// The epoch new frames go to.
    pub fn open_epoch(&self) -> Epoch {
        self.q.open_epoch()
    }

    /// The transaction queue, for status and SEAL records.
    pub fn queue(&self) -> &TxQueue<Slot> {
        &self.q
    }

    /// The epoch that got its first frame since the last call, if any (OUTPUT_PENDING).
    pub fn take_output_pending(&mut self) -> Option<Epoch> {
        self.output_pending.take()
    }

    /// Offset for `len` bytes, or None if they do not fit now.
    fn alloc(&self, len: usize) -> Option<usize> {
        if self.is_empty() {
            return (len <= self.arena.len()).then_some(0);
        }
        if self.tail > self.head {
            // Data in [head, tail): room at the end, else wrap to the front. The wrapped tail
            // must stay strictly below head so that tail < head always means "wrapped".
            if len <= self.arena.len() - self.tail {
                Some(self.tail)
            } else {
                (len < self.head).then_some(0)
            }
        } else {
            // Wrapped: data in [head, end) and [0, tail).
            (self.tail + len < self.head).then_some(self.tail)
        }
    }

    /// Copies a frame of `len` bytes gathered over `iov` into the open epoch.
    pub fn push(&mut self, iov: &[libc::iovec], len: usize) -> Push {
        self.push_checked(iov, len, || true)
    }

    /// [`push`](Self::push) from guest memory that may break under the copy: the frame is
    /// copied into free arena space first and queued only if `intact()` still holds after the
    /// copy. A frontend that truncates its memory file makes the daemon's reads of the lost
    /// pages fault; the SIGBUS handler maps zeros there (`ft_common::vhost_user::sigbus`), so a
    /// frame copied over such a page would be zeros, and must never be held, let alone sent.
    pub fn push_checked(
        &mut self,
        iov: &[libc::iovec],
        len: usize,
        intact: impl FnOnce() -> bool,
    ) -> Push {
        if len > self.arena.len() {
            // Could never fit; the CLI keeps the arena above the largest frame, so this is a
            // configuration error, reported as a drop rather than a permanent stall.
            return Push::Failed(
                DropReason::HoldRefused,
                io::Error::other(format!(
                    "{len}-byte frame larger than the {}-byte hold buffer",
                    self.arena.len()
                )),
            );
        }
        let Some(off) = self.alloc(len) else {
            return Push::Full;
        };
        if !self.q.has_room(len as u64) {
            return Push::Full;
        }
        // Free space until the frame is queued below: nothing else owns it meanwhile.
        let copied = copy_from_iov(iov, &mut self.arena[off..off + len]);
        debug_assert_eq!(copied, len);
        if !intact() {
            return Push::Failed(
                DropReason::HoldRefused,
                io::Error::other(
                    "guest memory under the frame is gone (the frontend truncated it)",
                ),
            );
        }
        let was_empty = self.is_empty();
        let pushed = match self.q.push(Slot { off, len }, len as u64) {
            Ok(p) => p,
            Err(_full) => return Push::Full,
        };
        if was_empty {
            self.head = off;
        }
        self.tail = off + len;
        if pushed.first_in_epoch {
            self.output_pending = Some(pushed.epoch);
        }
        Push::Done
    }

    /// SEAL E: closes the open epoch, opens E+1.
    pub fn seal(&mut self, e: Epoch) -> Result<SealSummary, TxError> {
        self.q.seal(e)
    }

    fn reset_positions(&mut self) {
        match self.q.held().next() {
            Some(a) => self.head = a.payload().off,
            None => {
                self.head = 0;
                self.tail = 0;
            }
        }
    }

    /// COMMIT E: hands every frame of epochs <= E to `out` in one call, oldest first, as
    /// iovecs into the arena (valid during the call), then frees their room. `out` returns how
    /// many frames it failed to send. Refused (nothing released) if E is stale, not sealed, or
    /// aborted.
    pub fn commit<F>(&mut self, e: Epoch, out: F) -> Result<Released, TxError>
    where
        F: FnOnce(&[libc::iovec]) -> u64,
    {
        let mut taken = std::mem::take(&mut self.taken);
        taken.clear();
        let res = self.q.take_committable_into(e, &mut taken);
        let mut r = Released::default();
        if res.is_ok() {
            self.iov.clear();
            for a in &taken {
                let Slot { off, len } = *a.payload();
                self.iov.push(libc::iovec {
                    iov_base: self.arena[off..].as_ptr() as *mut libc::c_void,
                    iov_len: len,
                });
                r.frames += 1;
                r.bytes += len as u64;
            }
            r.errors = out(&self.iov);
            self.iov.clear();
            for a in taken.drain(..) {
                let len = a.bytes() as i32;
                // Follow the AIOCB state machine to its terminal state.
                let _ = a.submit().complete(len);
            }
            self.reset_positions();
        }
        self.taken = taken;
        res.map(|_| r)
    }

    /// ABORT: drops every held frame; none of them is ever sent. Epochs up to the open one are
    /// marked aborted (their commit is refused).
    pub fn abort(&mut self) -> Released {
        let dropped = self.q.abort();
        let r = Released {
            frames: dropped.len() as u64,
            bytes: dropped.iter().map(|s| s.len as u64).sum(),
            errors: 0,
        };
        self.reset_positions();
        self.output_pending = None;
        r
    }
}

/// `--ft hold`: a [`TxSink`] that copies frames into the hold buffer's open epoch. `mem` is the
/// guest memory the frames come from: a frame is held only if it was intact after the copy
/// ([`TxHold::push_checked`]).
pub struct HoldSink<'a> {
    pub hold: &'a mut TxHold,
    pub mem: Option<&'a GuestMem>,
}

impl TxSink for HoldSink<'_> {
    fn push(&mut self, iov: &[libc::iovec], len: usize) -> Push {
        let mem = self.mem;
        self.hold
            .push_checked(iov, len, || mem.is_none_or(|m| !m.is_broken()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn iov(b: &[u8]) -> [libc::iovec; 1] {
        [libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }]
    }

    fn push(h: &mut TxHold, b: &[u8]) -> bool {
        match h.push(&iov(b), b.len()) {
            Push::Done => true,
            Push::Full => false,
            Push::Failed(_, e) => panic!("{e}"),
        }
    }

    fn commit(h: &mut TxHold, e: u64) -> Result<Vec<Vec<u8>>, TxError> {
        let mut v = Vec::new();
        h.commit(Epoch(e), |iovs| {
            for f in iovs {
                let mut b = vec![0u8; f.iov_len];
                copy_from_iov(std::slice::from_ref(f), &mut b);
                v.push(b);
            }
            0
        })?;
        Ok(v)
    }

    #[test]
    fn commit_releases_sealed_prefix_in_order_abort_discards() {
        let mut h = TxHold::new(1000, 100);
        assert!(push(&mut h, b"a1"));
        assert_eq!(h.take_output_pending(), Some(Epoch(1)));
        assert!(push(&mut h, b"a2"));
        assert_eq!(h.take_output_pending(), None);
        h.seal(Epoch(1)).unwrap();
        assert!(push(&mut h, b"b1"));
        assert_eq!(h.take_output_pending(), Some(Epoch(2)));
        // Epoch 2 is not sealed: refused, nothing released.
        assert!(matches!(commit(&mut h, 2), Err(TxError::NotSealed { .. })));
        assert_eq!(h.len(), 3);
        let s = h.seal(Epoch(2)).unwrap();
        assert_eq!((s.held_requests, s.epoch_requests), (3, 1));
        assert!(push(&mut h, b"c1"));
        assert_eq!(
            commit(&mut h, 1).unwrap(),
            vec![b"a1".to_vec(), b"a2".into()]
        );
        assert!(matches!(commit(&mut h, 1), Err(TxError::Stale { .. })));
        assert_eq!(commit(&mut h, 2).unwrap(), vec![b"b1".to_vec()]);
        assert_eq!((h.len(), h.bytes()), (1, 2));
        let d = h.abort();
        assert_eq!(d.frames, 1);
        assert!(h.is_empty());
        assert!(matches!(commit(&mut h, 3), Err(TxError::Aborted { .. })));
    }

    #[test]
    fn full_by_packets_and_by_bytes_then_room_after_commit() {
        let mut h = TxHold::new(10, 3);
        assert!(push(&mut h, b"1234"));
        assert!(push(&mut h, b"5678"));
        assert!(!push(&mut h, b"abc"), "only 2 bytes left");
        assert!(push(&mut h, b"ab"));
        assert!(!push(&mut h, b"x"), "packet bound");
        h.seal(Epoch(1)).unwrap();
        assert_eq!(commit(&mut h, 1).unwrap().len(), 3);
        assert!(push(&mut h, b"0123456789"));
        assert!(matches!(
            h.push(&iov(&[0; 11]), 11),
            Push::Failed(DropReason::HoldRefused, _)
        ));
    }

    #[test]
    fn ring_wraps_without_overwriting_held_frames() {
        let mut h = TxHold::new(10, 10);
        assert!(push(&mut h, b"aaaa"));
        h.seal(Epoch(1)).unwrap();
        assert!(push(&mut h, b"bbbb"));
        assert_eq!(commit(&mut h, 1).unwrap(), vec![b"aaaa".to_vec()]);
        // 2 bytes at the end, 4 free at the front: must wrap, and strictly below head.
        assert!(!push(&mut h, b"cccc"));
        assert!(push(&mut h, b"ccc"));
        assert!(!push(&mut h, b"d"));
        h.seal(Epoch(2)).unwrap();
        assert_eq!(
            commit(&mut h, 2).unwrap(),
            vec![b"bbbb".to_vec(), b"ccc".to_vec()]
        );
        assert!(h.is_empty());
    }

    proptest! {
        /// Random pushes, seals, commits and aborts against a model: released frames are
        /// exactly the model's frames of epochs <= E, in order, bytes intact; bounds hold.
        #[test]
        fn matches_model(ops in proptest::collection::vec((0u8..5, 1usize..40), 1..200)) {
            let mut h = TxHold::new(100, 6);
            let mut model: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
            let mut seq = 0u8;
            for (op, n) in ops {
                match op {
                    0 | 1 => {
                        seq = seq.wrapping_add(1);
                        let f = vec![seq; n];
                        let e = h.open_epoch().0;
                        if push(&mut h, &f) {
                            model.push_back((e, f));
                        }
                        prop_assert!(h.len() <= 6 && h.bytes() <= 100);
                    }
                    2 => {
                        let e = h.open_epoch();
                        h.seal(e).unwrap();
                    }
                    3 => {
                        let e = h.queue().last_sealed().map(|e| e.0).unwrap_or(0);
                        if let Ok(got) = commit(&mut h, e) {
                            let mut want = Vec::new();
                            while model.front().is_some_and(|(fe, _)| *fe <= e) {
                                want.push(model.pop_front().unwrap().1);
                            }
                            prop_assert_eq!(got, want);
                        }
                    }
                    _ => {
                        if n % 5 == 0 {
                            h.abort();
                            model.clear();
                        }
                    }
                }
                prop_assert_eq!(h.len(), model.len());
                prop_assert_eq!(h.bytes(), model.iter().map(|(_, f)| f.len()).sum::<usize>());
            }
        }
    }
}
