// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! RX: frames from the tap into the guest's RX ring. Never held: inbound traffic is not output.
//!
//! One frame at a time is read into a reusable buffer (virtio-net header included, as the tap
//! writes it with IFF_VNET_HDR), then scattered into as many RX chains as it needs. With
//! MRG_RXBUF the frame may span several chains and `num_buffers` in the first chain's header is
//! the number of chains used; without it the frame must fit one chain (else it is dropped and the
//! chain put back) and `num_buffers` is 1.
//!
//! Invariants: a frame is either delivered whole or dropped and counted; chains taken for a frame
//! stay owned by this path until the frame is complete (so a ring that runs dry in the middle of
//! a frame just parks it until the guest adds buffers, with no used entry written twice); a ring
//! stop (VM pause) does not lose a parked frame: its chains go back on the avail ring untouched
//! and the frame is delivered when the ring runs again ([`RxPath::shelve`]); no heap allocation
//! per frame (buffers and chain lists are reused).

use crate::ring::Ring;
use crate::stats::{DropReason, NetCounters};
use crate::tap::Tap;
use crate::vnet_hdr::{MAX_FRAME_LEN, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use std::io;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Most frames one RX pass delivers before yielding to the worker's other work.
pub const RX_BUDGET: usize = 256;

/// Where RX frames come from: the tap, or a test double.
pub trait FrameSource {
    /// Reads one frame (virtio-net header first). `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

impl FrameSource for &Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
}

/// Result of one RX pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxPass {
    /// Frames delivered to the guest.
    pub frames: usize,
    /// Used-ring entries written (the caller notifies the guest if this is not zero).
    pub used: usize,
    /// A frame is parked because the ring has no buffers: stop polling the tap until the guest
    /// kicks the RX queue.
    pub blocked: bool,
}

struct Chain {
    head: u16,
    cap: u32,
    segs_end: usize,
}

pub struct RxPath {
    buf: Box<[u8]>,
    /// Length of the frame parked in `buf` (header included); 0 when none.
    pending: usize,
    hdr_len: usize,
    mrg_rxbuf: bool,
    segs: Vec<(GuestAddress, u32)>,
    chains: Vec<Chain>,
    taken_cap: u64,
    /// A bad chain was consumed (used, length 0) between chains of the parked frame, so they
    /// are not the last ones popped and cannot be put back on the avail ring.
    interleaved: bool,
    /// Chains popped so far (progress marker for the re-arm loop).
    popped: u64,
}

impl Default for RxPath {
    fn default() -> Self {
        Self::new()
    }
}

