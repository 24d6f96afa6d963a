// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk request parser: a descriptor chain in, a typed, self-contained request out.
//!
//! All validation of guest input happens here, so the engine and the (later) transaction queue
//! only ever see well-formed requests. Invariants:
//! - Nothing a guest puts in a chain can panic the parser: every length and address is checked,
//!   arithmetic is checked, and every failure becomes a [`Rejected`] with the virtio status the
//!   guest must see (IOERR for malformed / out of range / read-only, UNSUPP for unknown types).
//! - A [`BlkRequest`] owns everything needed to submit and complete it later: head index, type,
//!   sector, the host iovecs (in a pooled block the value points to, so their addresses stay
//!   put while the value moves between queue, engine slot and transaction queue; see
//!   [`crate::segments`]), the GPAs of data segments (for dirty logging) and the GPA of the
//!   status byte. It holds no borrow and, once the pools are warm, allocates nothing.
//! - The host pointers stay valid while the request is outstanding: the guest may not reuse its
//!   buffers before completion, and the device must not drop the guest memory mapping while
//!   requests are in flight (it drains or cancels them first).
//!
//! Accepted layout (what Linux, QEMU and libblkio send, plus merged variants): the 16-byte
//! header at the start of the first descriptor (any remainder of that descriptor is data), data
//! descriptors, and the status byte as the last byte of the last, device-writable descriptor
//! (any bytes before it in that descriptor are data).

use crate::image::{SECTOR_SHIFT, SECTOR_SIZE};
use crate::limits::{MAX_DATA_SEGS, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGS};
use crate::segments::SegTable;
use ft_common::vhost_user::GuestMem;
use std::any::Any;
use std::ops::Deref;
use std::sync::Arc;
use virtio_bindings::virtio_blk::*;
use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Size of `struct virtio_blk_outhdr`.
const HDR_LEN: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const DWZ_LEN: u32 = 16;

pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What a request asks for. Sectors are 512-byte units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Read {
        sector: u64,
    },
    Write {
        sector: u64,
    },
    Flush,
    GetId,
    Discard {
        sector: u64,
        sectors: u32,
    },
    WriteZeroes {
        sector: u64,
        sectors: u32,
        unmap: bool,
    },
}

impl RequestKind {
    /// Requests that change what the disk holds or make it durable: the ones output commit must
    /// hold until their epoch is committed (reads and GET_ID are not output).
    pub fn is_output(&self) -> bool {
        !matches!(self, RequestKind::Read { .. } | RequestKind::GetId)
    }
}

/// What the device needs to know about the disk to validate a request.
#[derive(Clone, Copy, Debug)]
pub struct DiskLimits {
    pub capacity_sectors: u64,
    pub readonly: bool,
}

/// A parsed, validated request. See the module docs for its invariants.
pub struct BlkRequest {
    head: u16,
    kind: RequestKind,
    nsegs: u16,
    data_len: u32,
    status: GuestAddress,
    /// iovecs and GPAs of the data segments; entries `..nsegs` are valid.
    segs: SegTable,
    /// Keeps the guest memory mapping the iovecs point into alive while the request exists
    /// (a memory table change cannot unmap it under an in-flight I/O). An `Arc` clone, no
    /// allocation.
    mem: Option<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for BlkRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkRequest")
            .field("head", &self.head)
            .field("kind", &self.kind)
            .field("nsegs", &self.nsegs)
            .field("data_len", &self.data_len)
            .field("status", &self.status)
            .finish()
    }
}

/// A chain the device answers without doing I/O: the status to report and where to put it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub head: u16,
    /// The status byte's address; `None` when the chain has no usable status descriptor, in
    /// which case the chain is returned with used length 0 and nothing is written.
    pub status_addr: Option<GuestAddress>,
    pub status: u8,
}

impl BlkRequest {
    fn empty(head: u16, status: GuestAddress) -> BlkRequest {
        BlkRequest {
            head,
            kind: RequestKind::Flush,
            nsegs: 0,
            data_len: 0,
            status,
            segs: SegTable::take(),
            mem: None,
        }
    }

