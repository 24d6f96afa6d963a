// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk device identity: feature bits and the `virtio_blk_config` space.
//!
//! Invariants: the config layout is little-endian at the offsets of the virtio 1.x spec
//! (section 5.2.4); the only guest-writable field is `writeback` (CONFIG_WCE), and a guest
//! write anywhere else is ignored, never applied. The limits advertised here (seg_max, discard and
//! write-zeroes limits) come from `limits.rs`, which `request.rs` enforces.

use crate::image::{Image, SECTOR_SHIFT};
use crate::limits::{MAX_DATA_SEGS, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGS};
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of `struct virtio_blk_config` up to and including `write_zeroes_may_unmap` + padding.
pub const CONFIG_SIZE: usize = 60;

// Field offsets in `struct virtio_blk_config`.
const OFF_CAPACITY: usize = 0;
const OFF_SEG_MAX: usize = 12;
const OFF_BLK_SIZE: usize = 20;
const OFF_PHYS_BLOCK_EXP: usize = 24;
const OFF_MIN_IO_SIZE: usize = 26;
const OFF_OPT_IO_SIZE: usize = 28;
const OFF_WRITEBACK: usize = 32;
const OFF_NUM_QUEUES: usize = 34;
const OFF_MAX_DISCARD_SECTORS: usize = 36;
const OFF_MAX_DISCARD_SEG: usize = 40;
const OFF_DISCARD_ALIGN: usize = 44;
const OFF_MAX_WZ_SECTORS: usize = 48;
const OFF_MAX_WZ_SEG: usize = 52;
const OFF_WZ_MAY_UNMAP: usize = 56;

/// Device parameters fixed at startup.
#[derive(Clone, Debug)]
pub struct BlkParams {
    pub capacity_sectors: u64,
    pub readonly: bool,
    pub num_queues: u16,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    /// GET_ID answer: up to 20 bytes, not NUL-terminated when exactly 20.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

impl BlkParams {
    pub fn new(image: &Image, num_queues: u16, serial: &str) -> BlkParams {
        let mut s = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = serial.len().min(s.len());
        s[..n].copy_from_slice(&serial.as_bytes()[..n]);
        BlkParams {
            capacity_sectors: image.capacity_sectors(),
            readonly: image.readonly(),
            num_queues,
            logical_block_size: image.logical_block_size(),
            physical_block_size: image.physical_block_size(),
            serial: s,
        }
    }

    /// The virtio feature bits the device offers (the vhost-user PROTOCOL_FEATURES bit is the
    /// server's business).
    pub fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_MQ;
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            // Both modify the disk: a read-only device does not offer them.
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// Logical block size in sectors (>= 1).
    pub fn block_sectors(&self) -> u64 {
        u64::from(self.logical_block_size >> SECTOR_SHIFT).max(1)
    }
}

/// The config space plus the one mutable bit in it, shared by all queue threads.
#[derive(Debug)]
pub struct BlkConfig {
    params: BlkParams,
    /// Write-back cache enabled (guest-visible `writeback`). When off, writes are made durable
    /// before completion (RWF_DSYNC).
    writeback: AtomicBool,
}

impl BlkConfig {
    pub fn new(params: BlkParams) -> BlkConfig {
        BlkConfig {
            params,
            writeback: AtomicBool::new(true),
        }
    }

