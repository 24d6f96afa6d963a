// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-net device identity: offered feature bits and the config space
//! (`struct virtio_net_config`: `mac[6]`, status u16, max_virtqueue_pairs u16, little endian).
//!
//! Invariants: an offload is offered only if the tap accepted it when probed (so whatever the
//! guest negotiates can be forwarded with TUNSETOFFLOAD); MQ is offered only with more than one
//! queue pair, together with CTRL_VQ as the spec requires (the frontend, e.g. QEMU, serves the
//! control queue; it never reaches this daemon). Config reads outside the structure return an
//! error, never out-of-bounds bytes.

use crate::mac::MacAddr;
use crate::open_tap::TapOffloads;
use crate::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Size of the config space we expose (up to and including max_virtqueue_pairs).
pub const CONFIG_LEN: usize = 10;

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Feature bits this device offers for a tap with `offloads` and `pairs` queue pairs.
pub fn device_features(offloads: TapOffloads, pairs: u16) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_RING_F_EVENT_IDX);
    // TX offloads (guest -> tap) need the tap's vnet header only; RX offloads (tap -> guest)
    // need TUNSETOFFLOAD support, which is what `offloads` records.
    if offloads.csum {
        f |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
        if offloads.tso {
            f |= bit(VIRTIO_NET_F_HOST_TSO4)
                | bit(VIRTIO_NET_F_HOST_TSO6)
                | bit(VIRTIO_NET_F_HOST_ECN)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_ECN);
        }
        if offloads.ufo {
            f |= bit(VIRTIO_NET_F_HOST_UFO) | bit(VIRTIO_NET_F_GUEST_UFO);
        }
    }
    if pairs > 1 {
        f |= bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
    }
    f
}

/// The TUN_F_* flags to give the tap for the negotiated features: the tap may only hand us
/// frames with offloads the guest accepts on RX.
pub fn tap_offload_flags(acked: u64) -> u32 {
    let has = |b| acked & bit(b) != 0;
    let mut t = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        t |= TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            t |= TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            t |= TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) && t & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
            t |= TUN_F_TSO_ECN;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            t |= TUN_F_UFO;
        }
    }
    t
}

/// `struct virtio_net_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: MacAddr,
    pub status: u16,
    pub max_virtqueue_pairs: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("config access at offset {offset} length {len} outside the {CONFIG_LEN}-byte config")]
pub struct ConfigRange {
    pub offset: u32,
    pub len: u32,
}

impl NetConfig {
    pub fn new(mac: MacAddr, pairs: u16) -> NetConfig {
        NetConfig {
            mac,
            status: VIRTIO_NET_S_LINK_UP as u16,
            max_virtqueue_pairs: pairs,
        }
    }

    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..6].copy_from_slice(&self.mac.0);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b
    }

    /// Bytes `offset..offset+len` of the config space.
    pub fn read(&self, offset: u32, len: u32) -> Result<Vec<u8>, ConfigRange> {
        let all = self.to_bytes();
        let start = offset as usize;
        let end = start
            .checked_add(len as usize)
            .filter(|e| *e <= CONFIG_LEN)
            .ok_or(ConfigRange { offset, len })?;
        Ok(all[start..end].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_and_bounds() {
        let c = NetConfig::new(MacAddr([2, 0, 0, 0, 0, 1]), 4);
        assert_eq!(c.to_bytes(), [2, 0, 0, 0, 0, 1, 1, 0, 4, 0]);
        assert_eq!(c.read(6, 2).unwrap(), vec![1, 0]);
        assert!(c.read(8, 4).is_err());
        assert!(c.read(u32::MAX, 2).is_err());
    }

    #[test]
    fn features_follow_tap_and_queues() {
        let none = device_features(TapOffloads::default(), 1);
        assert_eq!(none & bit(VIRTIO_NET_F_CSUM), 0);
        assert_eq!(none & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(none & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
        let all = TapOffloads {
            csum: true,
            tso: true,
            ufo: true,
        };
        let f = device_features(all, 2);
        for b in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(f & bit(b), 0, "bit {b}");
        }
        assert_eq!(
            tap_offload_flags(f),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
        );
        assert_eq!(tap_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    }
}