    /// Pins the guest memory the request's iovecs point into (the `Arc` its chain came from).
    pub fn hold_memory(&mut self, mem: Arc<dyn Any + Send + Sync>) {
        self.mem = Some(mem);
    }

    /// Whether the guest memory the request's iovecs point into is broken: the frontend shrank
    /// a file under it and a page the daemon touched now reads as zeros (see
    /// `ft_common::vhost_user::sigbus`). Such a request must not be written: its data may be
    /// those zeros. One atomic load while no fault ever happened in the process.
    pub fn memory_broken(&self) -> bool {
        self.mem
            .as_deref()
            .and_then(|m| m.downcast_ref::<GuestMem>())
            .is_some_and(GuestMem::is_broken)
    }

    pub fn head(&self) -> u16 {
        self.head
    }
    pub fn kind(&self) -> RequestKind {
        self.kind
    }
    /// Address of the status byte.
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }
    /// Bytes of data (read, written, or the GET_ID buffer).
    pub fn data_len(&self) -> u32 {
        self.data_len
    }
    /// The data iovecs (host addresses), for readv/writev.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.segs.iovecs[..self.nsegs as usize]
    }
    /// Byte offset in the image where the request starts.
    pub fn offset(&self) -> u64 {
        match self.kind {
            RequestKind::Read { sector }
            | RequestKind::Write { sector }
            | RequestKind::Discard { sector, .. }
            | RequestKind::WriteZeroes { sector, .. } => sector << SECTOR_SHIFT,
            RequestKind::Flush | RequestKind::GetId => 0,
        }
    }

    /// Used length to report once the request succeeded: bytes the device wrote into the chain
    /// (read data or the id, plus the status byte).
    pub fn used_len(&self, status: u8) -> u32 {
        match self.kind {
            RequestKind::Read { .. } | RequestKind::GetId if status == STATUS_OK => {
                self.data_len + 1
            }
            _ => 1,
        }
    }

    /// Calls `f(gpa, len)` for each guest range the device wrote with `bytes` bytes of read
    /// data. io_uring writes into guest memory bypass vm-memory's dirty tracking, so these
    /// ranges must be marked dirty by hand (dirty logging for live migration / checkpointing).
    pub fn for_each_written_range(&self, bytes: usize, mut f: impl FnMut(u64, u64)) {
        if !matches!(self.kind, RequestKind::Read { .. }) {
            return;
        }
        let mut left = bytes;
        for (iov, &gpa) in self.iovecs().iter().zip(&self.segs.gpas) {
            if left == 0 {
                break;
            }
            let n = iov.iov_len.min(left);
            left -= n;
            f(gpa, n as u64);
        }
    }

    /// Copies `src` into the request's data buffers (for GET_ID); returns the bytes copied.
    pub fn write_data<M: GuestMemory + ?Sized>(&self, mem: &M, src: &[u8]) -> usize {
        let mut done = 0;
        for (iov, &gpa) in self.iovecs().iter().zip(&self.segs.gpas) {
            let n = iov.iov_len.min(src.len() - done);
            if n == 0
                || mem
                    .write_slice(&src[done..done + n], GuestAddress(gpa))
                    .is_err()
            {
                break;
            }
            done += n;
        }
        done
    }

    fn push_segment<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        addr: GuestAddress,
        len: u32,
        writable: bool,
    ) -> Result<(), u8> {
        if len == 0 {
            return Ok(());
        }
        self.data_len = self.data_len.checked_add(len).ok_or(STATUS_IOERR)?;
        let perm = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let slices = mem
            .get_slices(addr, len as usize, perm)
            .map_err(|_| STATUS_IOERR)?;
        let mut gpa = addr;
        let mut covered = 0usize;
        // One descriptor may span several guest memory regions: one iovec per piece.
        for s in slices {
            let s = s.map_err(|_| STATUS_IOERR)?;
            let i = self.nsegs as usize;
            if i >= MAX_DATA_SEGS {
                return Err(STATUS_IOERR);
            }
            self.segs.iovecs[i] = libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            };
            self.segs.gpas[i] = gpa.raw_value();
            self.nsegs += 1;
            covered += s.len();
            gpa = gpa.unchecked_add(s.len() as u64);
        }
        if covered != len as usize {
            return Err(STATUS_IOERR);
        }
        Ok(())
    }
}

