// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Entry points for the fuzz targets in `fuzz/` (and the regression tests that replay the
//! inputs they found): whole-input functions that must never panic, hang or touch memory
//! outside the guest memory they are given.

use crate::request::{parse, DiskLimits};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest-physical base of the fuzz guest memory (not 0: virtio-queue refuses rings there).
const BASE: u64 = 0x1_0000;
const MEM: usize = 0x1_0000;
const SIZE: u16 = 16;
const DESC: u64 = BASE;
const AVAIL: u64 = BASE + 0x100;
const USED: u64 = BASE + 0x200;

/// virtio-blk chain parser: the input is the descriptor table (16 entries, 256 bytes), one
/// byte naming the head, a capacity/readonly byte, then guest memory contents from
/// `BASE + 0x300`. Every chain the queue yields is parsed; accepted requests have their
/// accessors exercised and their data ranges checked against guest memory.
pub fn blk_chain(data: &[u8]) {
    // Short inputs read as zero-padded (the fixed-layout part is 258 bytes).
    let mut padded = data.to_vec();
    padded.resize(data.len().max(258), 0);
    let data = &padded[..];
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), MEM)]) else {
        return;
    };
    let _ = mem.write_slice(&data[..256], GuestAddress(DESC));
    let head = u16::from(data[256]) % (SIZE + 2); // sometimes beyond the ring
    let limits = DiskLimits {
        capacity_sectors: u64::from(data[257] >> 1) * 8,
        readonly: data[257] & 1 != 0,
    };
    let rest = &data[258..];
    let rest = &rest[..rest.len().min(MEM - 0x300)];
    let _ = mem.write_slice(rest, GuestAddress(BASE + 0x300));
    let _ = mem.write_obj(head, GuestAddress(AVAIL + 4));
    let _ = mem.write_obj(1u16, GuestAddress(AVAIL + 2));
    let mut q = match Queue::new(SIZE) {
        Ok(q) => q,
        Err(_) => return,
    };
    q.set_size(SIZE);
    q.set_desc_table_address(Some(DESC as u32), Some((DESC >> 32) as u32));
    q.set_avail_ring_address(Some(AVAIL as u32), Some((AVAIL >> 32) as u32));
    q.set_used_ring_address(Some(USED as u32), Some((USED >> 32) as u32));
    q.set_ready(true);
    let Ok(mut it) = q.iter(&mem) else { return };
    let Some(chain) = it.next() else { return };
    match parse(chain, &limits) {
        Ok(req) => {
            let _ = req.kind().is_output();
            let len = req.data_len();
            let _ = (req.head(), req.status_addr(), req.offset());
            for status in [0u8, 1, 2] {
                assert!(req.used_len(status) <= len.saturating_add(1));
            }
            let mut total = 0u64;
            req.for_each_written_range(len as usize, |gpa, n| {
                assert!(
                    gpa >= BASE && gpa + n <= BASE + MEM as u64,
                    "range outside memory"
                );
                total += n;
            });
            let written = req.write_data(&mem, &rest[..rest.len().min(len as usize)]);
            assert!(written <= len as usize);
            let _ = req.iovecs().len();
        }
        Err(rej) => {
            if let Some(a) = rej.status_addr {
                assert!(
                    a.0 >= BASE && a.0 < BASE + MEM as u64,
                    "status outside memory"
                );
            }
        }
    }
}
