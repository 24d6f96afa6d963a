// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backing image: a raw file or a block device, opened once per daemon.
//!
//! Invariants: the capacity is fixed at open (in 512-byte sectors, rounded down; a partial tail
//! sector is never exposed); a read-only image is opened `O_RDONLY`, so even a parser bug cannot
//! write it; the file descriptor lives as long as the [`Image`] (engines borrow it by `Arc`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

/// virtio-blk addresses the disk in 512-byte sectors whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

// <linux/fs.h> ioctls (not in the libc crate).
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// What the image is; it decides how discard and write-zeroes map onto `fallocate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    File,
    BlockDevice,
}

/// How to open the image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOpts {
    pub readonly: bool,
    /// `O_DIRECT`: bypass the host page cache (guest buffers must be block aligned).
    pub direct: bool,
}

/// An open backing image and its geometry.
#[derive(Debug)]
pub struct Image {
    file: File,
    kind: ImageKind,
    readonly: bool,
    direct: bool,
    capacity_sectors: u64,
    logical_block_size: u32,
    physical_block_size: u32,
    /// See [`Image::buffered_writes_punted`].
    buffered_writes_punted: bool,
}

impl Image {
    /// Opens `path`. A regular file is used as is (its size is the disk size); a block device is
    /// asked for its size and block sizes.
    pub fn open(path: &Path, opts: OpenOpts) -> io::Result<Image> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.readonly);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path)?;
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let (kind, bytes, lbs, pbs) = if ft.is_block_device() {
            let fd = file.as_raw_fd();
            let mut size: u64 = 0;
            let mut lbs: libc::c_int = 0;
            let mut pbs: libc::c_uint = 0;
            // SAFETY: each ioctl writes one integer of the given type into a local we own.
            unsafe {
                if libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) < 0
                    || libc::ioctl(fd, BLKSSZGET, &mut lbs as *mut libc::c_int) < 0
                    || libc::ioctl(fd, BLKPBSZGET, &mut pbs as *mut libc::c_uint) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            let lbs = u32::try_from(lbs).unwrap_or(512).max(512);
            (ImageKind::BlockDevice, size, lbs, pbs.max(lbs))
        } else if ft.is_file() {
            (ImageKind::File, meta.len(), 512, 4096)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "image must be a regular file or a block device",
            ));
        };
        let buffered_writes_punted = kind == ImageKind::File
            && !opts.readonly
            && !opts.direct
            && !nowait_buffered_writes(path).unwrap_or(false);
        Ok(Image {
            file,
            kind,
            buffered_writes_punted,
            readonly: opts.readonly,
            direct: opts.direct,
            capacity_sectors: bytes >> SECTOR_SHIFT,
            logical_block_size: lbs,
            physical_block_size: pbs,
        })
    }

    pub fn kind(&self) -> ImageKind {
        self.kind
    }
    pub fn readonly(&self) -> bool {
        self.readonly
    }
    pub fn direct(&self) -> bool {
        self.direct
    }
    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }
    pub fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether io_uring hands each buffered write to this image to an io-wq worker thread: a
    /// writable regular file, not O_DIRECT, on a filesystem that refuses non-blocking buffered
    /// writes (`RWF_NOWAIT` gives EOPNOTSUPP on ext4 and tmpfs; xfs and btrfs accept it, and
    /// so does a block device). Found out at open on a scratch `O_TMPFILE` beside the image;
    /// if that cannot be done, assumed true.
    pub fn buffered_writes_punted(&self) -> bool {
        self.buffered_writes_punted
    }

    /// `fallocate` mode that discards `[off, off+len)`: deallocates and reads back as zeroes
    /// on both files and block devices.
    pub fn discard_mode(&self) -> i32 {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    }

    /// `fallocate` mode for WRITE_ZEROES. With `unmap` the range may be deallocated (a hole
    /// reads as zeroes); without it the blocks must stay allocated.
    pub fn write_zeroes_mode(&self, unmap: bool) -> i32 {
        if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        }
    }
}

/// Whether the filesystem holding `image` accepts a non-blocking (`RWF_NOWAIT`) buffered
/// write, tried on an unnamed `O_TMPFILE` in the same directory (the image itself is not
/// touched). None if that file cannot be made.
fn nowait_buffered_writes(image: &Path) -> Option<bool> {
    let dir = match image.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let probe = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .ok()?;
    let buf = [0u8; 4096];
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over a local buffer the kernel only reads.
    let n = unsafe { libc::pwritev2(probe.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
    if n >= 0 {
        return Some(true);
    }
    match io::Error::last_os_error().raw_os_error() {
        // Supported, but this write would have blocked (e.g. block allocation).
        Some(libc::EAGAIN) => Some(true),
        Some(libc::EOPNOTSUPP) => Some(false),
        _ => None,
    }
}

impl AsRawFd for Image {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp_image(bytes: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![0u8; bytes]).unwrap();
        (dir, p)
    }

    #[test]
    fn capacity_rounds_down_to_sectors() {
        let (_d, p) = tmp_image(4096 + 100);
        let img = Image::open(&p, OpenOpts::default()).unwrap();
        assert_eq!(img.capacity_sectors(), 8);
        assert_eq!(img.kind(), ImageKind::File);
        assert_eq!(img.logical_block_size(), 512);
    }

    #[test]
    fn readonly_image_is_opened_readonly() {
        let (_d, p) = tmp_image(4096);
        let img = Image::open(
            &p,
            OpenOpts {
                readonly: true,
                direct: false,
            },
        )
        .unwrap();
        let fl = unsafe { libc::fcntl(img.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
    }

    #[test]
    fn buffered_writes_punted_only_for_writable_buffered_files() {
        let (_d, p) = tmp_image(4096);
        let ro = OpenOpts {
            readonly: true,
            direct: false,
        };
        assert!(!Image::open(&p, ro).unwrap().buffered_writes_punted());
        let rw = Image::open(&p, OpenOpts::default()).unwrap();
        // The probe agrees with what the filesystem does with a non-blocking write.
        let buf = [0u8; 512];
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let n = unsafe { libc::pwritev2(rw.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
        let refused = n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP);
        assert_eq!(rw.buffered_writes_punted(), refused);
    }

    #[test]
    fn rejects_directories_and_missing_files() {
        let d = tempfile::tempdir().unwrap();
        assert!(Image::open(d.path(), OpenOpts::default()).is_err());
        assert!(Image::open(&d.path().join("nope"), OpenOpts::default()).is_err());
    }
}
