// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One tap queue: an fd on /dev/net/tun attached to a tap interface with IFF_VNET_HDR.
//!
//! Every frame read or written carries the virtio-net header first (its length set with
//! TUNSETVNETHDRSZ to match what the guest negotiated), so frames move between the rings and the
//! tap without rewriting headers. The fd is non-blocking: reads return `WouldBlock` when the
//! queue is empty, which ends an RX pass; the fd is polled by the daemon's epoll loop.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// Offload flags the tap can accept from us (TUNSETOFFLOAD): what it may hand us in RX frames.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
pub const TUN_F_UFO: u32 = libc::TUN_F_UFO;

#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl Tap {
    /// Wraps an fd already attached with TUNSETIFF (see `open_tap`).
    pub(crate) fn from_file(file: File, name: String) -> Tap {
        Tap { file, name }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the virtio-net header length the tap prepends/expects (10 or 12).
    pub fn set_vnet_hdr_size(&self, len: usize) -> io::Result<()> {
        let size = len as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int from the pointer, which outlives the call.
        cvt(unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) })?;
        Ok(())
    }

    /// Tells the tap which offloads (TUN_F_*) the guest accepts on RX.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        cvt(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        })?;
        Ok(())
    }

    /// The tap's send buffer (TUNGETSNDBUF): how many bytes of written frames the kernel may
    /// hold before a non-blocking write is refused with `EAGAIN`. `i32::MAX` (the default;
    /// QEMU sets it too unless told otherwise) means a write is never refused for room.
    pub fn send_buffer(&self) -> io::Result<i32> {
        let mut size: libc::c_int = 0;
        // SAFETY: TUNGETSNDBUF writes one c_int through the pointer, which outlives the call.
        cvt(unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNGETSNDBUF, &mut size) })?;
        Ok(size)
    }

    /// Sets the tap's send buffer (TUNSETSNDBUF), for every queue of the interface.
    pub fn set_send_buffer(&self, size: i32) -> io::Result<()> {
        // SAFETY: TUNSETSNDBUF reads one c_int from the pointer, which outlives the call.
        cvt(unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETSNDBUF, &size) })?;
        Ok(())
    }

    /// Reads one frame (header included). `WouldBlock` when the queue is empty.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes into memory we own.
        cvt_size(unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    /// Writes one frame (header included) from a contiguous buffer.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes from memory we own.
        cvt_size(unsafe { libc::write(self.file.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
    }

    /// Reads one frame scattered over `iov`.
    ///
    /// # Safety
    /// Every iovec must describe writable memory that stays valid for the call.
    pub unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        cvt_size(libc::readv(
            self.file.as_raw_fd(),
            iov.as_ptr(),
            iov.len() as libc::c_int,
        ))
    }

    /// Writes one frame gathered from `iov`: one frame per call, as tap semantics require.
    ///
    /// # Safety
    /// Every iovec must describe readable memory that stays valid for the call.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        cvt_size(libc::writev(
            self.file.as_raw_fd(),
            iov.as_ptr(),
            iov.len() as libc::c_int,
        ))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
