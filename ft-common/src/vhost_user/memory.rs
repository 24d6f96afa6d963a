// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory as the frontend shares it (SET_MEM_TABLE / ADD_MEM_REGION / REM_MEM_REG), and
//! the dirty log (LOG_SHMFD / SET_LOG_BASE).
//!
//! Every region carries a [`LogBitmap`] that knows the region's guest-physical base and the
//! connection's [`DirtyLog`], so any write through vm-memory (a `Writer`, `write_obj`, the used
//! ring update in virtio-queue) marks its 4 KiB pages in the shared log while logging is active.
//! Writes that bypass vm-memory (io_uring reading into guest buffers) must call
//! [`DirtyLog::mark`] (via `WorkerCtx::mark_dirty`) with the guest-physical range.
//!
//! Invariants:
//! - A log area is published as one pointer to an immutable (mapping, length) pair, so a marker
//!   never combines one area's address with another's length. A replaced area is unmapped only
//!   after every worker thread (the only threads writing guest memory) has passed a command
//!   boundary ([`DirtyLog::drop_retired`] after a round trip), so none can still be marking it:
//!   SET_LOG_BASE calls cost no mappings beyond the current one.
//! - Every file is checked against `fstat` before it is mapped ([`check_file_covers`]): a
//!   mapping beyond the end of its file raises SIGBUS on access. Every mapping is registered
//!   with [`sigbus`] for its connection, so a file the frontend shrinks *later* costs that
//!   connection ([`GuestMem::is_broken`]), not the process. Guest memory files that could
//!   still shrink (no F_SEAL_SHRINK) are warned about.
//! - Vring addresses arrive as frontend virtual addresses; [`MemoryMap::va_to_gpa`] translates
//!   them with the region table of the same connection.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::sigbus;

/// Dirty log page size fixed by the vhost-user spec.
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// Guest-physical base of the private scratch region used to resubmit inflight heads (see
/// [`with_scratch`]). Guest regions must end below it.
pub const SCRATCH_GPA: u64 = 1 << 52;

/// One guest memory region, mapped and registered for SIGBUS recovery.
#[derive(Debug)]
struct MappedRegion {
    // Declared first: unregistered before the region is unmapped.
    _guard: sigbus::Guard,
    region: GuestRegionMmap<LogBitmap>,
}

/// The private avail ring of a resubmission view (see [`with_scratch`]).
#[derive(Debug)]
struct Scratch {
    region: GuestRegionMmap<LogBitmap>,
    /// Reachable only while the shadow ring is being popped; closed before any chain of the
    /// view is handed to a device.
    open: AtomicBool,
}

/// The guest memory every device sees: the frontend's regions of one connection (vm-memory's
/// `GuestMemoryBackend`, so `Bytes`, `get_slices` and virtio-queue work on it as on
/// `GuestMemoryMmap`).
///
/// Invariants:
/// - Regions are sorted by guest address and do not overlap; all end below [`SCRATCH_GPA`].
/// - The memory of a connection whose mappings faulted ([`sigbus`]) is *broken*
///   ([`is_broken`](Self::is_broken)): some of it reads as zeros. Nothing read from it may be
///   completed as valid.
/// - Device-private memory is never part of the address space a device resolves descriptors
///   in: a resubmission view's scratch ring is closed before its chains leave `vring.rs`.
#[derive(Debug)]
pub struct GuestMem {
    regions: Vec<Arc<MappedRegion>>,
    conn: sigbus::ConnId,
    scratch: Option<Scratch>,
}

impl GuestMem {
    /// Whether this connection's memory faulted (a file shrank under a mapping): see
    /// [`sigbus`].
    pub fn is_broken(&self) -> bool {
        self.conn.is_broken()
    }

    /// The address of the first fault in this connection's mappings, if any.
    pub fn fault(&self) -> Option<usize> {
        self.conn.fault()
    }

    /// Makes the scratch ring of a resubmission view unreachable (see [`with_scratch`]).
    pub(crate) fn close_scratch(&self) {
        if let Some(s) = &self.scratch {
            s.open.store(false, Ordering::Release);
        }
    }
}

/// A clone has the same regions and connection, never a scratch ring (only the view popped
/// from has one, and only while popping).
impl Clone for GuestMem {
    fn clone(&self) -> Self {
        GuestMem {
            regions: self.regions.clone(),
            conn: self.conn,
            scratch: None,
        }
    }
}

