// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Applies shipped epochs to the replica's image: every op in guest order, then **one**
//! `fdatasync`; only then may the epoch be acknowledged.
//!
//! Torn epochs: the apply is not atomic (a crash can leave part of an epoch on the image), and
//! it need not be, because it is idempotent on retry and a torn epoch is never *relied on*:
//! - The primary completes none of an epoch's requests towards the guest before the replica's
//!   acknowledgement, so every request of a torn epoch is still outstanding in every checkpoint
//!   the coordinator can have acknowledged; a takeover replays all of them, in guest order,
//!   over whatever part reached the image.
//! - The primary re-sends the unacknowledged epoch after a reconnect; applying the same ops in
//!   the same order again gives the same bytes (WRITE, DISCARD and WRITE_ZEROES are idempotent,
//!   and applying the whole sequence again overwrites any prefix of it), and the server
//!   re-applies only the newest epoch, never an older one over a newer one.
//!
//! A write-ahead log would cost a second `fdatasync` per epoch for nothing the above does not
//! already give.

use super::protocol::{EpochView, Op, ProtoError};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Zeroes written per call where `fallocate` cannot discard or zero.
const ZERO_CHUNK: usize = 1 << 20;

/// The replica's image file.
#[derive(Debug)]
pub struct ReplicaImage {
    file: File,
    size: u64,
    path: PathBuf,
    zeroes: Vec<u8>,
}

/// What one apply did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Applied {
    pub ops: u32,
    pub bytes: u64,
    pub apply: Duration,
    pub fdatasync: Duration,
}

/// Why an epoch was not applied (or not made durable).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Invalid(#[from] ProtoError),
    #[error("{what} at {offset}: {err}")]
    Io {
        what: &'static str,
        offset: u64,
        err: io::Error,
    },
}

impl ReplicaImage {
    /// Opens an existing image (a regular file or a block device) read-write.
    pub fn open(path: &Path) -> io::Result<ReplicaImage> {
        let file = File::options().read(true).write(true).open(path)?;
        let size = file_size(&file)?;
        Ok(ReplicaImage {
            file,
            size,
            path: path.to_path_buf(),
            zeroes: Vec::new(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks every op, applies them in order and syncs once. On an error nothing is
    /// acknowledged; what was written stays (see the module doc: a retry re-applies it all).
    pub fn apply(&mut self, epoch: &EpochView<'_>) -> Result<Applied, ApplyError> {
        epoch.validate(self.size)?;
        let t0 = Instant::now();
        let mut out = Applied::default();
        for op in epoch.ops() {
            out.ops += 1;
            match op? {
                Op::Write { offset, data } => {
                    self.file
                        .write_all_at(data, offset)
                        .map_err(|err| ApplyError::Io {
                            what: "write",
                            offset,
                            err,
                        })?;
                    out.bytes += data.len() as u64;
                }
                Op::Discard { offset, len } => self.zero(offset, len, true)?,
                Op::WriteZeroes { offset, len, unmap } => self.zero(offset, len, unmap)?,
                // The epoch's single fdatasync below answers every FLUSH of the epoch; the
                // guest sees none of them complete before the acknowledgement.
                Op::Flush => {}
                // The server records these around the apply (see `server::apply`).
                Op::SyncStart | Op::SyncDone { .. } => {}
            }
        }
        out.apply = t0.elapsed();
        let t1 = Instant::now();
        // SAFETY: plain syscall on a descriptor `self.file` owns.
        if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 {
            return Err(ApplyError::Io {
                what: "fdatasync",
                offset: 0,
                err: io::Error::last_os_error(),
            });
        }
        out.fdatasync = t1.elapsed();
        Ok(out)
    }

    /// `[offset, offset+len)` reads back as zeroes afterwards, as on the primary (its DISCARD
    /// punches a hole, WRITE_ZEROES zeroes the range): fallocate, or zeroes written where the
    /// filesystem cannot.
    fn zero(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), ApplyError> {
        if len == 0 {
            return Ok(());
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: plain syscall on a descriptor `self.file` owns; range checked by validate.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(ApplyError::Io {
                what: "fallocate",
                offset,
                err,
            });
        }
        if self.zeroes.is_empty() {
            self.zeroes = vec![0; ZERO_CHUNK];
        }
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(ZERO_CHUNK as u64) as usize;
            self.file
                .write_all_at(&self.zeroes[..n], at)
                .map_err(|err| ApplyError::Io {
                    what: "write zeroes",
                    offset: at,
                    err,
                })?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Size of a regular file or a block device.
pub fn file_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // A block device: its size is where SEEK_END lands.
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::Epoch;
    use crate::replica::protocol::{read_body, read_header, EpochFrame};

    fn image(len: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("replica.img");
        std::fs::write(&p, vec![0xeeu8; len as usize]).unwrap();
        (dir, p)
    }

    fn body(f: &EpochFrame) -> Vec<u8> {
        let mut r = f.bytes();
        let h = read_header(&mut r).unwrap();
        let mut b = Vec::new();
        read_body(&mut r, &h, u64::MAX, &mut b).unwrap();
        b
    }

    #[test]
    fn ops_apply_in_guest_order_and_a_second_apply_changes_nothing() {
        let (_d, p) = image(64 << 10);
        let mut img = ReplicaImage::open(&p).unwrap();
        let mut f = EpochFrame::default();
        f.begin(1, Epoch(1));
        f.write(0, [&[1u8; 8192][..]].into_iter());
        f.discard(4096, 4096);
        f.write(6144, [&[2u8; 512][..]].into_iter());
        f.write_zeroes(16384, 4096, false);
        f.flush();
        f.finish();
        let b = body(&f);
        let v = EpochView::parse(&b).unwrap();
        let a = img.apply(&v).unwrap();
        assert_eq!((a.ops, a.bytes), (5, 8192 + 512));
        let first = std::fs::read(&p).unwrap();
        assert!(first[..4096].iter().all(|&x| x == 1));
        assert!(first[4096..6144].iter().all(|&x| x == 0));
        assert!(first[6144..6656].iter().all(|&x| x == 2));
        assert!(first[6656..8192].iter().all(|&x| x == 0));
        assert!(first[8192..16384].iter().all(|&x| x == 0xee));
        assert!(first[16384..20480].iter().all(|&x| x == 0));
        // Idempotent on retry.
        img.apply(&v).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), first);
    }

    #[test]
    fn an_out_of_range_epoch_changes_nothing() {
        let (_d, p) = image(8192);
        let mut img = ReplicaImage::open(&p).unwrap();
        let mut f = EpochFrame::default();
        f.begin(1, Epoch(1));
        f.write(0, [&[1u8; 512][..]].into_iter());
        f.write(8000, [&[1u8; 512][..]].into_iter());
        f.finish();
        let b = body(&f);
        assert!(img.apply(&EpochView::parse(&b).unwrap()).is_err());
        assert!(std::fs::read(&p).unwrap().iter().all(|&x| x == 0xee));
    }
}
