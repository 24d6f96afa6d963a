// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Entry points for the fuzz targets in `fuzz/` (and the regression tests that replay the
//! inputs they found): whole-input functions that must never panic, hang or touch memory
//! outside the guest memory they are given.

use crate::ring::QueueRing;
use crate::stats::NetCounters;
use crate::tx::{copy_from_iov, Push, TxPath, TxSink};
use crate::vnet_hdr::{VnetHdr, VNET_HDR_LEN, VNET_HDR_LEN_LEGACY};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BASE: u64 = 0x1_0000;
const MEM: usize = 0x1_0000;
const SIZE: u16 = 16;
const DESC: u64 = BASE;
const AVAIL: u64 = BASE + 0x100;
const USED: u64 = BASE + 0x200;

/// A sink that reads every frame it is given (so gathered iovecs are really dereferenced)
/// and is full every `full_every`-th push.
struct Reader {
    pushes: usize,
    full_every: usize,
    buf: Vec<u8>,
}

impl TxSink for Reader {
    fn push(&mut self, iov: &[libc::iovec], len: usize) -> Push {
        self.pushes += 1;
        if self.full_every > 0 && self.pushes.is_multiple_of(self.full_every) {
            return Push::Full;
        }
        self.buf.resize(len, 0);
        let n = copy_from_iov(iov, &mut self.buf);
        assert_eq!(n, len, "iovecs shorter than the frame length");
        Push::Done
    }
}

/// virtio-net TX parser and vnet header validation: the input is 8 bytes of negotiated
/// features, a byte choosing the header length and the sink's behaviour, the avail ring's
/// idx and entries (16 x u16), the descriptor table (256 bytes), then guest memory from
/// `BASE + 0x300`. The TX path runs over the ring until it is empty, blocked or broken; the
/// first bytes are also decoded and validated as a header on their own.
pub fn net_tx(data: &[u8]) {
    // Short inputs read as zero-padded (the fixed-layout part is 299 bytes).
    let mut padded = data.to_vec();
    padded.resize(data.len().max(299), 0);
    let data = &padded[..];
    let features = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let mode = data[8];
    let hdr_len = if mode & 1 == 0 {
        VNET_HDR_LEN
    } else {
        VNET_HDR_LEN_LEGACY
    };
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr.copy_from_slice(&data[..VNET_HDR_LEN]);
    let _ = VnetHdr::decode(&hdr, hdr_len).validate_tx(features, usize::from(data[9]) * 64);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), MEM)]) else {
        return;
    };
    let idx = u16::from_le_bytes([data[9], data[10]]);
    let _ = mem.write_slice(&data[11..43], GuestAddress(AVAIL + 4));
    let _ = mem.write_obj(idx, GuestAddress(AVAIL + 2));
    let _ = mem.write_slice(&data[43..299], GuestAddress(DESC));
    let rest = &data[299..];
    let _ = mem.write_slice(
        &rest[..rest.len().min(MEM - 0x300)],
        GuestAddress(BASE + 0x300),
    );
    let Ok(mut q) = Queue::new(SIZE) else { return };
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let mut ring = QueueRing {
        queue: q,
        mem: &mem,
    };
    let mut tx = TxPath::new();
    tx.set_features(hdr_len, features);
    let counters = NetCounters::default();
    let mut sink = Reader {
        pushes: 0,
        full_every: usize::from(mode >> 1) % 4,
        buf: Vec::new(),
    };
    for _ in 0..3 {
        let pass = tx.process(&mut ring, &mut sink, &counters);
        assert!(
            pass.used <= usize::from(SIZE) * 2 + 2,
            "pass did not stop: {pass:?}"
        );
        if !pass.blocked {
            break;
        }
    }
}
