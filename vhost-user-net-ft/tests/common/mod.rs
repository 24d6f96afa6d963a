// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test support: private network namespaces and an AF_PACKET socket to see the host side of a
//! tap (frames the daemon writes to the tap are "received" by the interface; frames sent on the
//! socket come out of the tap fd).

#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Test frames use the local experimental ethertype, so kernel chatter on the tap (IPv6 router
/// solicitations, MLD reports once the link is up) can be told apart and ignored.
pub const ETH_P_TEST: u16 = 0x88b5;

/// Runs `f` on a thread in a fresh network namespace (taps, addresses and packet sockets made
/// there vanish with it; processes spawned from the thread inherit it).
pub use ft_tests::netns::in_netns;

/// An Ethernet test frame: dst, src, ETH_P_TEST, then `payload`.
pub fn eth_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETH_P_TEST.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// A raw socket bound to `ifname` seeing only ETH_P_TEST frames.
    pub fn bind(ifname: &str) -> io::Result<PacketSocket> {
        Self::bind_proto(ifname, ETH_P_TEST)
    }

    /// A raw socket bound to `ifname` seeing only frames of ethertype `ethertype`.
    pub fn bind_proto(ifname: &str, ethertype: u16) -> io::Result<PacketSocket> {
        let ifindex = vhost_user_net_ft::open_tap::if_index(ifname)? as i32;
        let proto = ethertype.to_be() as i32;
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                proto,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: binds with a valid sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // Room for bursts (a whole commit) without drops in the socket (root may force it).
        let size: libc::c_int = 16 << 20;
        // SAFETY: setsockopt with a c_int option value we own.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        Ok(PacketSocket { fd, ifindex })
    }

    /// Transmits a whole Ethernet frame out of the interface (it comes out of the tap fd).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sends from a buffer we own.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Frames received by the interface (written to the tap fd), excluding our own outgoing
    /// ones, waiting until `quiet` passes with nothing new or `total` elapses.
    pub fn collect(&self, quiet: Duration, total: Duration) -> Vec<Vec<u8>> {
        let start = Instant::now();
        let mut last = Instant::now();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70000];
        while last.elapsed() < quiet && start.elapsed() < total {
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut alen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: receives into buffers we own.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut alen,
                )
            };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            out.push(buf[..n as usize].to_vec());
            last = Instant::now();
        }
        out
    }
}
