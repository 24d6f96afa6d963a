//! The TX hold buffer of `--ft hold`: frames the guest sent, copied out of its ring and tagged
//! with the epoch they were sent in, waiting for that epoch's checkpoint to be acknowledged.
//!
//! Storage is one byte arena used as a ring plus a FIFO of (epoch, offset, length) entries, both
//! allocated once: holding a frame is a memcpy, never a heap allocation. Frames are appended in
//! guest order and epochs only grow, so "all frames of epochs <= E" is always a prefix of the
//! FIFO and a commit releases from the front.
//!
//! Invariants:
//! - Bounded: at most `max_packets` frames and `arena.len()` bytes are held; a frame that does not
//!   fit makes [`TxHold::push`] answer [`Push::Full`], and the caller stops taking from the ring
//!   (backpressure; nothing is dropped).
//! - A frame leaves only through [`TxHold::release_through`] (in guest order) or
//!   [`TxHold::discard_all`] (abort); nothing of an epoch > E is released by a commit of E.

use crate::tx::{copy_from_iov, Push, TxSink};
use ft_common::epoch::Epoch;
use std::collections::VecDeque;
use std::io;

#[derive(Clone, Copy, Debug)]
struct Held {
    epoch: Epoch,
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
    entries: VecDeque<Held>,
    max_packets: usize,
    /// Start of the oldest held frame (meaningful when not empty).
    head: usize,
    /// Where the next frame goes.
    tail: usize,
    bytes: usize,
    /// Set when a frame lands in an epoch that held nothing yet (Kemari's "output pending");
    /// taken by the device to notify the coordinator.
    output_pending: Option<Epoch>,
}