impl GuestMemoryBackend for GuestMem {
    type R = GuestRegionMmap<LogBitmap>;

    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&Self::R> {
        if let Some(s) = &self.scratch {
            if addr.0 >= SCRATCH_GPA && s.open.load(Ordering::Acquire) {
                return (addr.0 - SCRATCH_GPA < s.region.len()).then_some(&s.region);
            }
        }
        let i = match self
            .regions
            .binary_search_by_key(&addr.0, |r| r.region.start_addr().0)
        {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        let r = &self.regions[i].region;
        (addr.0 - r.start_addr().0 < r.len()).then_some(r)
    }

    fn iter(&self) -> impl Iterator<Item = &Self::R> {
        self.regions.iter().map(|r| &r.region)
    }
}

/// Guest memory plus a private scratch region at [`SCRATCH_GPA`] holding a split avail ring
/// (flags 0, idx `heads.len()`, `heads`). Resubmission pops chains from a shadow queue over
/// this view: virtio-queue builds a `DescriptorChain` only from an avail ring, and a chain
/// keeps the memory it was popped from. So the scratch is reachable only until
/// `GuestMem::close_scratch`, which the caller does once all heads are popped and before any
/// chain is used: from then on a descriptor naming the scratch resolves to nothing, like any
/// address outside guest memory, and the device answers it with its error status. Returns the
/// view and the avail ring's address.
pub fn with_scratch(mem: &GuestMem, heads: &[u16]) -> std::io::Result<(GuestMem, u64)> {
    use vm_memory::Bytes;
    let len = (4 + 2 * heads.len() as u64 + 2).div_ceil(LOG_PAGE_SIZE) * LOG_PAGE_SIZE;
    let mmap = MmapRegionBuilder::new_with_bitmap(len as usize, LogBitmap::default())
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| std::io::Error::other(format!("mmap scratch: {e}")))?;
    let region = GuestRegionMmap::new(mmap, GuestAddress(SCRATCH_GPA))
        .ok_or_else(|| std::io::Error::other("scratch region"))?;
    let view = GuestMem {
        regions: mem.regions.clone(),
        conn: mem.conn,
        scratch: Some(Scratch {
            region,
            open: AtomicBool::new(true),
        }),
    };
    let err = |e: vm_memory::GuestMemoryError| std::io::Error::other(format!("scratch: {e}"));
    view.write_obj(heads.len() as u16, GuestAddress(SCRATCH_GPA + 2))
        .map_err(err)?;
    for (i, h) in heads.iter().enumerate() {
        view.write_obj(*h, GuestAddress(SCRATCH_GPA + 4 + 2 * i as u64))
            .map_err(err)?;
    }
    Ok((view, SCRATCH_GPA))
}

/// The dirty page log shared with the frontend: one bit per 4 KiB guest page, bit `p % 8` of
/// byte `p / 8` for page `p`.
#[derive(Default)]
pub struct DirtyLog {
    active: AtomicBool,
    /// The current area (an element of `areas`), null if none.
    current: AtomicPtr<LogArea>,
    /// Areas mapped and not yet retired: the current one, and replaced ones until
    /// [`drop_retired`](Self::drop_retired). Boxed: `current` points into them, and the
    /// vector moves its elements when it grows.
    #[allow(clippy::vec_box)]
    areas: Mutex<Vec<Box<LogArea>>>,
}

/// One LOG_SHMFD mapping (plain shared memory, accessed through atomics), registered for
/// SIGBUS recovery.
struct LogArea {
    map: sigbus::SharedMapping,
}

/// Checks that `file` (fstat) holds `[offset, offset + len)`: touching a mapping beyond the end
/// of its file raises SIGBUS.
pub fn check_file_covers(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let size = file.metadata()?.len();
    let end = offset
        .checked_add(len)
        .ok_or_else(|| std::io::Error::other("offset + size overflows"))?;
    if end > size {
        return Err(std::io::Error::other(format!(
            "file holds {size} bytes, the mapping needs {end} (offset {offset:#x} size {len:#x})"
        )));
    }
    Ok(())
}

/// Whether the file behind a guest region could still shrink under our mapping: no
/// F_SEAL_SHRINK seal (QEMU seals memory-backend-memfd by default; plain files cannot be
/// sealed).
pub fn may_shrink(file: &File) -> bool {
    // SAFETY: fcntl on an fd we own; F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals < 0 || seals & libc::F_SEAL_SHRINK == 0
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("active", &self.active.load(Ordering::Relaxed))
            .field("mapped", &!self.current.load(Ordering::Relaxed).is_null())
            .finish()
    }
}

