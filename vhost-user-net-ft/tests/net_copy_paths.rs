// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! RX and TX copy paths over virtio-queue's MockSplitQueue (a driver-side ring in test memory):
//! multi-descriptor TX frames, every TX drop reason, backpressure, RX with and without merged
//! buffers (num_buffers), a ring running dry in the middle of a frame, a ring stopped while a
//! frame is parked.

use std::collections::VecDeque;
use std::io;
use vhost_user_net_ft::ring::QueueRing;
use vhost_user_net_ft::rx::{FrameSource, RxPath};
use vhost_user_net_ft::stats::{DropReason, NetCounters};
use vhost_user_net_ft::tx::{copy_from_iov, Push, TxPath, TxSink};
use vhost_user_net_ft::vnet_hdr::{VnetHdr, VNET_HDR_LEN};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const QSIZE: u16 = 64;

fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

struct Driver<'a> {
    vq: MockSplitQueue<'a, Mem>,
    next_desc: u16,
    mem: &'a Mem,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a Mem) -> (Driver<'a>, QueueRing<'a, Mem>) {
        Self::with_size(mem, QSIZE)
    }

    fn with_size(mem: &'a Mem, size: u16) -> (Driver<'a>, QueueRing<'a, Mem>) {
        let vq = MockSplitQueue::create(mem, GuestAddress(0x1000), size);
        let queue: Queue = vq.create_queue().unwrap();
        (
            Driver {
                vq,
                next_desc: 0,
                mem,
            },
            QueueRing { queue, mem },
        )
    }

    /// Adds one chain of (addr, len, device-writable) descriptors; returns its head.
    fn chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let base = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, base + i as u16 + 1))
            })
            .collect();
        self.vq.add_desc_chains(&raw, base).unwrap();
        self.next_desc += descs.len() as u16;
        base
    }

    /// Writes `data` at `addr` and adds a TX chain splitting it at `cuts`.
    fn tx_frame(&mut self, addr: u64, data: &[u8], cuts: &[usize]) -> u16 {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        let mut descs = Vec::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&data.len())) {
            descs.push((addr + prev as u64, (c - prev) as u32, false));
            prev = c;
        }
        self.chain(&descs)
    }

    fn used(&self) -> Vec<(u32, u32)> {
        let n = self.vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = self.vq.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| tag.wrapping_add(i as u8)));
    f
}

#[derive(Default)]
struct Collect {
    frames: Vec<Vec<u8>>,
    room: Option<usize>,
}

impl TxSink for Collect {
    fn push(&mut self, iov: &[libc::iovec], len: usize) -> Push {
        if self.room == Some(0) {
            return Push::Full;
        }
        if let Some(r) = self.room.as_mut() {
            *r -= 1;
        }
        let mut b = vec![0u8; len];
        assert_eq!(copy_from_iov(iov, &mut b), len);
        self.frames.push(b);
        Push::Done
    }
}

#[test]
fn tx_multi_descriptor_frames_arrive_whole_and_in_order() {
    let m = mem();
    let (mut drv, mut ring) = Driver::new(&m);
    let f1 = frame(1, 60);
    let f2 = frame(2, 1500);
    // Header split over two descriptors, frame over three more.
    let h1 = drv.tx_frame(0x10_0000, &f1, &[5, 12, 20, 40]);
    let h2 = drv.tx_frame(0x20_0000, &f2, &[12]);
    let c = NetCounters::default();
    let mut sink = Collect::default();
    let mut tx = TxPath::new();
    let pass = tx.process(&mut ring, &mut sink, &c);
    assert_eq!((pass.frames, pass.used, pass.blocked), (2, 2, false));
    assert_eq!(sink.frames, vec![f1, f2]);
    assert_eq!(drv.used(), vec![(h1 as u32, 0), (h2 as u32, 0)]);
    assert_eq!(c.tx.frames(), 2);
    assert_eq!(c.tx.dropped_total(), 0);
}

