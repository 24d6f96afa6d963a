// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The persistent dirty-block log that makes failback cheap: which blocks of this host's image
//! may differ from the peer's (`vhost-user-blk-ft --dirty-log PATH`, read by
//! `ft-standby --replica-dirty-log PATH`; docs/architecture.md, "Failback").
//!
//! **Invariant: a block that may differ from the peer is marked dirty on stable storage before
//! its write can reach the disk.** "Marked on stable storage" means: its bit is set in the
//! on-disk bitmap *or* its extent is in the on-disk activity log (AL). After a crash every block
//! of an AL extent counts as dirty, so the set read back is a superset of the blocks that differ.
//!
//! This is DRBD's model (bitmap + activity log), and for the same reason: persisting each dirty
//! bit before its write would cost a synchronous metadata write per epoch, while writes
//! cluster in a few hot extents. Here:
//! - [`DirtyLog::mark`] sets the blocks' bits in memory and notes the extents touched; it does no
//!   I/O. [`DirtyLog::persist`], called once per commit before the local writes start, does
//!   nothing if every touched extent is already in the on-disk AL (the common case: no syscall);
//!   otherwise it writes one AL transaction (and, if extents leave the AL, the bitmap pages
//!   first), with an `fdatasync` each.
//! - An extent leaves the AL only after the bitmap pages covering it were written and synced, so
//!   its dirty bits are then on disk in the bitmap. (Two syncs per AL miss that evicts, one per
//!   miss that does not.)
//! - Clearing is lazy: a cleared bit reaches the disk with the next bitmap write; until then it
//!   is merely reported dirty again after a crash (copied once more, never lost).
//! - A clean [`DirtyLog::close`] (and `Drop`) writes the whole bitmap, syncs, then empties the
//!   AL: the log then holds exactly the in-memory set.
//! - The AL lives in two alternating slots with a sequence number and a CRC; a torn slot write
//!   leaves the older slot, which was a valid state (the new extents' writes had not started).
//!
//! Per epoch: on the replicating primary, [`DirtyLog::mark`] with an epoch also records which
//! blocks the epoch newly made dirty, and [`DirtyLog::ack`] of `E` clears those of epochs `<= E`
//! (the replica holds them now). A block that was already dirty when the epoch marked it (it is
//! due for a resync, or another epoch's) is not cleared by the ack: a partial write does not
//! make the rest of the block equal. A daemon that does not replicate (the new primary after a
//! takeover) marks without an epoch: its bits accumulate until a failback copies them.
//!
//! Lineage: both sides' logs record the number the primary drew when their last sync completed
//! ([`DirtyLog::lineage`]); a failback refuses a peer log of another lineage.
//!
//! File layout (little-endian): a 4 KiB header (magic `FTDL`, version, block size, extent
//! blocks, AL slots, image size, lineage, CRC-32C), two 4 KiB AL slots (sequence u64, count u32, CRC-32C
//! u32 of the rest, extents u32...), then the bitmap, one bit per 4 KiB block. The file is held
//! under an exclusive `flock` so that two processes never track into one log.

use crate::epoch::Epoch;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The tracking granularity: one bit per 4 KiB block.
pub const BLOCK_SIZE: u64 = 4096;
/// Default AL extent: 4 MiB (1024 blocks), as DRBD's.
pub const DEFAULT_EXTENT_BLOCKS: u32 = 1024;
/// Default number of AL extents (1 GiB of hot data with the default extent).
pub const DEFAULT_AL_SLOTS: u32 = 256;