impl TxHold {
    /// A buffer of `max_bytes` bytes (headers included) and `max_packets` frames.
    pub fn new(max_bytes: usize, max_packets: usize) -> TxHold {
        TxHold {
            arena: vec![0u8; max_bytes].into_boxed_slice(),
            entries: VecDeque::with_capacity(max_packets),
            max_packets,
            head: 0,
            tail: 0,
            bytes: 0,
            output_pending: None,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of frames held (headers included).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Frames held of epochs <= `e`.
    pub fn frames_through(&self, e: Epoch) -> usize {
        self.entries.partition_point(|h| h.epoch <= e)
    }

    /// The epoch that got its first frame since the last call, if any.
    pub fn take_output_pending(&mut self) -> Option<Epoch> {
        self.output_pending.take()
    }

    /// Offset for `len` bytes, or None if they do not fit now.
    fn alloc(&self, len: usize) -> Option<usize> {
        if self.entries.is_empty() {
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

    /// Copies a frame of `len` bytes gathered over `iov` into epoch `epoch`.
    /// Epochs passed in must not decrease.
    pub fn push(&mut self, epoch: Epoch, iov: &[libc::iovec], len: usize) -> Push {
        if len > self.arena.len() {
            // Could never fit; the CLI keeps the arena above the largest frame, so this is a
            // configuration error, reported as a drop rather than a permanent stall.
            return Push::Failed(io::Error::other(format!(
                "{len}-byte frame larger than the {}-byte hold buffer",
                self.arena.len()
            )));
        }
        if self.entries.len() >= self.max_packets {
            return Push::Full;
        }
        let Some(off) = self.alloc(len) else {
            return Push::Full;
        };
        let copied = copy_from_iov(iov, &mut self.arena[off..off + len]);
        debug_assert_eq!(copied, len);
        let first_of_epoch = self.entries.back().is_none_or(|h| h.epoch < epoch);
        if self.entries.is_empty() {
            self.head = off;
        }
        self.entries.push_back(Held { epoch, off, len });
        self.tail = off + len;
        self.bytes += len;
        if first_of_epoch {
            self.output_pending = Some(epoch);
        }
        Push::Done
    }

    fn pop_front(&mut self) -> Option<Held> {
        let h = self.entries.pop_front()?;
        self.bytes -= h.len;
        match self.entries.front() {
            Some(next) => self.head = next.off,
            None => {
                self.head = 0;
                self.tail = 0;
            }
        }
        Some(h)
    }

    /// Hands every frame of epochs <= `e` to `out`, oldest first, and frees their room.
    pub fn release_through<F>(&mut self, e: Epoch, mut out: F) -> Released
    where
        F: FnMut(&[u8]) -> io::Result<()>,
    {
        let mut r = Released::default();
        while self.entries.front().is_some_and(|h| h.epoch <= e) {
            let Some(h) = self.entries.front().copied() else {
                break;
            };
            if out(&self.arena[h.off..h.off + h.len]).is_err() {
                r.errors += 1;
            }
            r.frames += 1;
            r.bytes += h.len as u64;
            self.pop_front();
        }
        r
    }

    /// Drops every held frame (ABORT): none of them is ever sent.
    pub fn discard_all(&mut self) -> Released {
        let r = Released {
            frames: self.entries.len() as u64,
            bytes: self.bytes as u64,
            errors: 0,
        };
        self.entries.clear();
        self.head = 0;
        self.tail = 0;
        self.bytes = 0;
        self.output_pending = None;
        r
    }
}

/// `--ft hold`: a [`TxSink`] that copies frames into the hold buffer under the open epoch.
pub struct HoldSink<'a> {
    pub hold: &'a mut TxHold,
    pub epoch: Epoch,
}

impl TxSink for HoldSink<'_> {
    fn push(&mut self, iov: &[libc::iovec], len: usize) -> Push {
        self.hold.push(self.epoch, iov, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn iov(b: &[u8]) -> [libc::iovec; 1] {
        [libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }]
    }

    fn push(h: &mut TxHold, e: u64, b: &[u8]) -> bool {
        match h.push(Epoch(e), &iov(b), b.len()) {
            Push::Done => true,
            Push::Full => false,
            Push::Failed(e) => panic!("{e}"),
        }
    }

    fn release(h: &mut TxHold, e: u64) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        h.release_through(Epoch(e), |f| {
            v.push(f.to_vec());
            Ok(())
        });
        v
    }

    #[test]
    fn commit_releases_prefix_in_order_abort_discards() {
        let mut h = TxHold::new(1000, 100);
        assert!(push(&mut h, 1, b"a1"));
        assert_eq!(h.take_output_pending(), Some(Epoch(1)));
        assert!(push(&mut h, 1, b"a2"));
        assert_eq!(h.take_output_pending(), None);
        assert!(push(&mut h, 2, b"b1"));
        assert_eq!(h.take_output_pending(), Some(Epoch(2)));
        assert!(push(&mut h, 3, b"c1"));
        assert_eq!(h.frames_through(Epoch(2)), 3);
        assert!(release(&mut h, 0).is_empty());
        assert_eq!(
            release(&mut h, 2),
            vec![b"a1".to_vec(), b"a2".into(), b"b1".into()]
        );
        assert_eq!(h.len(), 1);
        assert_eq!(h.bytes(), 2);
        let d = h.discard_all();
        assert_eq!(d.frames, 1);
        assert!(release(&mut h, 99).is_empty());
    }

    #[test]
    fn full_by_packets_and_by_bytes_then_room_after_commit() {
        let mut h = TxHold::new(10, 3);
        assert!(push(&mut h, 1, b"1234"));
        assert!(push(&mut h, 1, b"5678"));
        assert!(!push(&mut h, 1, b"abc"), "only 2 bytes left");
        assert!(push(&mut h, 1, b"ab"));
        assert!(!push(&mut h, 1, b"x"), "packet bound");
        assert_eq!(release(&mut h, 1).len(), 3);
        assert!(push(&mut h, 2, b"0123456789"));
        assert!(matches!(
            h.push(Epoch(2), &iov(&[0; 11]), 11),
            Push::Failed(_)
        ));
    }

    #[test]
    fn ring_wraps_without_overwriting_held_frames() {
        let mut h = TxHold::new(10, 10);
        assert!(push(&mut h, 1, b"aaaa"));
        assert!(push(&mut h, 2, b"bbbb"));
        assert_eq!(release(&mut h, 1), vec![b"aaaa".to_vec()]);
        // 2 bytes at the end, 4 free at the front: must wrap, and strictly below head.
        assert!(!push(&mut h, 3, b"cccc"));
        assert!(push(&mut h, 3, b"ccc"));
        assert!(!push(&mut h, 3, b"d"));
        assert_eq!(release(&mut h, 3), vec![b"bbbb".to_vec(), b"ccc".to_vec()]);
        assert!(h.is_empty());
    }

    proptest! {
        /// Random pushes, commits and aborts against a model: released frames are exactly the
        /// model's frames of epochs <= E, in order, with their bytes intact; bounds hold.
        #[test]
        fn matches_model(ops in proptest::collection::vec((0u8..4, 1usize..40), 1..200)) {
            let mut h = TxHold::new(100, 6);
            let mut model: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
            let mut epoch = 1u64;
            let mut seq = 0u8;
            for (op, n) in ops {
                match op {
                    0 | 1 => {
                        seq = seq.wrapping_add(1);
                        let f = vec![seq; n];
                        if push(&mut h, epoch, &f) {
                            model.push_back((epoch, f));
                        }
                        prop_assert!(h.len() <= 6 && h.bytes() <= 100);
                    }
                    2 => {
                        let e = epoch.saturating_sub((n % 3) as u64);
                        let got = release(&mut h, e);
                        let mut want = Vec::new();
                        while model.front().is_some_and(|(fe, _)| *fe <= e) {
                            want.push(model.pop_front().unwrap().1);
                        }
                        prop_assert_eq!(got, want);
                        epoch += 1;
                    }
                    _ => {
                        if n % 5 == 0 {
                            h.discard_all();
                            model.clear();
                        } else {
                            epoch += 1;
                        }
                    }
                }
                prop_assert_eq!(h.len(), model.len());
                prop_assert_eq!(h.bytes(), model.iter().map(|(_, f)| f.len()).sum::<usize>());
            }
        }
    }
}
