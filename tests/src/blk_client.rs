// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A vhost-user-blk test and benchmark client (frontend without a VM).
//!
//! Built on the `virtio-driver` crate's vhost-user transport and split virtqueue, but with our
//! own per-request slot instead of `VirtioBlkQueue`, so that tests can send any request type
//! (GET_ID, unknown types), shape descriptor chains freely, and see the raw virtio status byte.
//!
//! Invariants:
//! - All memory the device touches (rings, request slots, data buffers) is memfd-backed and
//!   registered with the backend (`map_mem_region`); data buffers are owned by the client and
//!   live as long as it does, so an in-flight request never points at freed memory.
//! - The virtqueues borrow the transport's ring mapping; `queues` is declared before
//!   `transport` so it is dropped first.
//! - The status byte of every request is pre-set to [`STATUS_NOT_WRITTEN`], so a device that
//!   completes a request without writing the status is visible to tests.
//! - Waiting never hangs forever: the sync helpers use a timeout (see [`ClientOptions`]).
//! - Submission and completion do no heap allocation (bench hot path).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use virtio_driver::virtqueue::{Virtqueue, VirtqueueLayout};
use virtio_driver::{
    iovec, EventFd, QueueNotifier, VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags,
    VirtioFeatureFlags, VirtioTransport,
};

/// Virtio-blk request types (virtio 1.2, 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Virtio-blk status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Pre-set status byte: the device completed the request without writing a status.
pub const STATUS_NOT_WRITTEN: u8 = 0xff;

/// Length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Virtio-blk sectors are always 512 bytes, whatever blk_size says.
pub const SECTOR_SIZE: u64 = 512;
/// `flags` bit of a discard / write-zeroes segment.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Features the client accepts by default if the device offers them. No INDIRECT_DESC and no
/// PACKED: virtio-driver does not build indirect tables, and libvhost-user lacks packed rings.
pub const DEFAULT_FEATURES: u64 = VirtioFeatureFlags::VERSION_1.bits()
    | VirtioFeatureFlags::RING_EVENT_IDX.bits()
    | VirtioBlkFeatureFlags::SIZE_MAX.bits()
    | VirtioBlkFeatureFlags::SEG_MAX.bits()
    | VirtioBlkFeatureFlags::GEOMETRY.bits()
    | VirtioBlkFeatureFlags::RO.bits()
    | VirtioBlkFeatureFlags::BLK_SIZE.bits()
    | VirtioBlkFeatureFlags::FLUSH.bits()
    | VirtioBlkFeatureFlags::TOPOLOGY.bits()
    | VirtioBlkFeatureFlags::CONFIG_WCE.bits()
    | VirtioBlkFeatureFlags::MQ.bits()
    | VirtioBlkFeatureFlags::DISCARD.bits()
    | VirtioBlkFeatureFlags::WRITE_ZEROES.bits();

/// Errors of the client. A non-OK virtio status is `Status`, so tests can match on the value.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("vhost-user/virtqueue I/O: {0}")]
    Io(#[from] io::Error),
    #[error("device answered with virtio status {0}")]
    Status(u8),
    #[error("timed out after {0:?} waiting for a completion")]
    Timeout(Duration),
    #[error("not enough free descriptors in queue {queue} (need {need}, free {free})")]
    QueueFull {
        queue: usize,
        need: usize,
        free: usize,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(ClientError::InvalidArgument(msg.into()))
}

/// Connection parameters.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub num_queues: usize,
    /// Descriptors per queue (power of two). A request takes 2 + data segments descriptors, so
    /// allow 3 x the intended queue depth.
    pub queue_size: u16,
    /// Virtio feature bits to accept if offered (see [`DEFAULT_FEATURES`]).
    pub features: u64,
    /// Size of the internal registered bounce buffer used by the sync helpers.
    pub bounce_size: usize,
    /// How long the sync helpers wait for a completion.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 128,
            features: DEFAULT_FEATURES,
            bounce_size: 1 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The device configuration space in native endianness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl From<VirtioBlkConfig> for BlkConfig {
    fn from(c: VirtioBlkConfig) -> Self {
        // Braces copy each field out of the packed struct before converting.
        Self {
            capacity: { c.capacity }.into(),
            size_max: { c.size_max }.into(),
            seg_max: { c.seg_max }.into(),
            blk_size: { c.blk_size }.into(),
            physical_block_exp: c.physical_block_exp,
            min_io_size: { c.min_io_size }.into(),
            opt_io_size: { c.opt_io_size }.into(),
            writeback: c.writeback,
            num_queues: { c.num_queues }.into(),
            max_discard_sectors: { c.max_discard_sectors }.into(),
            max_discard_seg: { c.max_discard_seg }.into(),
            discard_sector_alignment: { c.discard_sector_alignment }.into(),
            max_write_zeroes_sectors: { c.max_write_zeroes_sectors }.into(),
            max_write_zeroes_seg: { c.max_write_zeroes_seg }.into(),
            write_zeroes_may_unmap: c.write_zeroes_may_unmap,
        }
    }
}

impl BlkConfig {
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR_SIZE
    }
}

