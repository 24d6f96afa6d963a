// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening the tap: attach to an existing tap interface or create it (`--tap NAME`), one fd per
//! queue pair (IFF_MULTI_QUEUE when more than one), all with IFF_VNET_HDR and non-blocking; probe
//! which offloads the tap supports; optionally give the host side an IPv4 address and bring it up
//! (`--ip ADDR/PREFIX`).
//!
//! The address is set with SIOCSIFADDR/SIOCSIFNETMASK/SIOCSIFFLAGS ioctls rather than by running
//! `ip` from iproute2: a daemon should not depend on a binary being on PATH or fork helpers, and
//! ioctls give typed errors in the daemon's own network namespace. The price is IPv4 only (IPv6
//! addresses need rtnetlink); an IPv6 `--ip` is refused with a clear error.
//!
//! A tap created here is not persistent: it disappears when the daemon's last fd closes.

use crate::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};
use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum OpenTapError {
    #[error("tap name {0:?} is empty, too long (max 15 bytes) or contains NUL")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("TUNSETIFF {name} (queue {queue}): {err}")]
    SetIff {
        name: String,
        queue: usize,
        err: io::Error,
    },
    #[error("tap {0}: TUNSETVNETHDRSZ: {1}")]
    VnetHdr(String, io::Error),
    #[error("at least one queue pair is needed")]
    NoQueues,
}

/// Which TUN_F_* offload sets the tap accepted when probed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapOffloads {
    pub csum: bool,
    pub tso: bool,
    pub ufo: bool,
}

fn ifreq_for(name: &str) -> Result<libc::ifreq, OpenTapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(OpenTapError::BadName(name.to_string()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(ifr)
}

fn attach(name: &str, flags: libc::c_int) -> io::Result<std::fs::File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut ifr = ifreq_for(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and updates the ifreq we own.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Opens `queues` fds on tap `name`, creating the interface if it does not exist. Each fd has
/// IFF_VNET_HDR with a 12-byte header (VERSION_1), is non-blocking and close-on-exec.
pub fn open_tap(name: &str, queues: usize) -> Result<Vec<Tap>, OpenTapError> {
    ifreq_for(name)?;
    if queues == 0 {
        return Err(OpenTapError::NoQueues);
    }
    let base = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    let mut taps = Vec::with_capacity(queues);
    for queue in 0..queues {
        let file = if queues == 1 {
            // A single queue works with a single-queue tap, and with an existing multi-queue
            // one (TUNSETIFF without IFF_MULTI_QUEUE fails with EINVAL on it).
            attach(name, base).or_else(|e| {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    attach(name, base | libc::IFF_MULTI_QUEUE)
                } else {
                    Err(e)
                }
            })
        } else {
            attach(name, base | libc::IFF_MULTI_QUEUE)
        }
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) => OpenTapError::OpenTun(err),
            _ => OpenTapError::SetIff {
                name: name.to_string(),
                queue,
                err,
            },
        })?;
        let tap = Tap::from_file(file, name.to_string());
        tap.set_vnet_hdr_size(crate::vnet_hdr::VNET_HDR_LEN)
            .map_err(|e| OpenTapError::VnetHdr(name.to_string(), e))?;
        taps.push(tap);
    }
    Ok(taps)
}

/// Probes which offloads the tap accepts, then turns them all off again; the device turns on
/// what the guest negotiates.
pub fn probe_offloads(tap: &Tap) -> TapOffloads {
    let ok = |f| tap.set_offload(f).is_ok();
    let res = TapOffloads {
        csum: ok(TUN_F_CSUM),
        tso: ok(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN),
        ufo: ok(TUN_F_CSUM | TUN_F_UFO),
    };
    let _ = tap.set_offload(0);
    res
}

/// An IPv4 address with prefix length, as given to `--ip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Prefix {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Ipv4Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected ADDR/PREFIX, e.g. 10.0.0.1/24"))?;
        if a.contains(':') {
            return Err(format!(
                "{s:?}: IPv6 is not supported by --ip (set it with `ip -6 addr add`)"
            ));
        }
        let addr = a
            .parse::<Ipv4Addr>()
            .map_err(|e| format!("{s:?}: bad IPv4 address: {e}"))?;
        let prefix = p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: prefix must be 0..=32"))?;
        Ok(Ipv4Prefix { addr, prefix })
    }
}

impl Ipv4Prefix {
    pub fn netmask(&self) -> Ipv4Addr {
        let m = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        Ipv4Addr::from(m)
    }
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the API is used in C.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_ioctl(
    sock: &OwnedFd,
    req: libc::Ioctl,
    ifr: &mut libc::ifreq,
    what: &str,
) -> io::Result<()> {
    // SAFETY: the SIOC*IF* requests used here read/write the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), req, ifr as *mut libc::ifreq) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn ifreq_io(name: &str) -> io::Result<libc::ifreq> {
    ifreq_for(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Brings interface `name` up (IFF_UP).
pub fn set_link_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut ifr = ifreq_io(name)?;
    ifreq_ioctl(&sock, libc::SIOCGIFFLAGS, &mut ifr, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ifreq_ioctl(&sock, libc::SIOCSIFFLAGS, &mut ifr, "SIOCSIFFLAGS")
}

/// Gives interface `name` the address `ip` and brings it up.
pub fn configure_ip(name: &str, ip: Ipv4Prefix) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut ifr = ifreq_io(name)?;
    ifr.ifr_ifru.ifru_addr = sockaddr_in(ip.addr);
    ifreq_ioctl(&sock, libc::SIOCSIFADDR, &mut ifr, "SIOCSIFADDR")?;
    let mut ifr = ifreq_io(name)?;
    ifr.ifr_ifru.ifru_netmask = sockaddr_in(ip.netmask());
    ifreq_ioctl(&sock, libc::SIOCSIFNETMASK, &mut ifr, "SIOCSIFNETMASK")?;
    set_link_up(name)
}

/// The interface index of `name` (for AF_PACKET sockets in tests and diagnostics).
pub fn if_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_prefix_parsing() {
        let p: Ipv4Prefix = "10.1.2.3/24".parse().unwrap();
        assert_eq!(p.addr, Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(p.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            "1.2.3.4/0".parse::<Ipv4Prefix>().unwrap().netmask(),
            Ipv4Addr::UNSPECIFIED
        );
        assert_eq!(
            "1.2.3.4/32".parse::<Ipv4Prefix>().unwrap().netmask(),
            Ipv4Addr::BROADCAST
        );
        for bad in ["10.0.0.1", "10.0.0.1/33", "10.0.0/8", "fe80::1/64", "x/8"] {
            assert!(bad.parse::<Ipv4Prefix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_tap_names_are_refused_before_any_syscall() {
        assert!(matches!(open_tap("", 1), Err(OpenTapError::BadName(_))));
        assert!(matches!(
            open_tap("a-name-way-too-long", 1),
            Err(OpenTapError::BadName(_))
        ));
        assert!(matches!(open_tap("ok", 0), Err(OpenTapError::NoQueues)));
    }
}