impl DirtyLog {
    /// Map `size` bytes of `file` at `offset` as the new log area (SET_LOG_BASE). The replaced
    /// area stays mapped until [`drop_retired`](Self::drop_retired).
    pub fn set_base(
        &self,
        file: &File,
        size: u64,
        offset: u64,
        conn: sigbus::ConnId,
    ) -> std::io::Result<()> {
        let len = usize::try_from(size).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        if len == 0 {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        check_file_covers(file, offset, size)?;
        let map = sigbus::SharedMapping::new(file, offset, len, conn)?;
        let mut area = Box::new(LogArea { map });
        let ptr: *mut LogArea = &mut *area;
        let mut areas = self.areas.lock().unwrap_or_else(|e| e.into_inner());
        areas.push(area);
        self.current.store(ptr, Ordering::SeqCst);
        Ok(())
    }

    /// Unmap every area but the current one. Call only once no thread can still be marking a
    /// replaced area: after every worker has handled a command since the last `set_base`.
    pub fn drop_retired(&self) {
        let cur = self.current.load(Ordering::SeqCst);
        self.areas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|a| std::ptr::eq(&**a, cur));
    }

    /// Number of log areas mapped (current and not yet retired).
    pub fn mapped_areas(&self) -> usize {
        self.areas.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Forget the log area (end of a connection). Only call while no ring runs: a worker
    /// marking pages concurrently could touch an unmapped area.
    pub fn reset(&self) {
        self.active.store(false, Ordering::SeqCst);
        self.current.store(std::ptr::null_mut(), Ordering::SeqCst);
        self.areas.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Start or stop logging (the LOG_ALL feature bit of SET_FEATURES).
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
    }

    /// Whether writes are being logged.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Mark the guest-physical range `[gpa, gpa + len)` dirty. No-op while logging is off.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.active.load(Ordering::Relaxed) {
            return;
        }
        let area = self.current.load(Ordering::Acquire);
        if area.is_null() {
            return;
        }
        // SAFETY: a published area stays alive until drop_retired/reset, which callers invoke
        // only when no marker can hold it (see the module docs).
        let map = unsafe { &(*area).map };
        let addr = map.as_mut_ptr().cast::<AtomicU8>();
        let size = map.len();
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        for page in first..=last {
            let byte = (page / 8) as usize;
            if byte >= size {
                // The frontend sized the log for its memory; pages beyond it are not ours.
                break;
            }
            // SAFETY: byte < size of a live mapping (see above).
            unsafe { (*addr.add(byte)).fetch_or(1 << (page % 8), Ordering::Relaxed) };
        }
    }
}

/// vm-memory bitmap that forwards writes to the connection's [`DirtyLog`].
#[derive(Clone, Debug, Default)]
pub struct LogBitmap {
    log: Option<Arc<DirtyLog>>,
    /// Guest-physical address of offset 0 of this bitmap (slice).
    gpa: u64,
}

impl LogBitmap {
    /// Bitmap for a region starting at guest-physical `gpa`.
    pub fn new(log: Arc<DirtyLog>, gpa: u64) -> Self {
        LogBitmap {
            log: Some(log),
            gpa,
        }
    }
}

// Slices borrow the region's bitmap (a reference and an offset, Copy) rather than cloning it:
// vm-memory makes a slice for every guest access, and cloning the `Arc` cost two atomic
// operations each time, several per request.
impl<'a> WithBitmapSlice<'a> for LogBitmap {
    type S = RefSlice<'a, LogBitmap>;
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(log) = &self.log {
            log.mark(self.gpa.wrapping_add(offset as u64), len as u64);
        }
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        // The log belongs to the frontend, which reads and clears it; we only set bits.
        false
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, LogBitmap> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

/// One region of the frontend's memory table.
#[derive(Clone, Debug)]
pub struct RegionInfo {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Frontend virtual address of the start (vring addresses are given in this space).
    pub user_addr: u64,
    /// Offset of the region in its file.
    pub mmap_offset: u64,
    mapping: Arc<MappedRegion>,
}

/// The connection's memory table: regions plus the vm-memory view built from them.
pub struct MemoryMap {
    regions: Vec<RegionInfo>,
    /// The connection the mappings are registered for (SIGBUS recovery).
    conn: sigbus::ConnId,
}

impl MemoryMap {
    /// Empty table of connection `conn`.
    pub fn new(conn: sigbus::ConnId) -> Self {
        MemoryMap {
            regions: Vec::new(),
            conn,
        }
    }