/// Parses and validates one chain. `Err` carries the status the guest gets without any I/O.
///
/// The chain is walked once (a second walk could see descriptors the guest changed meanwhile);
/// the walk is bounded by the chain's ttl (queue size or indirect table size).
pub fn parse<M>(chain: DescriptorChain<M>, limits: &DiskLimits) -> Result<BlkRequest, Rejected>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    // A second handle on the memory (an Arc or reference clone), so the chain can be consumed.
    let mem_owner = chain.clone();
    let mem = mem_owner.memory();
    let mut descs = chain;
    let first = descs.next();
    let reject = |status_addr, status| Rejected {
        head,
        status_addr,
        status,
    };

    // The header. Its problems are recorded, not returned, until the status byte is known.
    let mut err: Option<u8> = None;
    let mut rtype = u32::MAX;
    let mut sector = 0u64;
    let mut hdr_tail: Option<(GuestAddress, u32)> = None;
    match first {
        None => return Err(reject(None, STATUS_IOERR)),
        Some(d) if d.is_write_only() || u64::from(d.len()) < HDR_LEN => err = Some(STATUS_IOERR),
        Some(d) => match mem.read_obj::<[u8; HDR_LEN as usize]>(d.addr()) {
            Ok(h) => {
                // struct virtio_blk_outhdr { le32 type; le32 ioprio; le64 sector; }
                rtype = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
                hdr_tail = d
                    .addr()
                    .checked_add(HDR_LEN)
                    .map(|a| (a, d.len() - HDR_LEN as u32));
                if hdr_tail.is_none() {
                    err = Some(STATUS_IOERR);
                }
            }
            Err(_) => err = Some(STATUS_IOERR),
        },
    }
    let data_writable = match rtype {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => true,
        VIRTIO_BLK_T_OUT
        | VIRTIO_BLK_T_DISCARD
        | VIRTIO_BLK_T_WRITE_ZEROES
        | VIRTIO_BLK_T_FLUSH => false,
        _ => {
            err = err.or(Some(STATUS_UNSUPP));
            false
        }
    };

    let mut req = BlkRequest::empty(head, GuestAddress(0));
    // Adds one data range; the first error sticks and later ranges are ignored.
    let add = |req: &mut BlkRequest, err: &mut Option<u8>, addr, len, writable: bool| {
        if err.is_some() || len == 0 {
            return;
        }
        let r = if writable != data_writable {
            Err(STATUS_IOERR)
        } else {
            req.push_segment(mem, addr, len, writable)
        };
        if let Err(s) = r {
            *err = Some(s);
        }
    };
    if let Some((addr, len)) = hdr_tail {
        add(&mut req, &mut err, addr, len, false);
    }
    // One descriptor of lookahead: the last one is the status descriptor.
    let mut pending: Option<Descriptor> = None;
    for d in descs {
        if let Some(p) = pending.replace(d) {
            add(&mut req, &mut err, p.addr(), p.len(), p.is_write_only());
        }
    }
    let last = match pending {
        Some(d) if d.is_write_only() && d.len() >= 1 => d,
        _ => return Err(reject(None, STATUS_IOERR)),
    };
    let status = match last.addr().checked_add(u64::from(last.len()) - 1) {
        Some(a) if mem.check_range(a, 1, Permissions::Write) => a,
        _ => return Err(reject(None, STATUS_IOERR)),
    };
    add(&mut req, &mut err, last.addr(), last.len() - 1, true);
    if let Some(s) = err {
        return Err(reject(Some(status), s));
    }
    req.status = status;
    let ioerr = || reject(Some(status), STATUS_IOERR);

    let nsect = u64::from(req.data_len) >> SECTOR_SHIFT;
    let in_range = |sector: u64, n: u64| {
        sector
            .checked_add(n)
            .is_some_and(|end| end <= limits.capacity_sectors)
    };
    req.kind = match rtype {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            if !u64::from(req.data_len).is_multiple_of(SECTOR_SIZE) || !in_range(sector, nsect) {
                return Err(ioerr());
            }
            if rtype == VIRTIO_BLK_T_OUT {
                if limits.readonly {
                    return Err(ioerr());
                }
                RequestKind::Write { sector }
            } else {
                RequestKind::Read { sector }
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            // Data on a flush means nothing; a driver that sends some is confused.
            if req.data_len != 0 {
                return Err(ioerr());
            }
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if req.data_len == 0 {
                return Err(ioerr());
            }
            RequestKind::GetId
        }
        _ => {
            // DISCARD or WRITE_ZEROES: an array of 16-byte segments in the data.
            let is_wz = rtype == VIRTIO_BLK_T_WRITE_ZEROES;
            if limits.readonly {
                return Err(ioerr());
            }
            if req.data_len == 0 || !req.data_len.is_multiple_of(DWZ_LEN) {
                return Err(ioerr());
            }
            if req.data_len / DWZ_LEN > MAX_DISCARD_SEGS {
                return Err(reject(Some(status), STATUS_UNSUPP));
            }
            let mut seg = [0u8; DWZ_LEN as usize];
            read_data(mem, &req, &mut seg).map_err(|_| ioerr())?;
            let d_sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let d_num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let allowed = if is_wz {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Err(reject(Some(status), STATUS_UNSUPP));
            }
            if d_num == 0 || d_num > MAX_DISCARD_SECTORS || !in_range(d_sector, d_num.into()) {
                return Err(ioerr());
            }
            // The segment now lives in the request: its guest buffer is no longer needed.
            req.nsegs = 0;
            req.data_len = 0;
            if is_wz {
                RequestKind::WriteZeroes {
                    sector: d_sector,
                    sectors: d_num,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            } else {
                RequestKind::Discard {
                    sector: d_sector,
                    sectors: d_num,
                }
            }
        }
    };
    Ok(req)
}

