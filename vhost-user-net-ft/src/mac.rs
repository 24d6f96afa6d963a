// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Ethernet MAC addresses: parsing `aa:bb:cc:dd:ee:ff`, and generating a random locally
//! administered unicast address when the user gives none.
//!
//! Invariant: a [`MacAddr`] used as the guest MAC is unicast (bit 0 of the first octet clear);
//! parsing refuses multicast addresses because a guest with one would never receive unicast.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error)]
pub enum MacError {
    #[error("invalid MAC address {0:?}: expected six hex octets separated by ':'")]
    Syntax(String),
    #[error("MAC address {0} is multicast; a guest MAC must be unicast")]
    Multicast(MacAddr),
    #[error("cannot get random bytes for a MAC address: {0}")]
    Random(std::io::Error),
}

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// A random locally administered (bit 1 set) unicast (bit 0 clear) address.
    pub fn random() -> Result<MacAddr, MacError> {
        let mut b = [0u8; 6];
        // SAFETY: getrandom writes at most b.len() bytes into the buffer we own.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            return Err(MacError::Random(std::io::Error::last_os_error()));
        }
        b[0] = (b[0] & !1) | 2;
        Ok(MacAddr(b))
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || MacError::Syntax(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(syntax)?;
            if p.is_empty() || p.len() > 2 {
                return Err(syntax());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        let mac = MacAddr(out);
        if mac.is_multicast() {
            return Err(MacError::Multicast(mac));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let m: MacAddr = "52:54:00:AB:cd:0e".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0e]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0e");
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0e:11",
            "52:54:00:ab:cd:",
            "52:54:00:ab:cd:123",
            "52-54-00-ab-cd-0e",
            "zz:54:00:ab:cd:0e",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(MacError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacError::Multicast(_))
        ));
    }

    #[test]
    fn random_is_local_unicast_and_varies() {
        let a = MacAddr::random().unwrap();
        let b = MacAddr::random().unwrap();
        assert!(!a.is_multicast());
        assert_eq!(a.0[0] & 2, 2);
        assert_ne!(a, b);
    }
}