/// The 16-byte request header (`struct virtio_blk_outhdr`), native endianness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReqHeader {
    pub req_type: u32,
    pub reserved: u32,
    pub sector: u64,
}

/// One discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DwzSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// Per-request memory shared with the device, one per descriptor head. The fields are stored
/// little-endian.
#[repr(C)]
#[derive(Clone, Copy)]
struct ReqSlot {
    header: [u8; 16],
    dwz: [u8; 16],
    status: u8,
}

/// Handle of a registered data buffer owned by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufId(usize);

impl BufId {
    /// The sub-range `offset..offset + len` of this buffer (checked when used).
    pub fn slice(self, offset: usize, len: usize) -> BufSlice {
        BufSlice {
            buf: self,
            offset,
            len,
        }
    }
}

/// A range of a registered buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufSlice {
    pub buf: BufId,
    pub offset: usize,
    pub len: usize,
}

/// One descriptor of a hand-built chain (see [`BlkClient::submit_chain`]).
#[derive(Clone, Copy, Debug)]
pub enum ChainDesc {
    /// The first `len` (<= 16) bytes of the slot's request header.
    Header { len: usize, device_writable: bool },
    /// The slot's discard / write-zeroes segment (16 bytes).
    Dwz { device_writable: bool },
    /// A data buffer.
    Data {
        buf: BufSlice,
        device_writable: bool,
    },
    /// The slot's status byte (1 byte; device-writable in a well-formed request).
    Status { device_writable: bool },
    /// Any address and length, registered or not (the vhost-user transport uses frontend
    /// virtual addresses as guest addresses): for out-of-memory / bad-length tests.
    Raw {
        addr: u64,
        len: u32,
        device_writable: bool,
    },
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkCompletion {
    /// The caller's tag given at submission.
    pub tag: u64,
    /// Raw virtio status byte ([`STATUS_NOT_WRITTEN`] if the device did not write it).
    pub status: u8,
}

impl BlkCompletion {
    pub fn is_ok(&self) -> bool {
        self.status == VIRTIO_BLK_S_OK
    }
}

struct Queue {
    vq: Virtqueue<'static, ReqSlot>,
    kick: Box<dyn QueueNotifier>,
    call: Arc<EventFd>,
    /// Indexed by head descriptor: (tag, descriptors used) of the in-flight request.
    inflight: Box<[Option<(u64, u16)>]>,
    free_descs: usize,
    inflight_count: usize,
    /// Used-ring entries naming a head we never submitted (a backend bug).
    spurious: u64,
    /// Notifications [`BlkClient::kick`] sent (the ones the device did not suppress).
    kicks_sent: u64,
}

struct Buffer {
    map: MmapMut,
    _file: File,
}

/// A synchronous + batched vhost-user-blk client.
pub struct BlkClient {
    // Dropped before `transport`, whose mapping the queues point into.
    queues: Vec<Queue>,
    buffers: Vec<Buffer>,
    bounce: BufId,
    /// Scratch array for `wait_any`, sized once (no allocation while waiting).
    pollfds: Vec<libc::pollfd>,
    transport: VhostUser<VirtioBlkConfig, ReqSlot>,
    features: u64,
    config: BlkConfig,
    opts: ClientOptions,
}

/// Consumes an eventfd's counter after poll said it is readable. Another reader (or a
/// non-blocking fd set by the backend) may leave nothing to read: that is not an error.
fn read_eventfd(fd: i32) -> Result<()> {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a u64.
    let n = unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
    Ok(())
}

impl BlkClient {
    /// Connects with default features, `num_queues` queues of `queue_size` descriptors.
    pub fn connect(path: &str, num_queues: usize, queue_size: u16) -> Result<Self> {
        Self::connect_with(
            path,
            ClientOptions {
                num_queues,
                queue_size,
                ..ClientOptions::default()
            },
        )
    }