impl RxPath {
    pub fn new() -> RxPath {
        RxPath {
            buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN].into_boxed_slice(),
            pending: 0,
            hdr_len: VNET_HDR_LEN,
            mrg_rxbuf: false,
            segs: Vec::with_capacity(64),
            chains: Vec::with_capacity(64),
            taken_cap: 0,
            interleaved: false,
            popped: 0,
        }
    }

    /// Applies negotiated features: header length (10 or 12) and MRG_RXBUF.
    pub fn set_features(&mut self, hdr_len: usize, mrg_rxbuf: bool) {
        self.hdr_len = hdr_len;
        self.mrg_rxbuf = mrg_rxbuf;
    }

    /// True while a frame waits for RX buffers.
    pub fn is_blocked(&self) -> bool {
        self.pending != 0
    }

    /// Heads of the chains taken for the parked frame (taken off the ring, not used yet), in
    /// the order taken. Empty while the ring is stopped: [`shelve`](Self::shelve) gave them back.
    pub fn taken_heads(&self) -> Vec<u16> {
        self.chains.iter().map(|c| c.head).collect()
    }

    /// Forgets the parked frame and chains (device reset, disconnect, feature change): the ring
    /// they came from is being torn down, so nothing is written to it.
    pub fn reset(&mut self, counters: &NetCounters) {
        if self.pending != 0 {
            counters.rx.count_drop(DropReason::Reset);
        }
        self.pending = 0;
        self.release_chains();
    }

    fn release_chains(&mut self) {
        self.segs.clear();
        self.chains.clear();
        self.taken_cap = 0;
        self.interleaved = false;
    }

    /// The ring is stopping while a frame waits for buffers, usually because the VM pauses
    /// (QEMU stops the rings at every checkpoint). Puts the chains taken for the frame back on
    /// the avail ring, untouched, and keeps the frame: when the ring runs again the frame is
    /// delivered into them (or later buffers). Where the chains cannot be put back, falls back
    /// to [`abandon`](Self::abandon).
    pub fn shelve<R: Ring>(&mut self, q: &mut R, counters: &NetCounters) {
        if self.pending == 0 {
            return;
        }
        if self.interleaved || !q.can_unpop_all() {
            return self.abandon(q, counters);
        }
        for c in self.chains.iter().rev() {
            q.unpop(c.head);
        }
        self.release_chains();
    }

    /// Gives the chains taken for a parked frame back to the guest empty (used length 0) and
    /// drops the frame: the ring is being stopped and must not keep chains in our hands.
    pub fn abandon<R: Ring>(&mut self, q: &mut R, counters: &NetCounters) {
        for c in &self.chains {
            q.add_used(c.head, 0);
        }
        self.reset(counters);
    }

    /// Moves frames from `src` into `q` until the source is empty or the ring runs dry.
    /// Notification suppression (EVENT_IDX) is handled here: the pass ends with guest
    /// notifications enabled and re-checks the ring to close the race with a late kick.
    pub fn process<R: Ring, S: FrameSource>(
        &mut self,
        src: &mut S,
        q: &mut R,
        counters: &NetCounters,
    ) -> io::Result<RxPass> {
        let mut pass = RxPass::default();
        // Consecutive re-arms after which the ring claimed new buffers but yielded none.
        let mut idle_rechecks = 0;
        loop {
            if self.pending == 0 {
                if pass.frames >= RX_BUDGET {
                    // Let TX and control work run; the tap is still readable, so epoll
                    // brings us back.
                    break;
                }
                match src.recv(&mut self.buf) {
                    Ok(n) if n < self.hdr_len => {
                        counters.drop_rx(DropReason::ShortHeader, format_args!("{n} bytes"));
                        continue;
                    }
                    Ok(n) => self.pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            let popped = self.popped;
            if self.take_chains(q, counters, &mut pass) {
                self.deliver(q, counters, &mut pass);
                idle_rechecks = 0;
                continue;
            }
            if self.pending == 0 {
                // The frame was dropped (too big for a non-mergeable buffer).
                continue;
            }
            if self.popped != popped {
                idle_rechecks = 0;
            }
            // Out of buffers: re-arm the kick (EVENT_IDX: avail_event = our next avail index)
            // and look again, in case the guest added buffers before it could see that. Park
            // only when the re-armed ring has nothing new: parking after new buffers showed up
            // would leave avail_event behind them, and a guest following Linux's rule (kick
            // only when avail_event lies in the range it just published) never kicks again.
            // A ring that claims new buffers but yields none is broken: park then.
            if !q.enable_notification() || idle_rechecks >= 2 {
                pass.blocked = true;
                break;
            }
            idle_rechecks += 1;
        }
        Ok(pass)
    }

    /// Takes chains until the parked frame fits. False if the ring ran dry first (chains taken
    /// so far stay ours) or the frame was dropped.
    fn take_chains<R: Ring>(
        &mut self,
        q: &mut R,
        counters: &NetCounters,
        pass: &mut RxPass,
    ) -> bool {
        let need = self.pending as u64;
        while self.chains.is_empty() || (self.mrg_rxbuf && self.taken_cap < need) {
            let Some(chain) = q.pop() else {
                return false;
            };
            self.popped = self.popped.wrapping_add(1);
            let head = chain.head_index();
            let mem = chain.memory();
            let segs_start = self.segs.len();
            let mut cap: u32 = 0;
            let mut bad = false;
            for d in chain.clone() {
                if !d.is_write_only()
                    || !mem.check_range(d.addr(), d.len() as usize, Permissions::Write)
                {
                    bad = true;
                    break;
                }
                cap = cap.saturating_add(d.len());
                self.segs.push((d.addr(), d.len()));
            }
            // Mergeable buffers must hold at least the header (virtio 5.1.6.3.1).
            if bad || cap == 0 || (self.chains.is_empty() && (cap as usize) < self.hdr_len) {
                self.segs.truncate(segs_start);
                counters.drop_rx(
                    DropReason::BadDescriptor,
                    format_args!("RX chain {head}: readable, unmapped or too small descriptor"),
                );
                // Give the bad chain back to the guest empty; it is consumed, never re-read.
                if q.add_used(head, 0) {
                    pass.used += 1;
                }
                self.interleaved |= !self.chains.is_empty();
                continue;
            }
            if !self.mrg_rxbuf && (cap as u64) < need {
                // Without MRG_RXBUF the guest promised big enough buffers; drop the frame and
                // put the untouched chain back for the next one.
                self.segs.truncate(segs_start);
                q.unpop(head);
                counters.drop_rx(
                    DropReason::Oversized,
                    format_args!("{need}-byte frame, {cap}-byte buffer, no MRG_RXBUF"),
                );
                self.pending = 0;
                return false;
            }
            self.taken_cap += cap as u64;
            self.chains.push(Chain {
                head,
                cap,
                segs_end: self.segs.len(),
            });
        }
        true
    }

    fn deliver<R: Ring>(&mut self, q: &mut R, counters: &NetCounters, pass: &mut RxPass) {
        let len = self.pending;
        if self.hdr_len >= VNET_HDR_LEN {
            let n = self.chains.len() as u16;
            self.buf[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
        }
        let mut off = 0usize;
        let mut seg = 0usize;
        let mut ok = true;
        for c in &self.chains {
            let start = off;
            while seg < c.segs_end {
                let (addr, slen) = self.segs[seg];
                seg += 1;
                let n = (slen as usize).min(len - off);
                if n > 0 && q.mem().write_slice(&self.buf[off..off + n], addr).is_err() {
                    ok = false;
                }
                off += n;
            }
            let used = (off - start) as u32;
            debug_assert!(used <= c.cap);
            if q.add_used(c.head, used) {
                pass.used += 1;
            }
        }
        if ok {
            counters.rx.count_frame(len - self.hdr_len);
            pass.frames += 1;
        } else {
            counters.drop_rx(
                DropReason::BadDescriptor,
                format_args!("guest memory write failed"),
            );
        }
        self.pending = 0;
        self.release_chains();
    }
}
