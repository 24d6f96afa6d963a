// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-net header (`virtio_net_hdr_v1`) that precedes every frame on the rings and on the
//! tap (IFF_VNET_HDR), and validation of headers the guest puts on TX frames.
//!
//! Layout (little endian, virtio 1.x section 5.1.6): flags u8, gso_type u8, hdr_len u16,
//! gso_size u16, csum_start u16, csum_offset u16, num_buffers u16. It is 12 bytes when
//! VERSION_1 or MRG_RXBUF is negotiated, else 10 (legacy, no num_buffers). The tap is told the
//! same length with TUNSETVNETHDRSZ, so header bytes pass between ring and tap unchanged.
//!
//! Invariant: a header accepted by [`VnetHdr::validate_tx`] only asks for offloads the device
//! offered and the guest negotiated, and every offset it carries lies inside the frame.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;

/// Header length with VERSION_1 or MRG_RXBUF.
pub const VNET_HDR_LEN: usize = 12;
/// Legacy header length (neither VERSION_1 nor MRG_RXBUF).
pub const VNET_HDR_LEN_LEGACY: usize = 10;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Ethernet header length: anything shorter is not a frame.
pub const ETH_HLEN: usize = 14;
/// Largest frame (after the virtio-net header) either direction accepts: a 64 KiB GSO super
/// packet plus Ethernet and VLAN headers, as Linux's virtio_net and tap allow.
pub const MAX_FRAME_LEN: usize = 65535 + ETH_HLEN + 4;

pub const F_NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
pub const GSO_NONE: u8 = VIRTIO_NET_HDR_GSO_NONE as u8;
pub const GSO_TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
pub const GSO_UDP: u8 = VIRTIO_NET_HDR_GSO_UDP as u8;
pub const GSO_TCPV6: u8 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
pub const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;

/// Header length for a set of negotiated features.
pub fn hdr_len_for(features: u64) -> usize {
    if features & ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        VNET_HDR_LEN
    } else {
        VNET_HDR_LEN_LEGACY
    }
}

/// A decoded virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

/// Why a TX header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HdrError {
    #[error("unknown flags {0:#x}")]
    Flags(u8),
    #[error("GSO type {0:#x} unknown or not negotiated")]
    GsoType(u8),
    #[error("GSO without gso_size or without NEEDS_CSUM")]
    GsoParams,
    #[error("checksum at {start}+{offset} outside a {len}-byte frame")]
    CsumRange { start: u16, offset: u16, len: usize },
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl VnetHdr {
    /// Decodes the first 10 or 12 bytes of `b`; `b` must hold at least `len` bytes.
    pub fn decode(b: &[u8], len: usize) -> VnetHdr {
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le16(b, 2),
            gso_size: le16(b, 4),
            csum_start: le16(b, 6),
            csum_offset: le16(b, 8),
            num_buffers: if len >= VNET_HDR_LEN { le16(b, 10) } else { 0 },
        }
    }

    /// Encodes into the first `len` (10 or 12) bytes of `b`.
    pub fn encode(&self, b: &mut [u8], len: usize) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        if len >= VNET_HDR_LEN {
            b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        }
    }

    /// Checks a header the guest put on a TX frame of `frame_len` bytes (header excluded)
    /// against the negotiated `features`.
    pub fn validate_tx(&self, features: u64, frame_len: usize) -> Result<(), HdrError> {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        if self.flags & !F_NEEDS_CSUM != 0 {
            return Err(HdrError::Flags(self.flags));
        }
        if self.flags & F_NEEDS_CSUM != 0 {
            if !has(VIRTIO_NET_F_CSUM) {
                return Err(HdrError::Flags(self.flags));
            }
            let end = self.csum_start as usize + self.csum_offset as usize + 2;
            if end > frame_len {
                return Err(HdrError::CsumRange {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len: frame_len,
                });
            }
        }
        let ecn = self.gso_type & GSO_ECN != 0;
        let ok = match self.gso_type & !GSO_ECN {
            GSO_NONE => !ecn,
            GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4) && (!ecn || has(VIRTIO_NET_F_HOST_ECN)),
            GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6) && (!ecn || has(VIRTIO_NET_F_HOST_ECN)),
            GSO_UDP => has(VIRTIO_NET_F_HOST_UFO) && !ecn,
            _ => false,
        };
        if !ok {
            return Err(HdrError::GsoType(self.gso_type));
        }
        // A GSO packet must tell the tap how to segment and where the checksum goes.
        if self.gso_type != GSO_NONE && (self.gso_size == 0 || self.flags & F_NEEDS_CSUM == 0) {
            return Err(HdrError::GsoParams);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_UFO)
        | (1 << VIRTIO_F_VERSION_1);

    #[test]
    fn encode_decode_round_trip_le() {
        let h = VnetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 0x0102,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let mut b = [0u8; 12];
        h.encode(&mut b, VNET_HDR_LEN);
        assert_eq!(b[2..4], [0x02, 0x01]);
        assert_eq!(b[10..12], [3, 0]);
        assert_eq!(VnetHdr::decode(&b, VNET_HDR_LEN), h);
        let legacy = VnetHdr::decode(&b, VNET_HDR_LEN_LEGACY);
        assert_eq!(legacy.num_buffers, 0);
    }

    #[test]
    fn header_length_follows_features() {
        assert_eq!(hdr_len_for(1 << VIRTIO_F_VERSION_1), 12);
        assert_eq!(hdr_len_for(1 << VIRTIO_NET_F_MRG_RXBUF), 12);
        assert_eq!(hdr_len_for(0), 10);
    }

    #[test]
    fn plain_header_is_valid() {
        assert_eq!(VnetHdr::default().validate_tx(0, 60), Ok(()));
    }

    #[test]
    fn tx_validation_refuses_bad_headers() {
        let csum = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        assert_eq!(csum.validate_tx(ALL, 52), Ok(()));
        assert!(matches!(
            csum.validate_tx(ALL, 51),
            Err(HdrError::CsumRange { .. })
        ));
        // CSUM not negotiated.
        assert!(csum.validate_tx(0, 100).is_err());
        // Unknown flag bits.
        let f = VnetHdr {
            flags: 0x80,
            ..Default::default()
        };
        assert_eq!(f.validate_tx(ALL, 100), Err(HdrError::Flags(0x80)));
        // TSO without the feature, unknown GSO type, GSO without size.
        let tso = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..csum
        };
        assert_eq!(tso.validate_tx(ALL, 100), Ok(()));
        assert!(tso.validate_tx(1 << VIRTIO_NET_F_CSUM, 100).is_err());
        let bogus = VnetHdr { gso_type: 9, ..tso };
        assert_eq!(bogus.validate_tx(ALL, 100), Err(HdrError::GsoType(9)));
        let nosize = VnetHdr { gso_size: 0, ..tso };
        assert_eq!(nosize.validate_tx(ALL, 100), Err(HdrError::GsoParams));
        let ecn = VnetHdr {
            gso_type: GSO_TCPV4 | GSO_ECN,
            ..tso
        };
        assert!(ecn.validate_tx(ALL, 100).is_err());
        assert!(ecn
            .validate_tx(ALL | (1 << VIRTIO_NET_F_HOST_ECN), 100)
            .is_ok());
    }
}