#[test]
fn tx_bad_frames_are_dropped_counted_and_completed() {
    let m = mem();
    let (mut drv, mut ring) = Driver::new(&m);
    // Short header: 8 bytes.
    drv.tx_frame(0x10_0000, &[0u8; 8], &[]);
    // Device-writable descriptor in a TX chain.
    drv.chain(&[(0x11_0000, 12, false), (0x11_1000, 60, true)]);
    // Oversized: 70000 bytes.
    drv.tx_frame(0x20_0000, &frame(3, 70000 - VNET_HDR_LEN), &[]);
    // Runt: 10-byte frame.
    drv.tx_frame(0x30_0000, &frame(4, 10), &[]);
    // Invalid header flags.
    let mut bad = frame(5, 60);
    bad[0] = 0x80;
    drv.tx_frame(0x31_0000, &bad, &[]);
    // GSO not negotiated.
    let mut gso = frame(6, 100);
    VnetHdr {
        flags: 1,
        gso_type: 1,
        gso_size: 50,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    }
    .encode(&mut gso, VNET_HDR_LEN);
    drv.tx_frame(0x32_0000, &gso, &[]);
    // Descriptor outside guest memory.
    drv.chain(&[(0x4000_0000, 100, false)]);
    // A good frame after all that.
    let good = frame(7, 64);
    drv.tx_frame(0x33_0000, &good, &[]);

    let c = NetCounters::default();
    let mut sink = Collect::default();
    let pass = TxPath::new().process(&mut ring, &mut sink, &c);
    assert_eq!(pass.used, 8, "every chain is returned to the guest");
    assert_eq!(pass.frames, 1);
    assert_eq!(sink.frames, vec![good]);
    assert_eq!(c.tx.dropped(DropReason::ShortHeader), 1);
    assert_eq!(c.tx.dropped(DropReason::BadDescriptor), 2);
    assert_eq!(c.tx.dropped(DropReason::Oversized), 1);
    assert_eq!(c.tx.dropped(DropReason::Runt), 1);
    assert_eq!(c.tx.dropped(DropReason::BadHeader), 2);
    assert_eq!(drv.used().len(), 8);
}

#[test]
fn tx_backpressure_puts_the_chain_back_and_resumes_in_order() {
    let m = mem();
    let (mut drv, mut ring) = Driver::new(&m);
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(i, 60 + i as usize)).collect();
    for (i, f) in frames.iter().enumerate() {
        drv.tx_frame(0x10_0000 + 0x1000 * i as u64, f, &[12]);
    }
    let c = NetCounters::default();
    let mut tx = TxPath::new();
    let mut sink = Collect {
        room: Some(2),
        ..Default::default()
    };
    let pass = tx.process(&mut ring, &mut sink, &c);
    assert_eq!((pass.frames, pass.used, pass.blocked), (2, 2, true));
    assert_eq!(drv.used().len(), 2, "the refused chain is not completed");
    sink.room = None;
    let pass = tx.process(&mut ring, &mut sink, &c);
    assert_eq!((pass.frames, pass.blocked), (3, false));
    assert_eq!(sink.frames, frames, "nothing lost, nothing reordered");
    assert_eq!(c.tx.dropped_total(), 0);
}

struct Frames(VecDeque<Vec<u8>>);

impl FrameSource for Frames {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let f = self.0.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        buf[..f.len()].copy_from_slice(&f);
        Ok(f.len())
    }
}

fn read(m: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    m.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b
}

#[test]
fn rx_without_mrg_rxbuf_fills_one_chain_with_num_buffers_1() {
    let m = mem();
    let (mut drv, mut ring) = Driver::new(&m);
    let h = drv.chain(&[(0x10_0000, 50, true), (0x11_0000, 2000, true)]);
    let f = frame(9, 100);
    let mut src = Frames(VecDeque::from([f.clone()]));
    let c = NetCounters::default();
    let mut rx = RxPath::new();
    rx.set_features(VNET_HDR_LEN, false);
    let pass = rx.process(&mut src, &mut ring, &c).unwrap();
    assert_eq!((pass.frames, pass.used, pass.blocked), (1, 1, false));
    assert_eq!(drv.used(), vec![(h as u32, f.len() as u32)]);
    let mut got = read(&m, 0x10_0000, 50);
    got.extend(read(&m, 0x11_0000, f.len() - 50));
    let hdr = VnetHdr::decode(&got, VNET_HDR_LEN);
    assert_eq!(hdr.num_buffers, 1);
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
}