    /// Map one region of `file` (SET_MEM_TABLE entry or ADD_MEM_REGION).
    pub fn add_region(
        &mut self,
        log: &Arc<DirtyLog>,
        gpa: u64,
        size: u64,
        user_addr: u64,
        mmap_offset: u64,
        file: File,
    ) -> std::io::Result<()> {
        let inval = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
        let len = usize::try_from(size).map_err(|_| inval())?;
        if len == 0
            || gpa.checked_add(size).is_none_or(|end| end > SCRATCH_GPA)
            || user_addr.checked_add(size).is_none()
        {
            return Err(inval());
        }
        if self
            .regions
            .iter()
            .any(|r| gpa < r.gpa + r.size && r.gpa < gpa + size)
        {
            return Err(inval());
        }
        check_file_covers(&file, mmap_offset, size)?;
        if may_shrink(&file) {
            crate::guest_warn!(
                "vhost-user: guest memory region gpa {gpa:#x} is in a file without F_SEAL_SHRINK: \
                 if the frontend truncates it, the connection is closed at the next access"
            );
        }
        let mmap = MmapRegionBuilder::new_with_bitmap(len, LogBitmap::new(log.clone(), gpa))
            .with_file_offset(FileOffset::new(file, mmap_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| std::io::Error::other(format!("mmap guest region: {e}")))?;
        let region = GuestRegionMmap::new(mmap, GuestAddress(gpa)).ok_or_else(inval)?;
        let guard = sigbus::register(region.as_ptr(), len, self.conn)?;
        self.regions.push(RegionInfo {
            gpa,
            size,
            user_addr,
            mmap_offset,
            mapping: Arc::new(MappedRegion {
                _guard: guard,
                region,
            }),
        });
        self.regions.sort_by_key(|r| r.gpa);
        Ok(())
    }

    /// Unmap the region with exactly this guest address and size (REM_MEM_REG).
    pub fn remove_region(&mut self, gpa: u64, size: u64) -> bool {
        let before = self.regions.len();
        self.regions.retain(|r| !(r.gpa == gpa && r.size == size));
        self.regions.len() != before
    }

    /// Drop every region (SET_MEM_TABLE replaces the table, RESET_OWNER forgets it).
    pub fn clear(&mut self) {
        self.regions.clear();
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether no region is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Translate a frontend virtual address into a guest-physical one.
    pub fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| r.gpa + (va - r.user_addr))
    }

    /// Build the vm-memory view of the current table (regions are kept sorted and disjoint).
    pub fn guest_memory(&self) -> std::io::Result<Arc<GuestMem>> {
        Ok(Arc::new(GuestMem {
            regions: self.regions.iter().map(|r| r.mapping.clone()).collect(),
            conn: self.conn,
            scratch: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use vm_memory::{Bytes, GuestAddress};

    fn memfd(size: u64) -> File {
        // SAFETY: plain syscall; the fd is checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fresh fd.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn mappings_beyond_the_file_are_refused() {
        let f = memfd(0x2000);
        assert!(check_file_covers(&f, 0, 0x2000).is_ok());
        assert!(check_file_covers(&f, 0x1000, 0x1000).is_ok());
        assert!(check_file_covers(&f, 0x1000, 0x1001).is_err());
        assert!(check_file_covers(&f, 0x3000, 0).is_err());
        assert!(check_file_covers(&f, u64::MAX, 2).is_err());
        let log = Arc::new(DirtyLog::default());
        let mut map = MemoryMap::new(sigbus::ConnId::next());
        // A region whose offset pushes it past the end of its file.
        assert!(map
            .add_region(&log, 0x10_0000, 0x2000, 0x7000_0000, 0x1000, memfd(0x2000))
            .is_err());
        assert!(map
            .add_region(&log, 0x10_0000, 0x1000, 0x7000_0000, 0x1000, memfd(0x2000))
            .is_ok());
        assert!(log
            .set_base(&memfd(0x1000), 0x1000, 0x1000, sigbus::ConnId::next())
            .is_err());
    }

    #[test]
    fn writes_through_vm_memory_mark_log_pages_and_va_translates() {
        let log = Arc::new(DirtyLog::default());
        let mut map = MemoryMap::new(sigbus::ConnId::next());
        map.add_region(&log, 0x10_0000, 0x10_0000, 0x7000_0000, 0, memfd(0x10_0000))
            .unwrap();
        assert_eq!(map.va_to_gpa(0x7000_1234), Some(0x10_1234));
        assert_eq!(map.va_to_gpa(0x7010_0000), None);
        // Overlapping regions are refused.
        assert!(map
            .add_region(&log, 0x18_0000, 0x1000, 0, 0, memfd(0x1000))
            .is_err());
        let mem = map.guest_memory().unwrap();
        let logfile = memfd(0x1000);
        log.set_base(&logfile, 0x1000, 0, sigbus::ConnId::next())
            .unwrap();
        // Not active yet: nothing logged.
        mem.write_slice(&[1u8; 16], GuestAddress(0x10_0000))
            .unwrap();
        log.set_active(true);
        mem.write_slice(&[1u8; 0x1002], GuestAddress(0x10_2fff))
            .unwrap();
        log.mark(0x10_8000, 1);
        let mut bytes = [0u8; 0x40];
        std::io::Read::read_exact(&mut &logfile, &mut bytes).unwrap();
        let dirty: Vec<u64> = (0..0x200u64)
            .filter(|p| bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect();
        assert_eq!(dirty, vec![0x102, 0x103, 0x104, 0x108]);
    }
}