/// Reads the first `out.len()` bytes of the request's data (guest-readable segments).
fn read_data<M: GuestMemory + ?Sized>(mem: &M, req: &BlkRequest, out: &mut [u8]) -> Result<(), ()> {
    let mut done = 0;
    for (iov, &gpa) in req.iovecs().iter().zip(&req.segs.gpas) {
        if done == out.len() {
            break;
        }
        let n = iov.iov_len.min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], GuestAddress(gpa))
            .map_err(|_| ())?;
        done += n;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;
    const MEM_SIZE: u64 = 0x10_0000;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x8_0000;
    const LIMITS: DiskLimits = DiskLimits {
        capacity_sectors: 64,
        readonly: false,
    };

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn hdr(mem: &Mem, rtype: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn dwz(mem: &Mem, sector: u64, num: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(DATA)).unwrap();
    }

    fn d(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn parse_descs(
        mem: &Mem,
        descs: &[RawDescriptor],
        limits: DiskLimits,
    ) -> Result<BlkRequest, Rejected> {
        let q = MockSplitQueue::create(mem, GuestAddress(0x1000), 256);
        let chain = q.build_desc_chain(descs).unwrap();
        parse(chain, &limits)
    }

    /// header / data / status, the layout Linux uses.
    fn simple(
        rtype: u32,
        sector: u64,
        data_len: u32,
        data_write: bool,
    ) -> Result<BlkRequest, Rejected> {
        let m = mem();
        hdr(&m, rtype, sector);
        let mut v = vec![d(HDR, 16, false)];
        if data_len > 0 {
            v.push(d(DATA, data_len, data_write));
        }
        v.push(d(STATUS, 1, true));
        parse_descs(&m, &v, LIMITS)
    }

    fn rejected(status: u8) -> Result<(), Rejected> {
        Err(Rejected {
            head: 0,
            status_addr: Some(GuestAddress(STATUS)),
            status,
        })
    }

    fn unit(r: Result<BlkRequest, Rejected>) -> Result<(), Rejected> {
        r.map(|_| ())
    }

    #[test]
    fn read_is_parsed() {
        let r = simple(VIRTIO_BLK_T_IN, 2, 1024, true).unwrap();
        assert_eq!(r.kind(), RequestKind::Read { sector: 2 });
        assert_eq!(r.data_len(), 1024);
        assert_eq!(r.offset(), 1024);
        assert_eq!(r.iovecs().len(), 1);
        assert_eq!(r.iovecs()[0].iov_len, 1024);
        assert_eq!(r.status_addr(), GuestAddress(STATUS));
        assert_eq!(r.used_len(STATUS_OK), 1025);
        assert_eq!(r.used_len(STATUS_IOERR), 1);
        assert!(!r.kind().is_output());
    }

    #[test]
    fn written_ranges_cover_what_was_read() {
        let m = mem();
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        let v = [
            d(HDR, 16, false),
            d(DATA, 1024, true),
            d(DATA + 0x4000, 512, true),
            d(STATUS, 1, true),
        ];
        let r = parse_descs(&m, &v, LIMITS).unwrap();
        let mut got = Vec::new();
        r.for_each_written_range(1536, |g, l| got.push((g, l)));
        assert_eq!(got, vec![(DATA, 1024), (DATA + 0x4000, 512)]);
        got.clear();
        r.for_each_written_range(1000, |g, l| got.push((g, l)));
        assert_eq!(got, vec![(DATA, 1000)]);
        // Writes put nothing into guest memory.
        hdr(&m, VIRTIO_BLK_T_OUT, 0);
        let v = [d(HDR, 16, false), d(DATA, 512, false), d(STATUS, 1, true)];
        let w = parse_descs(&m, &v, LIMITS).unwrap();
        w.for_each_written_range(512, |_, _| panic!("a write dirties guest memory"));
    }

    #[test]
    fn write_with_split_data_is_parsed() {
        let m = mem();
        hdr(&m, VIRTIO_BLK_T_OUT, 4);
        let v = [
            d(HDR, 16, false),
            d(DATA, 512, false),
            d(DATA + 0x1000, 1024, false),
            d(STATUS, 1, true),
        ];
        let r = parse_descs(&m, &v, LIMITS).unwrap();
        assert_eq!(r.kind(), RequestKind::Write { sector: 4 });
        assert_eq!(r.iovecs().len(), 2);
        assert_eq!(r.data_len(), 1536);
        assert_eq!(r.used_len(STATUS_OK), 1);
        assert!(r.kind().is_output());
        // The iovecs point at the guest buffers.
        let host = m.get_host_address(GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(r.iovecs()[1].iov_base as *mut u8, host);
    }

    #[test]
    fn merged_header_data_and_data_status_descriptors() {
        let m = mem();
        hdr(&m, VIRTIO_BLK_T_OUT, 0);
        let r = parse_descs(&m, &[d(HDR, 16 + 512, false), d(STATUS, 1, true)], LIMITS).unwrap();
        assert_eq!(r.kind(), RequestKind::Write { sector: 0 });
        assert_eq!(r.data_len(), 512);
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        let r = parse_descs(&m, &[d(HDR, 16, false), d(DATA, 513, true)], LIMITS).unwrap();
        assert_eq!(r.kind(), RequestKind::Read { sector: 0 });
        assert_eq!(r.data_len(), 512);
        assert_eq!(r.status_addr(), GuestAddress(DATA + 512));
    }

    #[test]
    fn flush_get_id() {
        assert_eq!(
            simple(VIRTIO_BLK_T_FLUSH, 0, 0, false).unwrap().kind(),
            RequestKind::Flush
        );
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_FLUSH, 0, 512, false)),
            rejected(STATUS_IOERR)
        );
        let r = simple(VIRTIO_BLK_T_GET_ID, 0, 20, true).unwrap();
        assert_eq!(r.kind(), RequestKind::GetId);
        assert_eq!(r.used_len(STATUS_OK), 21);
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_GET_ID, 0, 0, true)),
            rejected(STATUS_IOERR)
        );
    }

    #[test]
    fn get_id_write_data_copies_into_guest() {
        let m = mem();
        hdr(&m, VIRTIO_BLK_T_GET_ID, 0);
        let r = parse_descs(
            &m,
            &[d(HDR, 16, false), d(DATA, 20, true), d(STATUS, 1, true)],
            LIMITS,
        )
        .unwrap();
        assert_eq!(r.write_data(&m, b"0123456789abcdefghij"), 20);
        let mut out = [0u8; 20];
        m.read_slice(&mut out, GuestAddress(DATA)).unwrap();
        assert_eq!(&out, b"0123456789abcdefghij");
    }

    #[test]
    fn unknown_type_is_unsupported() {
        assert_eq!(unit(simple(99, 0, 0, false)), rejected(STATUS_UNSUPP));
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_SCSI_CMD, 0, 512, false)),
            rejected(STATUS_UNSUPP)
        );
    }

    #[test]
    fn malformed_headers_are_ioerr() {
        let m = mem();
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        // Too short.
        let r = parse_descs(
            &m,
            &[d(HDR, 8, false), d(DATA, 512, true), d(STATUS, 1, true)],
            LIMITS,
        );
        assert_eq!(unit(r), rejected(STATUS_IOERR));
        // Device-writable header.
        let r = parse_descs(&m, &[d(HDR, 16, true), d(STATUS, 1, true)], LIMITS);
        assert_eq!(unit(r), rejected(STATUS_IOERR));
        // Header outside guest memory.
        let r = parse_descs(
            &m,
            &[d(MEM_SIZE + 0x1000, 16, false), d(STATUS, 1, true)],
            LIMITS,
        );
        assert_eq!(unit(r), rejected(STATUS_IOERR));
    }

    #[test]
    fn chains_without_status_cannot_be_answered() {
        let m = mem();
        hdr(&m, VIRTIO_BLK_T_OUT, 0);
        let none = |r: Result<BlkRequest, Rejected>| {
            assert_eq!(
                unit(r),
                Err(Rejected {
                    head: 0,
                    status_addr: None,
                    status: STATUS_IOERR
                })
            )
        };
        none(parse_descs(&m, &[d(HDR, 16, false)], LIMITS));
        none(parse_descs(
            &m,
            &[d(HDR, 16, false), d(DATA, 512, false)],
            LIMITS,
        ));
        none(parse_descs(
            &m,
            &[d(HDR, 16, false), d(STATUS, 0, true)],
            LIMITS,
        ));
        none(parse_descs(
            &m,
            &[d(HDR, 16, false), d(MEM_SIZE + 5, 1, true)],
            LIMITS,
        ));
        none(parse_descs(
            &m,
            &[d(HDR, 16, false), d(u64::MAX, 4, true)],
            LIMITS,
        ));
    }

    #[test]
    fn bad_data_is_ioerr() {
        // Wrong direction.
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_IN, 0, 512, false)),
            rejected(STATUS_IOERR)
        );
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_OUT, 0, 512, true)),
            rejected(STATUS_IOERR)
        );
        // Not a whole number of sectors.
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_IN, 0, 100, true)),
            rejected(STATUS_IOERR)
        );
        // Outside guest memory.
        let m = mem();
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        let r = parse_descs(
            &m,
            &[
                d(HDR, 16, false),
                d(MEM_SIZE - 256, 512, true),
                d(STATUS, 1, true),
            ],
            LIMITS,
        );
        assert_eq!(unit(r), rejected(STATUS_IOERR));
    }

    #[test]
    fn capacity_edges() {
        // Last sector: fine. One past: error. Overflowing sector numbers: error.
        assert!(simple(VIRTIO_BLK_T_IN, 63, 512, true).is_ok());
        assert!(simple(VIRTIO_BLK_T_OUT, 62, 1024, false).is_ok());
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_IN, 63, 1024, true)),
            rejected(STATUS_IOERR)
        );
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_OUT, 64, 512, false)),
            rejected(STATUS_IOERR)
        );
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_IN, u64::MAX, 512, true)),
            rejected(STATUS_IOERR)
        );
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_IN, u64::MAX >> 9, 512, true)),
            rejected(STATUS_IOERR)
        );
    }

    #[test]
    fn readonly_refuses_writes() {
        let ro = DiskLimits {
            capacity_sectors: 64,
            readonly: true,
        };
        let m = mem();
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            hdr(&m, t, 0);
            dwz(&m, 0, 1, 0);
            let len = if t == VIRTIO_BLK_T_OUT { 512 } else { 16 };
            let r = parse_descs(
                &m,
                &[d(HDR, 16, false), d(DATA, len, false), d(STATUS, 1, true)],
                ro,
            );
            assert_eq!(unit(r), rejected(STATUS_IOERR), "type {t}");
        }
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        let r = parse_descs(
            &m,
            &[d(HDR, 16, false), d(DATA, 512, true), d(STATUS, 1, true)],
            ro,
        );
        assert!(r.is_ok());
    }

    fn dwz_req(
        rtype: u32,
        sector: u64,
        num: u32,
        flags: u32,
        len: u32,
    ) -> Result<BlkRequest, Rejected> {
        let m = mem();
        hdr(&m, rtype, 0);
        dwz(&m, sector, num, flags);
        parse_descs(
            &m,
            &[d(HDR, 16, false), d(DATA, len, false), d(STATUS, 1, true)],
            LIMITS,
        )
    }

    #[test]
    fn discard_and_write_zeroes() {
        let r = dwz_req(VIRTIO_BLK_T_DISCARD, 8, 16, 0, 16).unwrap();
        assert_eq!(
            r.kind(),
            RequestKind::Discard {
                sector: 8,
                sectors: 16
            }
        );
        assert_eq!(r.offset(), 8 * 512);
        assert!(r.iovecs().is_empty());
        let r = dwz_req(VIRTIO_BLK_T_WRITE_ZEROES, 0, 64, 1, 16).unwrap();
        assert_eq!(
            r.kind(),
            RequestKind::WriteZeroes {
                sector: 0,
                sectors: 64,
                unmap: true
            }
        );
        let r = dwz_req(VIRTIO_BLK_T_WRITE_ZEROES, 1, 2, 0, 16).unwrap();
        assert_eq!(
            r.kind(),
            RequestKind::WriteZeroes {
                sector: 1,
                sectors: 2,
                unmap: false
            }
        );
        // Unknown flags, UNMAP on discard, more segments than advertised: unsupported.
        assert_eq!(
            unit(dwz_req(VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 2, 16)),
            rejected(STATUS_UNSUPP)
        );
        assert_eq!(
            unit(dwz_req(VIRTIO_BLK_T_DISCARD, 0, 1, 1, 16)),
            rejected(STATUS_UNSUPP)
        );
        assert_eq!(
            unit(dwz_req(VIRTIO_BLK_T_DISCARD, 0, 1, 0, 32)),
            rejected(STATUS_UNSUPP)
        );
        // Malformed: partial segment, no segment, empty or out-of-range range.
        assert_eq!(
            unit(dwz_req(VIRTIO_BLK_T_DISCARD, 0, 1, 0, 8)),
            rejected(STATUS_IOERR)
        );
        assert_eq!(
            unit(simple(VIRTIO_BLK_T_DISCARD, 0, 0, false)),
            rejected(STATUS_IOERR)
        );
        assert_eq!(
            unit(dwz_req(VIRTIO_BLK_T_DISCARD, 0, 0, 0, 16)),
            rejected(STATUS_IOERR)
        );
        assert_eq!(
            unit(dwz_req(VIRTIO_BLK_T_DISCARD, 60, 5, 0, 16)),
            rejected(STATUS_IOERR)
        );
        assert_eq!(
            unit(dwz_req(VIRTIO_BLK_T_WRITE_ZEROES, u64::MAX, 1, 0, 16)),
            rejected(STATUS_IOERR)
        );
    }

    #[test]
    fn too_many_segments_is_ioerr() {
        let m = mem();
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        let mut v = vec![d(HDR, 16, false)];
        for i in 0..MAX_DATA_SEGS as u64 + 1 {
            v.push(d(DATA + i * 512, 512, true));
        }
        v.push(d(STATUS, 1, true));
        let big = DiskLimits {
            capacity_sectors: 1 << 20,
            readonly: false,
        };
        assert_eq!(unit(parse_descs(&m, &v, big)), rejected(STATUS_IOERR));
        v.remove(1);
        assert_eq!(
            parse_descs(&m, &v, big).unwrap().iovecs().len(),
            MAX_DATA_SEGS
        );
    }

    #[test]
    fn descriptor_spanning_two_regions_gives_two_iovecs() {
        let m: Mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4_0000),
            (GuestAddress(0x4_0000), 0x4_0000),
        ])
        .unwrap();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
        let q = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        let chain = q
            .build_desc_chain(&[
                d(HDR, 16, false),
                d(0x4_0000 - 512, 1024, true),
                d(0x5_0000, 1, true),
            ])
            .unwrap();
        let r = parse(chain, &LIMITS).unwrap();
        assert_eq!(r.iovecs().len(), 2);
        assert_eq!(r.iovecs()[0].iov_len, 512);
        assert_eq!(r.iovecs()[1].iov_len, 512);
        assert_eq!(r.segs.gpas[1], 0x4_0000);
    }

    #[test]
    fn indirect_chain_is_parsed() {
        let m = mem();
        hdr(&m, VIRTIO_BLK_T_IN, 1);
        let table = 0x4_0000u64;
        let descs = [
            SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
            SplitDescriptor::new(
                DATA,
                512,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                2,
            ),
            SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, x) in descs.iter().enumerate() {
            m.write_obj(RawDescriptor::from(*x), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let q = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        let head = RawDescriptor::from(SplitDescriptor::new(
            table,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        let chain = q.build_desc_chain(&[head]).unwrap();
        let r = parse(chain, &LIMITS).unwrap();
        assert_eq!(r.kind(), RequestKind::Read { sector: 1 });
        assert_eq!(r.data_len(), 512);
    }

    #[test]
    fn looping_chain_terminates() {
        // A chain whose last descriptor points back to the first: the walk stops at the ttl.
        let m = mem();
        hdr(&m, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::create(&m, GuestAddress(0x1000), 4);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(
                DATA,
                512,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                0,
            )),
        ];
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        use virtio_queue::QueueOwnedT;
        let chain = queue.iter(&m).unwrap().next().unwrap();
        // The header descriptor reappears as "data" in the wrong direction: IOERR, no hang.
        assert!(parse(chain, &LIMITS).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Whatever the guest puts in the descriptors and the header, parsing returns.
        #[test]
        fn arbitrary_chains_never_panic(
            rtype in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in prop_oneof![0u64..80, any::<u64>()],
            seg in any::<[u8; 16]>(),
            descs in proptest::collection::vec(
                (prop_oneof![0u64..MEM_SIZE, any::<u64>()], prop_oneof![0u32..2048, any::<u32>()], any::<bool>()),
                1..8),
        ) {
            let m = mem();
            hdr(&m, rtype, sector);
            m.write_slice(&seg, GuestAddress(DATA)).unwrap();
            let mut v = vec![d(HDR, 16, false)];
            v.extend(descs.iter().map(|&(a, l, w)| d(a, l, w)));
            let q = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
            if let Ok(chain) = q.build_desc_chain(&v) {
                match parse(chain, &LIMITS) {
                    Ok(r) => {
                        // Accepted requests are within the disk.
                        prop_assert!(r.offset() / 512 + u64::from(r.data_len()) / 512 <= 64);
                    }
                    Err(rej) => prop_assert!(rej.status == STATUS_IOERR || rej.status == STATUS_UNSUPP),
                }
            }
        }
    }
}