#[test]
fn rx_merged_buffers_span_chains_and_count_them() {
    let m = mem();
    let (mut drv, mut ring) = Driver::new(&m);
    // Three 1000-byte chains (the second split in two descriptors) for a 2988+12 byte frame,
    // then a 4th chain for a small frame.
    let h0 = drv.chain(&[(0x10_0000, 1000, true)]);
    let h1 = drv.chain(&[(0x11_0000, 400, true), (0x12_0000, 600, true)]);
    let f = frame(3, 2500);
    let small = frame(4, 60);
    let mut src = Frames(VecDeque::from([f.clone(), small.clone()]));
    let c = NetCounters::default();
    let mut rx = RxPath::new();
    rx.set_features(VNET_HDR_LEN, true);
    // Ring runs dry in the middle of the first frame: it parks, nothing is completed.
    let pass = rx.process(&mut src, &mut ring, &c).unwrap();
    assert_eq!((pass.frames, pass.used, pass.blocked), (0, 0, true));
    assert!(drv.used().is_empty());
    assert!(rx.is_blocked());
    // The guest adds buffers; the parked frame completes with num_buffers = 3.
    let h2 = drv.chain(&[(0x13_0000, 1000, true)]);
    let h3 = drv.chain(&[(0x14_0000, 1000, true)]);
    let pass = rx.process(&mut src, &mut ring, &c).unwrap();
    assert_eq!((pass.frames, pass.used, pass.blocked), (2, 4, false));
    assert_eq!(
        drv.used(),
        vec![
            (h0 as u32, 1000),
            (h1 as u32, 1000),
            (h2 as u32, (f.len() - 2000) as u32),
            (h3 as u32, small.len() as u32)
        ]
    );
    let mut got = read(&m, 0x10_0000, 1000);
    got.extend(read(&m, 0x11_0000, 400));
    got.extend(read(&m, 0x12_0000, 600));
    got.extend(read(&m, 0x13_0000, f.len() - 2000));
    assert_eq!(VnetHdr::decode(&got, VNET_HDR_LEN).num_buffers, 3);
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
    let s = read(&m, 0x14_0000, small.len());
    assert_eq!(VnetHdr::decode(&s, VNET_HDR_LEN).num_buffers, 1);
    assert_eq!(s[VNET_HDR_LEN..], small[VNET_HDR_LEN..]);
    assert_eq!(c.rx.frames(), 2);
}