    /// Connects, negotiates, sets up the queues and the bounce buffer.
    pub fn connect_with(path: &str, opts: ClientOptions) -> Result<Self> {
        if opts.num_queues == 0 {
            return invalid("num_queues must be at least 1");
        }
        if !opts.queue_size.is_power_of_two() || opts.queue_size < 4 {
            return invalid("queue_size must be a power of two >= 4");
        }
        let mut transport: VhostUser<VirtioBlkConfig, ReqSlot> =
            VhostUser::new(path, opts.features)?;
        let features = transport.get_features();
        let config = BlkConfig::from(transport.get_config()?);

        let max_queues = if features & VirtioBlkFeatureFlags::MQ.bits() != 0 {
            config.num_queues as usize
        } else {
            1
        };
        let max_queues = transport
            .max_queues()
            .map_or(max_queues, |m| m.min(max_queues));
        if opts.num_queues > max_queues {
            return invalid(format!(
                "{} queues requested, device offers {max_queues}",
                opts.num_queues
            ));
        }

        let vfeatures = VirtioFeatureFlags::from_bits_truncate(features);
        let layout =
            VirtqueueLayout::new::<ReqSlot>(opts.num_queues, opts.queue_size as usize, vfeatures)?;
        let translators: Vec<_> = (0..opts.num_queues)
            .map(|_| transport.iova_translator())
            .collect();
        let mem = transport.alloc_queue_mem(&layout)?;
        let (base, total) = (mem.as_mut_ptr(), mem.len());
        if total < opts.num_queues * layout.end_offset {
            return invalid("virtqueue memory smaller than its layout");
        }
        let vqs = translators
            .into_iter()
            .enumerate()
            .map(|(i, tr)| {
                // SAFETY: the ranges are disjoint parts of the transport's ring mapping, which
                // lives (at a fixed address) as long as the transport; `BlkClient` drops the
                // queues before the transport, so 'static never outlives the mapping.
                let part: &'static mut [u8] = unsafe {
                    std::slice::from_raw_parts_mut(
                        base.add(i * layout.end_offset),
                        layout.end_offset,
                    )
                };
                Virtqueue::new(tr, part, opts.queue_size, vfeatures)
            })
            .collect::<io::Result<Vec<_>>>()?;
        transport.setup_queues(&vqs)?;

        let queues = vqs
            .into_iter()
            .enumerate()
            .map(|(i, mut vq)| {
                // With EVENT_IDX used notifications start disabled in virtio-driver.
                vq.set_used_notif_enabled(true);
                Queue {
                    vq,
                    kick: transport.get_submission_notifier(i),
                    call: transport.get_completion_fd(i),
                    inflight: vec![None; opts.queue_size as usize].into_boxed_slice(),
                    free_descs: opts.queue_size as usize,
                    inflight_count: 0,
                    spurious: 0,
                    kicks_sent: 0,
                }
            })
            .collect();

        let mut client = Self {
            pollfds: vec![
                libc::pollfd {
                    fd: -1,
                    events: 0,
                    revents: 0
                };
                opts.num_queues
            ],
            queues,
            buffers: Vec::new(),
            bounce: BufId(0),
            transport,
            features,
            config,
            opts,
        };
        client.bounce = client.alloc_buffer(client.opts.bounce_size)?;
        Ok(client)
    }