const MAGIC: [u8; 4] = *b"FTDL";
const VERSION: u32 = 2;
const PAGE: u64 = 4096;
const AL_OFF: [u64; 2] = [PAGE, 2 * PAGE];
const BITMAP_OFF: u64 = 3 * PAGE;
const AL_HEAD: usize = 16;
/// Extents one AL slot can hold.
pub const MAX_AL_SLOTS: u32 = ((PAGE as usize - AL_HEAD) / 4) as u32;

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("dirty log {path}: {err}")]
    Io { path: PathBuf, err: io::Error },
    #[error("dirty log {path}: not a dirty log or corrupt header ({why})")]
    BadHeader { path: PathBuf, why: &'static str },
    #[error(
        "dirty log {path} tracks an image of {log_size} bytes, this image has {image_size}: \
         it belongs to another image, so which blocks differ is unknown (a full resync is \
         needed: remove the log and use --replica-resync full)"
    )]
    SizeMismatch {
        path: PathBuf,
        log_size: u64,
        image_size: u64,
    },
    #[error(
        "dirty log {path} does not exist: which blocks of the image differ from the peer's is \
         unknown (a full resync is needed: --replica-resync full)"
    )]
    Missing { path: PathBuf },
    #[error("dirty log {path} is in use by another process")]
    Locked { path: PathBuf },
}

/// How a new log is laid out (ignored when the log exists: its header wins).
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Blocks per AL extent.
    pub extent_blocks: u32,
    /// Extents the AL holds (at most [`MAX_AL_SLOTS`]).
    pub al_slots: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            extent_blocks: DEFAULT_EXTENT_BLOCKS,
            al_slots: DEFAULT_AL_SLOTS,
        }
    }
}

/// The log as STATUS reports it (`dirty_log` of a block device with `--dirty-log`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirtyLogStatus {
    pub path: String,
    /// Blocks (4 KiB) that may differ from the peer's image: what a failback would copy from
    /// this side.
    pub dirty_blocks: u64,
    pub image_blocks: u64,
    pub extent_blocks: u64,
    /// Extents in the on-disk activity log (after a crash these count as wholly dirty).
    pub al_extents: u64,
    pub al_writes: u64,
    pub fdatasyncs: u64,
    /// Commits that needed no I/O for the log.
    pub persist_free: u64,
    /// See [`DirtyLog::lineage`].
    #[serde(default)]
    pub lineage: u64,
}

/// What the log cost so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyStats {
    /// AL transactions written (each one `fdatasync`, plus one if the bitmap went first).
    pub al_writes: u64,
    pub bitmap_writes: u64,
    pub fdatasyncs: u64,
    /// Commits that needed no I/O at all.
    pub persist_free: u64,
}

pub struct DirtyLog {
    file: File,
    path: PathBuf,
    image_size: u64,
    nblocks: u64,
    extent_blocks: u64,
    al_slots: usize,
    /// The last sync this image took part in (see [`DirtyLog::lineage`]).
    lineage: u64,
    bits: Vec<u64>,
    /// The on-disk AL (as last synced), and membership per extent.
    al: Vec<u32>,
    in_al: Vec<bool>,
    al_seq: u64,
    /// Per extent: the commit that last touched it (for choosing what stays in the AL).
    last_use: Vec<u64>,
    commit_no: u64,
    /// Extents touched since the last persist.
    touched: Vec<u32>,
    touched_flag: Vec<bool>,
    /// Bitmap pages whose in-memory content differs from (may differ from) the disk.
    page_changed: Vec<bool>,
    any_page_changed: bool,
    /// (epoch, first block, blocks) that the epoch newly made dirty, cleared by its ack.
    pending: Vec<(Epoch, u64, u64)>,
    stats: DirtyStats,
    /// Test hook: a "crashed" log is dropped without its clean-close flush.
    abandoned: bool,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> DirtyLogError + '_ {
    move |err| DirtyLogError::Io {
        path: path.to_path_buf(),
        err,
    }
}