    pub fn params(&self) -> &BlkParams {
        &self.params
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Reset to the power-on default (write back), as on a device reset.
    pub fn reset(&self) {
        self.writeback.store(true, Ordering::Relaxed);
    }

    /// The current config space bytes.
    pub fn bytes(&self) -> [u8; CONFIG_SIZE] {
        let p = &self.params;
        let mut b = [0u8; CONFIG_SIZE];
        let put = |b: &mut [u8; CONFIG_SIZE], off: usize, v: &[u8]| {
            b[off..off + v.len()].copy_from_slice(v)
        };
        put(&mut b, OFF_CAPACITY, &p.capacity_sectors.to_le_bytes());
        put(&mut b, OFF_SEG_MAX, &(MAX_DATA_SEGS as u32).to_le_bytes());
        put(&mut b, OFF_BLK_SIZE, &p.logical_block_size.to_le_bytes());
        let ratio = (p.physical_block_size / p.logical_block_size.max(1)).max(1);
        b[OFF_PHYS_BLOCK_EXP] = ratio.trailing_zeros() as u8;
        put(&mut b, OFF_MIN_IO_SIZE, &1u16.to_le_bytes());
        put(&mut b, OFF_OPT_IO_SIZE, &0u32.to_le_bytes());
        b[OFF_WRITEBACK] = u8::from(self.writeback());
        put(&mut b, OFF_NUM_QUEUES, &p.num_queues.to_le_bytes());
        if !p.readonly {
            let align = p.block_sectors() as u32;
            put(
                &mut b,
                OFF_MAX_DISCARD_SECTORS,
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(&mut b, OFF_MAX_DISCARD_SEG, &MAX_DISCARD_SEGS.to_le_bytes());
            put(&mut b, OFF_DISCARD_ALIGN, &align.to_le_bytes());
            put(
                &mut b,
                OFF_MAX_WZ_SECTORS,
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(&mut b, OFF_MAX_WZ_SEG, &MAX_DISCARD_SEGS.to_le_bytes());
            b[OFF_WZ_MAY_UNMAP] = 1;
        }
        b
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of our layout read as zero.
    pub fn read(&self, offset: u32, buf: &mut [u8]) {
        let bytes = self.bytes();
        for (i, out) in buf.iter_mut().enumerate() {
            *out = (offset as usize)
                .checked_add(i)
                .and_then(|o| bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Applies a guest config write. Only `writeback` is writable; anything else is ignored
    /// (the spec makes the rest read-only) and reported as `false`.
    pub fn write(&self, offset: u32, data: &[u8]) -> bool {
        if offset as usize == OFF_WRITEBACK && data.len() == 1 {
            self.writeback.store(data[0] != 0, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(readonly: bool) -> BlkParams {
        BlkParams {
            capacity_sectors: 2048,
            readonly,
            num_queues: 4,
            logical_block_size: 512,
            physical_block_size: 4096,
            serial: *b"serial-0123456789abc",
        }
    }

    #[test]
    fn layout_matches_the_spec_offsets() {
        let c = BlkConfig::new(params(false));
        let b = c.bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
        assert_eq!(
            u32::from_le_bytes(b[12..16].try_into().unwrap()),
            MAX_DATA_SEGS as u32
        );
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(b[24], 3); // 4096 / 512 = 2^3
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(
            u32::from_le_bytes(b[36..40].try_into().unwrap()),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[52..56].try_into().unwrap()), 1);
        assert_eq!(b[56], 1);
        // Offsets agree with the kernel header's struct.
        use std::mem::offset_of;
        assert_eq!(offset_of!(virtio_blk_config, num_queues), OFF_NUM_QUEUES);
        assert_eq!(offset_of!(virtio_blk_config, wce), OFF_WRITEBACK);
        assert_eq!(
            offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            OFF_WZ_MAY_UNMAP
        );
        assert_eq!(
            offset_of!(virtio_blk_config, discard_sector_alignment),
            OFF_DISCARD_ALIGN
        );
    }

    #[test]
    fn only_writeback_is_writable() {
        let c = BlkConfig::new(params(false));
        assert!(c.write(32, &[0]));
        assert!(!c.writeback());
        assert_eq!(c.bytes()[32], 0);
        assert!(!c.write(0, &[1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(c.bytes()[0..8], 2048u64.to_le_bytes());
        c.reset();
        assert!(c.writeback());
    }

    #[test]
    fn reads_past_the_end_are_zero() {
        let c = BlkConfig::new(params(false));
        let mut buf = [0xffu8; 16];
        c.read(56, &mut buf);
        assert_eq!(buf[0], 1);
        assert!(buf[1..].iter().all(|&x| x == 0));
        c.read(u32::MAX, &mut buf);
        assert!(buf.iter().all(|&x| x == 0));
    }

    #[test]
    fn readonly_offers_ro_and_no_discard() {
        let ro = BlkParams::new_features_only(true);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        let rw = BlkParams::new_features_only(false);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_ne!(rw & (1 << VIRTIO_F_VERSION_1), 0);
    }

    impl BlkParams {
        fn new_features_only(readonly: bool) -> u64 {
            params(readonly).features()
        }
    }
}