/// A ring stop (VM pause) while a frame is parked over two of three needed chains: the chains
/// go back on the avail ring untouched and the frame arrives whole after the restart.
#[test]
fn rx_frame_parked_at_ring_stop_is_kept_and_delivered_after_restart() {
    let m = mem();
    let (mut drv, mut ring) = Driver::new(&m);
    let h0 = drv.chain(&[(0x10_0000, 1000, true)]);
    let h1 = drv.chain(&[(0x11_0000, 1000, true)]);
    let f = frame(7, 2500);
    let mut src = Frames(VecDeque::from([f.clone()]));
    let c = NetCounters::default();
    let mut rx = RxPath::new();
    rx.set_features(VNET_HDR_LEN, true);
    let pass = rx.process(&mut src, &mut ring, &c).unwrap();
    assert!(pass.blocked);
    assert_eq!(ring.queue.next_avail(), 2);
    rx.shelve(&mut ring, &c);
    // GET_VRING_BASE would now report 0: both chains are the guest's again, nothing used.
    assert_eq!(ring.queue.next_avail(), 0);
    assert!(drv.used().is_empty());
    assert_eq!(c.rx.dropped_total(), 0);
    assert!(rx.is_blocked(), "the frame is kept");
    // The ring restarts from that base (a new Queue, as after SET_VRING_BASE 0) and the guest
    // adds a third buffer.
    let mut restarted = QueueRing {
        queue: drv.vq.create_queue().unwrap(),
        mem: &m,
    };
    let h2 = drv.chain(&[(0x12_0000, 1000, true)]);
    let pass = rx.process(&mut src, &mut restarted, &c).unwrap();
    assert_eq!((pass.frames, pass.used, pass.blocked), (1, 3, false));
    assert_eq!(
        drv.used(),
        vec![
            (h0 as u32, 1000),
            (h1 as u32, 1000),
            (h2 as u32, (f.len() - 2000) as u32)
        ]
    );
    let mut got = read(&m, 0x10_0000, 1000);
    got.extend(read(&m, 0x11_0000, 1000));
    got.extend(read(&m, 0x12_0000, f.len() - 2000));
    assert_eq!(VnetHdr::decode(&got, VNET_HDR_LEN).num_buffers, 3);
    assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
    assert_eq!((c.rx.frames(), c.rx.dropped_total()), (1, 0));
}

/// If a bad chain was consumed between the parked frame's chains, they cannot be put back one
/// by one: the stop returns them empty and drops the frame (counted), never re-exposing the
/// consumed chain.
#[test]
fn rx_shelve_falls_back_to_abandon_around_a_consumed_bad_chain() {
    let m = mem();
    let (mut drv, mut ring) = Driver::new(&m);
    let h0 = drv.chain(&[(0x10_0000, 1000, true)]);
    let bad = drv.chain(&[(0x11_0000, 1000, false)]);
    let f = frame(8, 2500);
    let mut src = Frames(VecDeque::from([f]));
    let c = NetCounters::default();
    let mut rx = RxPath::new();
    rx.set_features(VNET_HDR_LEN, true);
    assert!(rx.process(&mut src, &mut ring, &c).unwrap().blocked);
    rx.shelve(&mut ring, &c);
    assert_eq!(ring.queue.next_avail(), 2);
    assert_eq!(drv.used(), vec![(bad as u32, 0), (h0 as u32, 0)]);
    assert!(!rx.is_blocked());
    assert_eq!(c.rx.dropped(DropReason::Reset), 1);
}