fn header_bytes(image_size: u64, g: Geometry, lineage: u64) -> [u8; PAGE as usize] {
    let mut h = [0u8; PAGE as usize];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    h[12..16].copy_from_slice(&g.extent_blocks.to_le_bytes());
    h[16..20].copy_from_slice(&g.al_slots.to_le_bytes());
    h[24..32].copy_from_slice(&image_size.to_le_bytes());
    h[32..40].copy_from_slice(&lineage.to_le_bytes());
    let crc = crc32c::crc32c(&h[..40]);
    h[40..44].copy_from_slice(&crc.to_le_bytes());
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn fdatasync(f: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor `f` owns.
    if unsafe { libc::fdatasync(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl DirtyLog {
    /// Opens the log at `path` for an image of `image_size` bytes, creating it (empty: nothing
    /// differs yet) with `geometry` if it does not exist. An existing log yields its on-disk
    /// bitmap plus every block of its AL extents (after a crash those may differ).
    pub fn open(path: &Path, image_size: u64, geometry: Geometry) -> Result<Self, DirtyLogError> {
        let e = io_err(path);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(&e)?;
        // SAFETY: flock on a descriptor `file` owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DirtyLogError::Locked {
                    path: path.to_path_buf(),
                });
            }
            return Err(e(err));
        }
        let nblocks = image_size.div_ceil(BLOCK_SIZE);
        let len = file.metadata().map_err(&e)?.len();
        let fresh = len == 0;
        let (g, lineage) = if fresh {
            let g = Geometry {
                extent_blocks: geometry.extent_blocks.max(1),
                al_slots: geometry.al_slots.clamp(1, MAX_AL_SLOTS),
            };
            // Bitmap and AL slots are zero (empty); the header goes last and is synced.
            file.set_len(BITMAP_OFF + nblocks.div_ceil(64) * 8)
                .map_err(&e)?;
            file.write_all_at(&header_bytes(image_size, g, 0), 0)
                .map_err(&e)?;
            file.sync_all().map_err(&e)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir).and_then(|d| d.sync_all()).map_err(&e)?;
            }
            (g, 0)
        } else {
            let mut h = [0u8; PAGE as usize];
            file.read_exact_at(&mut h, 0)
                .map_err(|_| DirtyLogError::BadHeader {
                    path: path.to_path_buf(),
                    why: "short file",
                })?;
            let bad = |why| DirtyLogError::BadHeader {
                path: path.to_path_buf(),
                why,
            };
            if h[..4] != MAGIC {
                return Err(bad("magic"));
            }
            if u32_at(&h, 40) != crc32c::crc32c(&h[..40]) {
                return Err(bad("header CRC"));
            }
            if u32_at(&h, 4) != VERSION {
                return Err(bad("version"));
            }
            if u64::from(u32_at(&h, 8)) != BLOCK_SIZE {
                return Err(bad("block size"));
            }
            let g = Geometry {
                extent_blocks: u32_at(&h, 12),
                al_slots: u32_at(&h, 16),
            };
            if g.extent_blocks == 0 || g.al_slots == 0 || g.al_slots > MAX_AL_SLOTS {
                return Err(bad("geometry"));
            }
            let log_size = u64_at(&h, 24);
            if log_size != image_size {
                return Err(DirtyLogError::SizeMismatch {
                    path: path.to_path_buf(),
                    log_size,
                    image_size,
                });
            }
            if len < BITMAP_OFF + nblocks.div_ceil(64) * 8 {
                return Err(bad("short bitmap"));
            }
            (g, u64_at(&h, 32))
        };
        let extent_blocks = u64::from(g.extent_blocks);
        let nextents = nblocks.div_ceil(extent_blocks) as usize;
        let npages = (nblocks.div_ceil(64) * 8).div_ceil(PAGE) as usize;
        let mut log = DirtyLog {
            file,
            path: path.to_path_buf(),
            image_size,
            nblocks,
            extent_blocks,
            al_slots: g.al_slots as usize,
            lineage,
            bits: vec![0; nblocks.div_ceil(64) as usize],
            al: Vec::new(),
            in_al: vec![false; nextents],
            al_seq: 0,
            last_use: vec![0; nextents],
            commit_no: 0,
            touched: Vec::new(),
            touched_flag: vec![false; nextents],
            page_changed: vec![false; npages],
            any_page_changed: false,
            pending: Vec::new(),
            stats: DirtyStats::default(),
            abandoned: false,
        };
        if !fresh {
            log.load()?;
        }
        Ok(log)
    }

    /// Opens an existing log (see [`DirtyLog::open`]); a missing one is an error, because then
    /// nothing says which blocks differ.
    pub fn open_existing(path: &Path, image_size: u64) -> Result<Self, DirtyLogError> {
        if !path.exists() {
            return Err(DirtyLogError::Missing {
                path: path.to_path_buf(),
            });
        }
        DirtyLog::open(path, image_size, Geometry::default())
    }

    /// Reads the bitmap and the newest valid AL slot; AL extents count as wholly dirty.
    fn load(&mut self) -> Result<(), DirtyLogError> {
        let path = self.path.clone();
        let e = io_err(&path);
        let mut raw = vec![0u8; self.bits.len() * 8];
        self.file.read_exact_at(&mut raw, BITMAP_OFF).map_err(&e)?;
        for (w, c) in self.bits.iter_mut().zip(raw.chunks_exact(8)) {
            *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        // Bits past the image end are never set.
        let tail = self.nblocks % 64;
        if tail != 0 {
            if let Some(last) = self.bits.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        let mut best: Option<(u64, Vec<u32>)> = None;
        for off in AL_OFF {
            let mut s = [0u8; PAGE as usize];
            self.file.read_exact_at(&mut s, off).map_err(&e)?;
            let seq = u64_at(&s, 0);
            let count = u32_at(&s, 8) as usize;
            if seq == 0 || count > MAX_AL_SLOTS as usize {
                continue;
            }
            let end = AL_HEAD + count * 4;
            let mut crc = crc32c::crc32c(&s[..12]);
            crc = crc32c::crc32c_append(crc, &s[AL_HEAD..end]);
            if crc != u32_at(&s, 12) {
                log::warn!(
                    "dirty log {}: AL slot at {off} torn (CRC), using the other",
                    self.path.display()
                );
                continue;
            }
            if best.as_ref().is_none_or(|(b, _)| seq > *b) {
                let ext = s[AL_HEAD..end]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                best = Some((seq, ext));
            }
        }
        if let Some((seq, ext)) = best {
            self.al_seq = seq;
            for x in ext {
                let Some(flag) = self.in_al.get_mut(x as usize) else {
                    continue;
                };
                *flag = true;
                self.al.push(x);
                let start = u64::from(x) * self.extent_blocks;
                let n = self.extent_blocks.min(self.nblocks - start);
                self.set_range(start, n);
            }
        }
        // What memory holds now may differ from the on-disk bitmap (the AL's blocks).
        self.page_changed.iter_mut().for_each(|p| *p = true);
        self.any_page_changed = true;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Blocks of the image (the last one may be partial).
    pub fn image_blocks(&self) -> u64 {
        self.nblocks
    }

    pub fn extent_blocks(&self) -> u64 {
        self.extent_blocks
    }

    pub fn stats(&self) -> DirtyStats {
        self.stats
    }

    /// The lineage: a number drawn by the primary when a sync (full or dirty resync) completes
    /// and recorded in both sides' logs (0 for a new log). Two logs count against each other only
    /// if their lineages agree: otherwise the images do not descend from the same synced state
    /// and their dirty sets say nothing about each other (DRBD's generation identifiers, reduced
    /// to the one check a failback needs).
    pub fn lineage(&self) -> u64 {
        self.lineage
    }

    /// Records a new lineage durably (header written and synced).
    pub fn set_lineage(&mut self, lineage: u64) -> Result<(), DirtyLogError> {
        let g = Geometry {
            extent_blocks: self.extent_blocks as u32,
            al_slots: self.al_slots as u32,
        };
        let e = io_err(&self.path);
        self.file
            .write_all_at(&header_bytes(self.image_size, g, lineage), 0)
            .map_err(&e)?;
        fdatasync(&self.file).map_err(&e)?;
        self.lineage = lineage;
        Ok(())
    }

    pub fn status(&self) -> DirtyLogStatus {
        DirtyLogStatus {
            path: self.path.display().to_string(),
            dirty_blocks: self.dirty_blocks(),
            image_blocks: self.nblocks,
            extent_blocks: self.extent_blocks,
            al_extents: self.al.len() as u64,
            al_writes: self.stats.al_writes,
            fdatasyncs: self.stats.fdatasyncs,
            persist_free: self.stats.persist_free,
            lineage: self.lineage,
        }
    }

    /// Whether block `b` is dirty.
    pub fn is_dirty(&self, b: u64) -> bool {
        b < self.nblocks && self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Dirty blocks now.
    pub fn dirty_blocks(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The dirty blocks as runs (first block, blocks), in block order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        runs_of(&self.bits, self.nblocks)
    }

    /// A copy of the bitmap (one bit per block, 64 per word).
    pub fn bitmap(&self) -> Vec<u64> {
        self.bits.clone()
    }

    fn page_of(&self, b: u64) -> usize {
        ((b / 64 * 8) / PAGE) as usize
    }

    fn set_range(&mut self, start: u64, n: u64) {
        for b in start..start + n {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Marks the blocks of bytes `[offset, offset+len)` dirty in memory (clipped to the image)
    /// and notes their extents for [`DirtyLog::persist`]. With `epoch`, the blocks this makes
    /// newly dirty are cleared again by [`DirtyLog::ack`] of that epoch.
    pub fn mark(&mut self, epoch: Option<Epoch>, offset: u64, len: u64) {
        if len == 0 || offset >= self.image_size {
            return;
        }
        let first = offset / BLOCK_SIZE;
        let end = offset
            .saturating_add(len)
            .min(self.image_size)
            .div_ceil(BLOCK_SIZE);
        let mut run: Option<(u64, u64)> = None;
        for b in first..end {
            let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
            if self.bits[w] & m == 0 {
                self.bits[w] |= m;
                let p = self.page_of(b);
                self.page_changed[p] = true;
                self.any_page_changed = true;
                if let Some(e) = epoch {
                    run = match run {
                        Some((s, n)) if s + n == b => Some((s, n + 1)),
                        Some((s, n)) => {
                            self.pending.push((e, s, n));
                            Some((b, 1))
                        }
                        None => Some((b, 1)),
                    };
                }
            }
        }
        if let (Some(e), Some((s, n))) = (epoch, run) {
            self.pending.push((e, s, n));
        }
        let (x0, x1) = (first / self.extent_blocks, (end - 1) / self.extent_blocks);
        for x in x0..=x1 {
            let xi = x as usize;
            if !self.touched_flag[xi] {
                self.touched_flag[xi] = true;
                self.touched.push(x as u32);
            }
        }
    }

    /// Makes every block marked since the last call dirty on stable storage (see the module
    /// doc): no I/O when their extents are all in the on-disk AL. Call before the writes start.
    pub fn persist(&mut self) -> Result<(), DirtyLogError> {
        self.commit_no += 1;
        let now = self.commit_no;
        let mut missing = false;
        for &x in &self.touched {
            self.last_use[x as usize] = now;
            missing |= !self.in_al[x as usize];
        }
        if !missing {
            self.clear_touched();
            self.stats.persist_free += 1;
            return Ok(());
        }
        if self.touched.len() > self.al_slots {
            // More extents than the AL holds: the bitmap itself carries the new bits.
            self.write_bitmap()?;
            self.clear_touched();
            return Ok(());
        }
        // The new AL: every extent touched now, then the most recently used of the old one.
        let mut keep: Vec<u32> = self
            .al
            .iter()
            .copied()
            .filter(|&x| !self.touched_flag[x as usize])
            .collect();
        keep.sort_by_key(|&x| std::cmp::Reverse(self.last_use[x as usize]));
        keep.truncate(self.al_slots - self.touched.len());
        let mut new_al = self.touched.clone();
        new_al.extend(keep);
        let evicts = self.al.iter().any(|&x| !new_al.contains(&x));
        if evicts {
            // Evicted extents' bits must be on disk before the AL stops covering them. (The
            // new bits need no bitmap write: their extents are in the new AL.)
            self.write_bitmap()?;
        }
        self.write_al(new_al)?;
        self.clear_touched();
        Ok(())
    }

    fn clear_touched(&mut self) {
        for &x in &self.touched {
            self.touched_flag[x as usize] = false;
        }
        self.touched.clear();
    }

    /// Writes the changed bitmap pages and syncs them.
    fn write_bitmap(&mut self) -> Result<(), DirtyLogError> {
        if !self.any_page_changed {
            return Ok(());
        }
        let e = io_err(&self.path);
        let words_per_page = (PAGE / 8) as usize;
        let mut buf = Vec::with_capacity(PAGE as usize);
        for p in 0..self.page_changed.len() {
            if !self.page_changed[p] {
                continue;
            }
            let w0 = p * words_per_page;
            let w1 = (w0 + words_per_page).min(self.bits.len());
            buf.clear();
            for w in &self.bits[w0..w1] {
                buf.extend_from_slice(&w.to_le_bytes());
            }
            self.file
                .write_all_at(&buf, BITMAP_OFF + p as u64 * PAGE)
                .map_err(&e)?;
            self.stats.bitmap_writes += 1;
        }
        fdatasync(&self.file).map_err(&e)?;
        self.stats.fdatasyncs += 1;
        self.page_changed.iter_mut().for_each(|p| *p = false);
        self.any_page_changed = false;
        Ok(())
    }

    /// Writes `al` as the next AL slot and syncs it; it is then the on-disk AL.
    fn write_al(&mut self, al: Vec<u32>) -> Result<(), DirtyLogError> {
        let e = io_err(&self.path);
        let seq = self.al_seq + 1;
        let mut s = vec![0u8; AL_HEAD + al.len() * 4];
        s[..8].copy_from_slice(&seq.to_le_bytes());
        s[8..12].copy_from_slice(&(al.len() as u32).to_le_bytes());
        for (i, x) in al.iter().enumerate() {
            s[AL_HEAD + i * 4..AL_HEAD + i * 4 + 4].copy_from_slice(&x.to_le_bytes());
        }
        let mut crc = crc32c::crc32c(&s[..12]);
        crc = crc32c::crc32c_append(crc, &s[AL_HEAD..]);
        s[12..16].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write_all_at(&s, AL_OFF[(seq % 2) as usize])
            .map_err(&e)?;
        fdatasync(&self.file).map_err(&e)?;
        self.stats.al_writes += 1;
        self.stats.fdatasyncs += 1;
        self.al_seq = seq;
        for &x in &self.al {
            self.in_al[x as usize] = false;
        }
        for &x in &al {
            self.in_al[x as usize] = true;
        }
        self.al = al;
        Ok(())
    }

    /// The replica acknowledged every epoch `<= epoch`: the blocks those epochs newly made
    /// dirty are equal on both sides again (cleared in memory; on disk lazily).
    pub fn ack(&mut self, epoch: Epoch) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.retain(|&(e, s, n)| {
            if e <= epoch {
                self.clear(s, n);
                false
            } else {
                true
            }
        });
        self.pending = pending;
    }

    /// The epochs not acknowledged are given up (ABORT): their blocks stay dirty for good.
    pub fn forget_pending(&mut self) {
        self.pending.clear();
    }

    /// Blocks `[start, start+n)` are equal on both sides (a resync chunk was acknowledged).
    pub fn clear(&mut self, start: u64, n: u64) {
        let end = (start + n).min(self.nblocks);
        for b in start..end {
            let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
            if self.bits[w] & m != 0 {
                self.bits[w] &= !m;
                let p = self.page_of(b);
                self.page_changed[p] = true;
                self.any_page_changed = true;
            }
        }
    }

    /// Everything is equal on both sides (a full sync completed): clears every bit and makes
    /// that durable (bitmap, then an empty AL).
    pub fn reset(&mut self) -> Result<(), DirtyLogError> {
        self.pending.clear();
        self.bits.iter_mut().for_each(|w| *w = 0);
        self.page_changed.iter_mut().for_each(|p| *p = true);
        self.any_page_changed = true;
        self.flush()
    }

    /// Writes the exact in-memory set to disk: bitmap, sync, then an empty AL. Not for the hot
    /// path (a clean shutdown, the end of a resync).
    pub fn flush(&mut self) -> Result<(), DirtyLogError> {
        self.write_bitmap()?;
        if !self.al.is_empty() {
            self.write_al(Vec::new())?;
        }
        Ok(())
    }

    /// Clean close: [`DirtyLog::flush`], reporting a failure (Drop only logs it).
    pub fn close(mut self) -> Result<(), DirtyLogError> {
        let r = self.flush();
        self.abandoned = true;
        r
    }

    /// For tests: drops the log as a crashed process would, without the clean-close flush.
    pub fn abandon(mut self) {
        self.abandoned = true;
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        if !self.abandoned {
            if let Err(e) = self.flush() {
                log::error!("{e}; it keeps its last synced state (a superset)");
            }
        }
    }
}

/// Runs of set bits (first block, blocks) of a bitmap of `nblocks` blocks.
pub fn runs_of(bits: &[u64], nblocks: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut b = 0;
    while let Some(s) = next_set(bits, nblocks, b) {
        let mut e = s + 1;
        while e < nblocks && bits[(e / 64) as usize] & (1 << (e % 64)) != 0 {
            e += 1;
        }
        out.push((s, e - s));
        b = e;
    }
    out
}

/// The first set bit at or after `from`.
pub fn next_set(bits: &[u64], nblocks: u64, from: u64) -> Option<u64> {
    let mut b = from;
    while b < nblocks {
        let w = bits[(b / 64) as usize] >> (b % 64);
        if w != 0 {
            let s = b + u64::from(w.trailing_zeros());
            return (s < nblocks).then_some(s);
        }
        b = (b / 64 + 1) * 64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const SMALL: Geometry = Geometry {
        extent_blocks: 16, // 64 KiB extents
        al_slots: 4,
    };

    fn tmp() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty.log");
        (d, p)
    }

    fn blocks(l: &DirtyLog) -> Vec<u64> {
        (0..l.image_blocks()).filter(|&b| l.is_dirty(b)).collect()
    }

    #[test]
    fn a_clean_close_keeps_exactly_the_dirty_blocks() {
        let (_d, p) = tmp();
        let mut l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        l.mark(None, 0, 512); // block 0
        l.mark(None, 5 * 4096 + 100, 8192); // blocks 5..=7
        l.mark(None, 4 * MIB - 1, 10); // last block, clipped
        l.persist().unwrap();
        assert_eq!(l.dirty_blocks(), 5);
        l.close().unwrap();
        let l = DirtyLog::open(&p, 4 * MIB, Geometry::default()).unwrap();
        assert_eq!(blocks(&l), vec![0, 5, 6, 7, 1023]);
        assert_eq!(l.runs(), vec![(0, 1), (5, 3), (1023, 1)]);
        assert_eq!(l.extent_blocks(), 16, "the header's geometry wins");
    }

    #[test]
    fn after_a_crash_every_block_of_an_active_extent_counts_dirty() {
        let (_d, p) = tmp();
        let mut l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        l.mark(None, 20 * 4096, 4096); // extent 1 (blocks 16..32)
        l.persist().unwrap();
        l.abandon(); // kill -9: nothing but what persist() synced
        let l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        assert_eq!(blocks(&l), (16..32).collect::<Vec<_>>());
    }

    #[test]
    fn hot_extents_cost_no_io_and_evictions_keep_their_bits() {
        let (_d, p) = tmp();
        let mut l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        // Extents 0..4 fill the AL: one transaction each.
        for x in 0..4u64 {
            l.mark(None, x * 16 * 4096, 4096);
            l.persist().unwrap();
        }
        assert_eq!(l.stats().al_writes, 4);
        // Writing again inside them costs nothing.
        let syncs = l.stats().fdatasyncs;
        for x in 0..4u64 {
            l.mark(None, x * 16 * 4096 + 8192, 4096);
            l.persist().unwrap();
        }
        assert_eq!(l.stats().fdatasyncs, syncs, "hot extents must not sync");
        assert_eq!(l.stats().persist_free, 4);
        // Extent 10 evicts the least recently used (extent 0): its bits go to the bitmap first.
        l.mark(None, 10 * 16 * 4096, 4096);
        l.persist().unwrap();
        l.abandon();
        let l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        // Extent 0 is out of the AL but its two blocks are in the bitmap; 1..4 and 10 whole.
        let mut want = vec![0, 2];
        for x in [1u64, 2, 3, 10] {
            want.extend(x * 16..(x + 1) * 16);
        }
        assert_eq!(blocks(&l), want);
    }

    #[test]
    fn an_ack_clears_only_what_its_epoch_made_dirty() {
        let (_d, p) = tmp();
        let mut l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        // Block 3 is due for a resync (dirty before the epoch).
        l.mark(None, 3 * 4096, 4096);
        l.mark(Some(Epoch(1)), 2 * 4096, 3 * 4096); // blocks 2, 3, 4
        l.mark(Some(Epoch(2)), 9 * 4096, 512);
        l.persist().unwrap();
        l.ack(Epoch(1));
        assert_eq!(
            blocks(&l),
            vec![3, 9],
            "a partial write does not clean a block"
        );
        l.forget_pending();
        l.ack(Epoch(2));
        assert_eq!(blocks(&l), vec![3, 9], "a forgotten epoch stays dirty");
        l.clear(3, 1);
        l.close().unwrap();
        let l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        assert_eq!(blocks(&l), vec![9]);
    }

    #[test]
    fn an_epoch_wider_than_the_al_goes_to_the_bitmap() {
        let (_d, p) = tmp();
        let mut l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        for x in 0..6u64 {
            l.mark(None, x * 16 * 4096 + 4096, 4096);
        }
        l.persist().unwrap();
        l.abandon();
        let l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        assert_eq!(blocks(&l), (0..6).map(|x| x * 16 + 1).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_al_slot_falls_back_to_the_older_one() {
        let (_d, p) = tmp();
        let mut l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        l.mark(None, 0, 4096); // AL seq 1 (slot 1): extent 0
        l.persist().unwrap();
        l.mark(None, 16 * 4096, 4096); // AL seq 2 (slot 0): extents 1, 0
        l.persist().unwrap();
        l.abandon();
        // Tear slot 0 (seq 2).
        let f = File::options().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 8], AL_OFF[0] + 20).unwrap();
        drop(f);
        let l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        // Seq 1 holds extent 0 only; extent 1's write never started under seq 1's state.
        assert_eq!(blocks(&l), (0..16).collect::<Vec<_>>());
    }

    #[test]
    fn a_log_of_another_image_or_in_use_is_refused_with_the_reason() {
        let (_d, p) = tmp();
        let l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        let e = DirtyLog::open(&p, 4 * MIB, SMALL).err().unwrap();
        assert!(matches!(e, DirtyLogError::Locked { .. }), "{e}");
        drop(l);
        let e = DirtyLog::open(&p, 8 * MIB, SMALL).err().unwrap();
        assert!(e.to_string().contains("--replica-resync full"), "{e}");
        std::fs::write(&p, b"garbage").unwrap();
        let e = DirtyLog::open(&p, 4 * MIB, SMALL).err().unwrap();
        assert!(matches!(e, DirtyLogError::BadHeader { .. }), "{e}");
    }

    #[test]
    fn the_lineage_survives_a_reopen() {
        let (_d, p) = tmp();
        let mut l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        assert_eq!(l.lineage(), 0);
        l.mark(None, 0, 4096);
        l.persist().unwrap();
        l.set_lineage(0xfeed).unwrap();
        l.abandon();
        let l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        assert_eq!((l.lineage(), l.dirty_blocks()), (0xfeed, 16));
    }

    #[test]
    fn reset_empties_the_log_durably() {
        let (_d, p) = tmp();
        let mut l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        l.mark(None, 0, MIB);
        l.persist().unwrap();
        l.reset().unwrap();
        l.abandon();
        let l = DirtyLog::open(&p, 4 * MIB, SMALL).unwrap();
        assert_eq!(l.dirty_blocks(), 0);
    }

    #[test]
    fn runs_and_next_set() {
        let bits = vec![0b1011u64, 1 << 63, 1];
        assert_eq!(runs_of(&bits, 130), vec![(0, 2), (3, 1), (127, 2)]);
        assert_eq!(runs_of(&bits, 128), vec![(0, 2), (3, 1), (127, 1)]);
        assert_eq!(next_set(&bits, 130, 4), Some(127));
        assert_eq!(next_set(&bits, 127, 4), None);
    }
}