    /// Negotiated virtio feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn has_feature(&self, bits: u64) -> bool {
        self.features & bits == bits
    }

    /// The configuration space read at connect time.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Reads the configuration space again (GET_CONFIG).
    pub fn refresh_config(&mut self) -> Result<BlkConfig> {
        self.config = BlkConfig::from(self.transport.get_config()?);
        Ok(self.config)
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    /// Requests submitted on `q` and not yet completed.
    pub fn inflight(&self, q: usize) -> usize {
        self.queues[q].inflight_count
    }

    /// Free descriptors on `q`.
    pub fn free_descriptors(&self, q: usize) -> usize {
        self.queues[q].free_descs
    }

    /// Used-ring entries for heads that were not in flight (a backend bug) on `q`.
    pub fn spurious_completions(&self, q: usize) -> u64 {
        self.queues[q].spurious
    }

    /// How many notifications [`kick`](Self::kick) actually sent on `q` (a device that
    /// disabled notifications, e.g. while polling the ring, suppresses the others).
    pub fn kicks_sent(&self, q: usize) -> u64 {
        self.queues[q].kicks_sent
    }

    /// Allocates a memfd-backed buffer of `len` bytes (rounded up to 4 KiB) and registers it
    /// with the backend (ADD_MEM_REGION). It lives as long as the client.
    pub fn alloc_buffer(&mut self, len: usize) -> Result<BufId> {
        if len == 0 {
            return invalid("zero-sized buffer");
        }
        let len = len.next_multiple_of(4096);
        // SAFETY: plain syscall with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"blk-client-buf".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // SAFETY: the memfd is private to this client; only the backend shares it.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        self.transport
            .map_mem_region(map.as_mut_ptr() as usize, len, file.as_raw_fd(), 0)?;
        self.buffers.push(Buffer { map, _file: file });
        Ok(BufId(self.buffers.len() - 1))
    }

    pub fn buf(&self, id: BufId) -> &[u8] {
        &self.buffers[id.0].map
    }

    pub fn buf_mut(&mut self, id: BufId) -> &mut [u8] {
        &mut self.buffers[id.0].map
    }

    /// The address the device sees for `s` (for [`ChainDesc::Raw`] descriptors).
    pub fn addr_of(&self, s: BufSlice) -> Result<u64> {
        Ok(self.iov(s)?.iov_base as usize as u64)
    }

    fn iov(&self, s: BufSlice) -> Result<iovec> {
        let b = self
            .buffers
            .get(s.buf.0)
            .ok_or_else(|| ClientError::InvalidArgument("unknown buffer".into()))?;
        match s.offset.checked_add(s.len) {
            Some(end) if end <= b.map.len() && u32::try_from(s.len).is_ok() => {}
            _ => return invalid("buffer slice out of range"),
        }
        Ok(iovec {
            // The device only reads/writes through its own mapping; the pointer is an address.
            iov_base: b.map.as_ptr().wrapping_add(s.offset) as *mut libc::c_void,
            iov_len: s.len,
        })
    }

    /// Queues a hand-built descriptor chain on `q` (no kick). The slot's header and segment
    /// are filled from `header` / `dwz`; `descs` decides which parts the chain references and
    /// in which order, so tests can build malformed requests.
    pub fn submit_chain(
        &mut self,
        q: usize,
        header: ReqHeader,
        dwz: DwzSegment,
        descs: &[ChainDesc],
        tag: u64,
    ) -> Result<()> {
        if q >= self.queues.len() {
            return invalid(format!("queue {q} out of range"));
        }
        if descs.is_empty() {
            // virtio-driver cannot publish an empty chain (and neither can the spec).
            return invalid("empty descriptor chain");
        }
        let free = self.queues[q].free_descs;
        if descs.len() > free {
            return Err(ClientError::QueueFull {
                queue: q,
                need: descs.len(),
                free,
            });
        }
        // Resolve data buffers first: the closure below cannot borrow `self`.
        let mut data = [iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 16];
        let mut ndata = 0;
        for d in descs {
            if let ChainDesc::Data { buf, .. } = d {
                if ndata == data.len() {
                    return invalid("at most 16 data descriptors per chain");
                }
                data[ndata] = self.iov(*buf)?;
                ndata += 1;
            }
            if let ChainDesc::Header { len, .. } = d {
                if *len > 16 {
                    return invalid("header descriptor longer than 16 bytes");
                }
            }
        }

        let queue = &mut self.queues[q];
        let head = queue.vq.add_request(|slot, add| {
            slot.header[0..4].copy_from_slice(&header.req_type.to_le_bytes());
            slot.header[4..8].copy_from_slice(&header.reserved.to_le_bytes());
            slot.header[8..16].copy_from_slice(&header.sector.to_le_bytes());
            slot.dwz[0..8].copy_from_slice(&dwz.sector.to_le_bytes());
            slot.dwz[8..12].copy_from_slice(&dwz.num_sectors.to_le_bytes());
            slot.dwz[12..16].copy_from_slice(&dwz.flags.to_le_bytes());
            slot.status = STATUS_NOT_WRITTEN;
            let mut di = 0;
            for d in descs {
                let (iov, writable) = match *d {
                    ChainDesc::Header {
                        len,
                        device_writable,
                    } => (
                        iovec {
                            iov_base: slot.header.as_mut_ptr() as *mut libc::c_void,
                            iov_len: len,
                        },
                        device_writable,
                    ),
                    ChainDesc::Dwz { device_writable } => (
                        iovec {
                            iov_base: slot.dwz.as_mut_ptr() as *mut libc::c_void,
                            iov_len: slot.dwz.len(),
                        },
                        device_writable,
                    ),
                    ChainDesc::Data {
                        device_writable, ..
                    } => {
                        di += 1;
                        (data[di - 1], device_writable)
                    }
                    ChainDesc::Status { device_writable } => (
                        iovec {
                            iov_base: &mut slot.status as *mut u8 as *mut libc::c_void,
                            iov_len: 1,
                        },
                        device_writable,
                    ),
                    ChainDesc::Raw {
                        addr,
                        len,
                        device_writable,
                    } => (
                        iovec {
                            iov_base: addr as usize as *mut libc::c_void,
                            iov_len: len as usize,
                        },
                        device_writable,
                    ),
                };
                add(iov, writable)?;
            }
            Ok(())
        })?;
        let entry = &mut queue.inflight[head as usize];
        if entry.is_some() {
            // virtio-driver handed out a head we think is in flight: our bookkeeping is broken.
            return Err(
                io::Error::other(format!("descriptor head {head} reused while in flight")).into(),
            );
        }
        *entry = Some((tag, descs.len() as u16));
        queue.free_descs -= descs.len();
        queue.inflight_count += 1;
        Ok(())
    }

    fn to_sector(offset: u64) -> Result<u64> {
        if !offset.is_multiple_of(SECTOR_SIZE) {
            return invalid(format!("offset {offset} not 512-byte aligned"));
        }
        Ok(offset / SECTOR_SIZE)
    }

    /// Queues a well-formed request of any type: header, optional data buffer, status.
    /// Use it for unknown request types.
    pub fn submit_raw(
        &mut self,
        q: usize,
        req_type: u32,
        sector: u64,
        data: Option<(BufSlice, bool)>,
        tag: u64,
    ) -> Result<()> {
        let header = ReqHeader {
            req_type,
            reserved: 0,
            sector,
        };
        let hdr = ChainDesc::Header {
            len: 16,
            device_writable: false,
        };
        let st = ChainDesc::Status {
            device_writable: true,
        };
        match data {
            Some((buf, device_writable)) => self.submit_chain(
                q,
                header,
                DwzSegment::default(),
                &[
                    hdr,
                    ChainDesc::Data {
                        buf,
                        device_writable,
                    },
                    st,
                ],
                tag,
            ),
            None => self.submit_chain(q, header, DwzSegment::default(), &[hdr, st], tag),
        }
    }

    /// Queues a read of `buf.len` bytes at byte `offset` (512-aligned) into `buf`.
    pub fn submit_read(&mut self, q: usize, offset: u64, buf: BufSlice, tag: u64) -> Result<()> {
        let sector = Self::to_sector(offset)?;
        self.submit_raw(q, VIRTIO_BLK_T_IN, sector, Some((buf, true)), tag)
    }

    /// Queues a write of `buf` at byte `offset` (512-aligned).
    pub fn submit_write(&mut self, q: usize, offset: u64, buf: BufSlice, tag: u64) -> Result<()> {
        let sector = Self::to_sector(offset)?;
        self.submit_raw(q, VIRTIO_BLK_T_OUT, sector, Some((buf, false)), tag)
    }

    pub fn submit_flush(&mut self, q: usize, tag: u64) -> Result<()> {
        self.submit_raw(q, VIRTIO_BLK_T_FLUSH, 0, None, tag)
    }

    /// Queues GET_ID; `buf` should be [`VIRTIO_BLK_ID_BYTES`] long.
    pub fn submit_get_id(&mut self, q: usize, buf: BufSlice, tag: u64) -> Result<()> {
        self.submit_raw(q, VIRTIO_BLK_T_GET_ID, 0, Some((buf, true)), tag)
    }

    fn submit_dwz(&mut self, q: usize, req_type: u32, seg: DwzSegment, tag: u64) -> Result<()> {
        self.submit_chain(
            q,
            ReqHeader {
                req_type,
                reserved: 0,
                sector: 0,
            },
            seg,
            &[
                ChainDesc::Header {
                    len: 16,
                    device_writable: false,
                },
                ChainDesc::Dwz {
                    device_writable: false,
                },
                ChainDesc::Status {
                    device_writable: true,
                },
            ],
            tag,
        )
    }

    fn dwz_segment(offset: u64, len: u64, flags: u32) -> Result<DwzSegment> {
        let sector = Self::to_sector(offset)?;
        let n = Self::to_sector(len)?;
        let num_sectors =
            u32::try_from(n).map_err(|_| ClientError::InvalidArgument("range too long".into()))?;
        Ok(DwzSegment {
            sector,
            num_sectors,
            flags,
        })
    }

    /// Queues DISCARD of `len` bytes at `offset` (both 512-aligned), one segment.
    pub fn submit_discard(&mut self, q: usize, offset: u64, len: u64, tag: u64) -> Result<()> {
        let seg = Self::dwz_segment(offset, len, 0)?;
        self.submit_dwz(q, VIRTIO_BLK_T_DISCARD, seg, tag)
    }

    /// Queues WRITE_ZEROES of `len` bytes at `offset`, with the UNMAP flag if `unmap`.
    pub fn submit_write_zeroes(
        &mut self,
        q: usize,
        offset: u64,
        len: u64,
        unmap: bool,
        tag: u64,
    ) -> Result<()> {
        let flags = if unmap {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        let seg = Self::dwz_segment(offset, len, flags)?;
        self.submit_dwz(q, VIRTIO_BLK_T_WRITE_ZEROES, seg, tag)
    }

    /// Notifies the device of queued requests on `q` if it asked for it (EVENT_IDX / NO_NOTIFY).
    /// Call once per batch.
    pub fn kick(&mut self, q: usize) -> Result<()> {
        let queue = &mut self.queues[q];
        if queue.vq.avail_notif_needed() {
            queue.kick.notify()?;
            queue.kicks_sent += 1;
        }
        Ok(())
    }

    /// Notifies the device unconditionally.
    pub fn kick_always(&mut self, q: usize) -> Result<()> {
        self.queues[q].kick.notify()?;
        Ok(())
    }

    /// Hands every completion in the used ring of `q` to `f`; returns how many.
    pub fn drain_completions(&mut self, q: usize, mut f: impl FnMut(BlkCompletion)) -> usize {
        let queue = &mut self.queues[q];
        let mut n = 0;
        for c in queue.vq.completions() {
            match queue.inflight[c.id as usize].take() {
                Some((tag, ndesc)) => {
                    queue.free_descs += ndesc as usize;
                    queue.inflight_count -= 1;
                    n += 1;
                    f(BlkCompletion {
                        tag,
                        status: c.req.status,
                    });
                }
                None => queue.spurious += 1,
            }
        }
        n
    }

    /// True if the used ring of `q` holds completions not yet drained.
    pub fn has_completions(&mut self, q: usize) -> bool {
        self.queues[q].vq.completions().has_next()
    }

    /// Raw fd of the call eventfd of `q` (for callers that multiplex with poll/epoll).
    pub fn completion_fd(&self, q: usize) -> i32 {
        self.queues[q].call.as_raw_fd()
    }

    /// Waits until the call eventfd of `q` is signalled (or `timeout`), then consumes it.
    /// Returns false on timeout. Poll first: the backend may have made the fd non-blocking.
    pub fn wait_notification(&mut self, q: usize, timeout: Option<Duration>) -> Result<bool> {
        let fd = self.queues[q].call.as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e.into());
        }
        if r == 0 {
            return Ok(false);
        }
        read_eventfd(fd)?;
        Ok(true)
    }

    /// Waits until any queue's call eventfd is signalled (or `timeout`) and consumes the
    /// signalled ones. Returns false on timeout. For single-threaded multi-queue drivers.
    pub fn wait_any(&mut self, timeout: Option<Duration>) -> Result<bool> {
        for (p, q) in self.pollfds.iter_mut().zip(&self.queues) {
            *p = libc::pollfd {
                fd: q.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `pollfds` is a valid array of `len()` pollfds.
        let r = unsafe {
            libc::poll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                ms,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e.into());
        }
        for p in &self.pollfds {
            if p.revents & libc::POLLIN != 0 {
                read_eventfd(p.fd)?;
            }
        }
        Ok(r > 0)
    }

    /// Kicks `q` and waits for the completion of the single in-flight request there.
    fn complete_one(&mut self, q: usize) -> Result<BlkCompletion> {
        self.kick(q)?;
        let deadline = Instant::now() + self.opts.timeout;
        let mut out = None;
        loop {
            self.drain_completions(q, |c| out = Some(c));
            if let Some(c) = out {
                return Ok(c);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(self.opts.timeout));
            }
            self.wait_notification(q, Some(deadline - now))?;
        }
    }

    fn ensure_idle(&self, q: usize) -> Result<()> {
        if q >= self.queues.len() {
            return invalid(format!("queue {q} out of range"));
        }
        if self.queues[q].inflight_count != 0 {
            return invalid("sync helpers need a queue without requests in flight");
        }
        Ok(())
    }

    fn status_result(c: BlkCompletion) -> Result<()> {
        if c.is_ok() {
            Ok(())
        } else {
            Err(ClientError::Status(c.status))
        }
    }

    /// Submits a request built by `submit` on idle queue `q` and waits; returns the raw status.
    pub fn request_sync(
        &mut self,
        q: usize,
        submit: impl FnOnce(&mut Self, usize) -> Result<()>,
    ) -> Result<u8> {
        self.ensure_idle(q)?;
        submit(self, q)?;
        Ok(self.complete_one(q)?.status)
    }

    /// Largest chunk a sync read/write sends in one request.
    fn chunk_len(&self) -> usize {
        let mut chunk = self.opts.bounce_size;
        if self.has_feature(VirtioBlkFeatureFlags::SIZE_MAX.bits()) && self.config.size_max != 0 {
            chunk = chunk.min(self.config.size_max as usize & !(SECTOR_SIZE as usize - 1));
        }
        chunk.max(SECTOR_SIZE as usize)
    }

    /// Reads `buf.len()` bytes at `offset` (both 512-aligned) through the bounce buffer.
    pub fn read_at(&mut self, q: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.ensure_idle(q)?;
        let chunk = self.chunk_len();
        let mut done = 0;
        while done < buf.len() {
            let n = chunk.min(buf.len() - done);
            self.submit_read(q, offset + done as u64, self.bounce.slice(0, n), 0)?;
            Self::status_result(self.complete_one(q)?)?;
            buf[done..done + n].copy_from_slice(&self.buf(self.bounce)[..n]);
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` (both 512-aligned) through the bounce buffer.
    pub fn write_at(&mut self, q: usize, offset: u64, buf: &[u8]) -> Result<()> {
        self.ensure_idle(q)?;
        let chunk = self.chunk_len();
        let mut done = 0;
        while done < buf.len() {
            let n = chunk.min(buf.len() - done);
            let bounce = self.bounce;
            self.buf_mut(bounce)[..n].copy_from_slice(&buf[done..done + n]);
            self.submit_write(q, offset + done as u64, bounce.slice(0, n), 0)?;
            Self::status_result(self.complete_one(q)?)?;
            done += n;
        }
        Ok(())
    }

    pub fn flush(&mut self, q: usize) -> Result<()> {
        let st = self.request_sync(q, |c, q| c.submit_flush(q, 0))?;
        Self::status_result(BlkCompletion { tag: 0, status: st })
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> Result<()> {
        let st = self.request_sync(q, |c, q| c.submit_discard(q, offset, len, 0))?;
        Self::status_result(BlkCompletion { tag: 0, status: st })
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let st = self.request_sync(q, |c, q| c.submit_write_zeroes(q, offset, len, unmap, 0))?;
        Self::status_result(BlkCompletion { tag: 0, status: st })
    }

    /// GET_ID: the 20-byte serial (NUL-padded if shorter).
    pub fn get_id(&mut self, q: usize) -> Result<[u8; VIRTIO_BLK_ID_BYTES]> {
        let bounce = self.bounce;
        self.buf_mut(bounce)[..VIRTIO_BLK_ID_BYTES].fill(0);
        let st = self.request_sync(q, |c, q| {
            c.submit_get_id(q, bounce.slice(0, VIRTIO_BLK_ID_BYTES), 0)
        })?;
        Self::status_result(BlkCompletion { tag: 0, status: st })?;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        id.copy_from_slice(&self.buf(bounce)[..VIRTIO_BLK_ID_BYTES]);
        Ok(id)
    }
}