#[test]
fn rx_bad_chains_and_too_small_buffers_are_handled() {
    let m = mem();
    let (mut drv, mut ring) = Driver::new(&m);
    // A device-readable descriptor in an RX chain: completed empty, counted.
    let bad = drv.chain(&[(0x10_0000, 1000, false)]);
    // A 100-byte buffer: too small for the 500-byte frame without MRG_RXBUF.
    let small = drv.chain(&[(0x11_0000, 100, true)]);
    let big = frame(1, 500);
    let fits = frame(2, 60);
    let mut src = Frames(VecDeque::from([big, fits.clone()]));
    let c = NetCounters::default();
    let mut rx = RxPath::new();
    rx.set_features(VNET_HDR_LEN, false);
    let pass = rx.process(&mut src, &mut ring, &c).unwrap();
    assert_eq!(pass.frames, 1);
    assert_eq!(c.rx.dropped(DropReason::BadDescriptor), 1);
    assert_eq!(c.rx.dropped(DropReason::Oversized), 1);
    // The small chain was put back and then carried the small frame.
    assert_eq!(
        drv.used(),
        vec![(bad as u32, 0), (small as u32, fits.len() as u32)]
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// One descriptor: (in guest memory?, length, device-writable?).
    fn desc() -> impl Strategy<Value = (bool, u32, bool)> {
        (
            prop::bool::weighted(0.9),
            0u32..3000,
            prop::bool::weighted(0.2),
        )
    }

    fn chains() -> impl Strategy<Value = Vec<Vec<(bool, u32, bool)>>> {
        prop::collection::vec(prop::collection::vec(desc(), 1..4), 1..12)
    }

    fn place(drv: &mut Driver, chains: &[Vec<(bool, u32, bool)>]) {
        for (i, c) in chains.iter().enumerate() {
            let descs: Vec<(u64, u32, bool)> = c
                .iter()
                .enumerate()
                .map(|(j, &(inside, len, w))| {
                    let addr = if inside {
                        0x10_0000 + 0x1_0000 * (4 * i + j) as u64
                    } else {
                        0x4000_0000
                    };
                    (addr, len, w)
                })
                .collect();
            drv.chain(&descs);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Arbitrary TX chains: no panic; every chain is completed exactly once; every chain is
        /// either a frame handed to the sink or a counted drop.
        #[test]
        fn tx_any_chains(chains in chains()) {
            let m = mem();
            let (mut drv, mut ring) = Driver::new(&m);
            place(&mut drv, &chains);
            let c = NetCounters::default();
            let mut sink = Collect::default();
            let pass = TxPath::new().process(&mut ring, &mut sink, &c);
            prop_assert_eq!(pass.used, chains.len());
            prop_assert_eq!(drv.used().len(), chains.len());
            let mut heads: Vec<u32> = drv.used().iter().map(|u| u.0).collect();
            heads.dedup();
            prop_assert_eq!(heads.len(), chains.len(), "no head completed twice");
            prop_assert_eq!(sink.frames.len() as u64 + c.tx.dropped_total(), chains.len() as u64);
        }

        /// Arbitrary RX chains and frame sizes, with and without MRG_RXBUF: no panic; used
        /// lengths of a delivered frame add up to it; nothing is completed twice; frames are
        /// delivered, dropped, or still parked.
        #[test]
        fn rx_any_chains(
            chains in chains(),
            sizes in prop::collection::vec(14usize..5000, 1..6),
            mrg in any::<bool>(),
        ) {
            let m = mem();
            let (mut drv, mut ring) = Driver::new(&m);
            place(&mut drv, &chains);
            let frames: Vec<Vec<u8>> =
                sizes.iter().enumerate().map(|(i, &n)| frame(i as u8, n)).collect();
            let mut src = Frames(frames.iter().cloned().collect());
            let c = NetCounters::default();
            let mut rx = RxPath::new();
            rx.set_features(VNET_HDR_LEN, mrg);
            let pass = rx.process(&mut src, &mut ring, &c).unwrap();
            let used = drv.used();
            prop_assert_eq!(used.len(), pass.used);
            prop_assert!(used.len() <= chains.len());
            let mut heads: Vec<u32> = used.iter().map(|u| u.0).collect();
            heads.sort_unstable();
            heads.dedup();
            prop_assert_eq!(heads.len(), used.len(), "no head completed twice");
            let parked = u64::from(rx.is_blocked());
            prop_assert!(c.rx.frames() + c.rx.dropped(DropReason::Oversized) + parked
                <= frames.len() as u64);
            prop_assert_eq!(pass.frames as u64, c.rx.frames());
            let total: u64 = used.iter().map(|u| u64::from(u.1)).sum();
            prop_assert!(total >= c.rx.frames() * VNET_HDR_LEN as u64);
        }
    }
}

#[test]
fn rx_pass_is_bounded_by_its_budget() {
    use vhost_user_net_ft::rx::RX_BUDGET;
    let m = mem();
    let (mut drv, mut ring) = Driver::with_size(&m, 512);
    for i in 0..512u64 {
        drv.chain(&[(0x10_0000 + 0x1000 * i, 2048, true)]);
    }
    let n = RX_BUDGET + 10;
    let mut src = Frames((0..n).map(|i| frame(i as u8, 60)).collect());
    let c = NetCounters::default();
    let mut rx = RxPath::new();
    rx.set_features(VNET_HDR_LEN, true);
    let first = rx.process(&mut src, &mut ring, &c).unwrap();
    assert_eq!((first.frames, first.blocked), (RX_BUDGET, false));
    let rest = rx.process(&mut src, &mut ring, &c).unwrap();
    assert_eq!((rest.frames, rest.blocked), (10, false));
    assert_eq!(drv.used().len(), n);
}

/// Linux's EVENT_IDX kick rule (`vring_need_event`): having moved its avail idx from `old` to
/// `new`, the driver kicks only if the device's avail_event lies in `[old, new)`.
fn linux_kicks(avail_event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The device's avail_event (last field of the used ring).
fn avail_event(drv: &Driver<'_>, size: u16) -> u16 {
    drv.mem
        .read_obj(GuestAddress(drv.vq.used_addr().0 + 4 + 8 * u64::from(size)))
        .unwrap()
}

/// A guest that posts one small RX buffer right before each time the device re-arms
/// notifications (the race the re-check after enabling closes), without kicking.
struct EagerGuest<'a> {
    ring: QueueRing<'a, Mem>,
    drv: Driver<'a>,
    adds_left: usize,
    next_addr: u64,
}

impl<'a> vhost_user_net_ft::ring::Ring for EagerGuest<'a> {
    type M = &'a Mem;
    fn pop(&mut self) -> Option<virtio_queue::DescriptorChain<&'a Mem>> {
        self.ring.pop()
    }
    fn unpop(&mut self, head: u16) {
        self.ring.unpop(head)
    }
    fn add_used(&mut self, head: u16, len: u32) -> bool {
        self.ring.add_used(head, len)
    }
    fn enable_notification(&mut self) -> bool {
        if self.adds_left > 0 {
            // Published after the device's last pop and before its re-arm: the guest read the
            // old avail_event and did not kick; the device's re-check must find the buffer.
            self.adds_left -= 1;
            self.drv.chain(&[(self.next_addr, 100, true)]);
            self.next_addr += 0x1000;
        }
        self.ring.enable_notification()
    }
    fn disable_notification(&mut self) {
        self.ring.disable_notification()
    }
    fn mem(&self) -> &Mem {
        self.ring.mem()
    }
}

/// Issue 16, net RX lost wakeup: buffers arriving one at a time while a large frame waits made
/// the RX pass park after three re-checks that each found new buffers, with avail_event left
/// behind the guest's avail idx; a guest following Linux's kick rule then never kicks again
/// and RX is dead. Whenever a pass parks, the guest's next buffer must raise a kick, and that
/// kick must deliver the frame.
#[test]
fn rx_parks_only_with_avail_event_at_the_guests_avail_idx() {
    let m = mem();
    let (drv, mut ring) = Driver::new(&m);
    ring.queue.set_event_idx(true);
    let mut g = EagerGuest {
        ring,
        drv,
        adds_left: 5,
        next_addr: 0x10_0000,
    };
    // Needs 10 of the 100-byte buffers; the guest trickles in 5 during the pass.
    let big = frame(7, 1000 - VNET_HDR_LEN);
    let mut src = Frames(VecDeque::from([big.clone()]));
    let c = NetCounters::default();
    let mut rx = RxPath::new();
    rx.set_features(VNET_HDR_LEN, true);
    let pass = rx.process(&mut src, &mut g, &c).unwrap();
    assert!(pass.blocked && rx.is_blocked(), "{pass:?}");
    let idx = g.drv.vq.avail().idx().load();
    let event = avail_event(&g.drv, QSIZE);
    assert!(
        linux_kicks(event, idx.wrapping_add(1), idx),
        "parked with avail_event {event} behind the guest's avail idx {idx}: its next buffer \
         raises no kick"
    );
    // The guest adds the missing buffers (kicking, as the rule says) and the frame arrives.
    for i in 0..5u64 {
        g.drv.chain(&[(0x20_0000 + 0x1000 * i, 100, true)]);
    }
    let pass = rx.process(&mut src, &mut g, &c).unwrap();
    assert_eq!((pass.frames, pass.used, pass.blocked), (1, 10, false));
    assert_eq!(c.rx.frames(), 1);
}
