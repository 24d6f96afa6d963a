// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The gratuitous RARP that announces the guest's MAC after a failover or migration (what QEMU's
//! `qemu_announce_self` sends): switches relearn on which port the MAC now lives.
//!
//! Frame: broadcast destination, guest MAC source, ethertype 0x8035 (RARP), opcode 3 (reverse
//! request), sender and target hardware address = guest MAC, protocol addresses 0, padded to the
//! 60-byte Ethernet minimum; preceded by an all-zero virtio-net header for the tap.

use crate::mac::MacAddr;

pub const ETH_P_RARP: u16 = 0x8035;
/// Minimum Ethernet frame without FCS.
const ETH_ZLEN: usize = 60;

/// The RARP announcement for `mac`, with a zeroed virtio-net header of `hdr_len` bytes.
pub fn rarp_frame(mac: MacAddr, hdr_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; hdr_len];
    f.extend_from_slice(&MacAddr::BROADCAST.0);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ETH_P_RARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f.push(6); // hardware address length
    f.push(4); // protocol address length
    f.extend_from_slice(&3u16.to_be_bytes()); // opcode: reverse request
    f.extend_from_slice(&mac.0); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&mac.0); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(hdr_len + ETH_ZLEN, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_layout() {
        let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let f = rarp_frame(mac, 12);
        assert_eq!(f.len(), 72);
        assert!(f[..12].iter().all(|b| *b == 0));
        let e = &f[12..];
        assert_eq!(e[0..6], [0xff; 6]);
        assert_eq!(e[6..12], mac.0);
        assert_eq!(e[12..14], [0x80, 0x35]);
        assert_eq!(e[20..22], [0, 3]);
        assert_eq!(e[22..28], mac.0);
        assert_eq!(e[32..38], mac.0);
    }
}
