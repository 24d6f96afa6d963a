// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A test vhost-user frontend: vhost's `Frontend` for the protocol, memfd-backed guest memory
//! shared with the backend, and a minimal split-ring driver (place descriptor chains, kick,
//! wait for used entries). Also raw message access for protocol-ordering and malformed-message
//! tests, and helpers for the inflight region and the dirty log.
//!
//! Guest memory is one region at [`MEM_GPA`]; queue `q`'s rings live at fixed offsets
//! ([`TestFrontend::ring_gpas`]), data buffers are handed out from [`DATA_GPA`] upwards by a
//! bump allocator ([`TestFrontend::alloc`]).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical base of the test memory (never 0: virtio-queue rejects rings at GPA 0).
pub const MEM_GPA: u64 = 0x10_0000;
/// Size of the test memory.
pub const MEM_SIZE: u64 = 0x80_0000;
/// Where data buffers start.
pub const DATA_GPA: u64 = MEM_GPA + 0x20_0000;
/// Per-queue ring area stride.
const RING_STRIDE: u64 = 0x1_0000;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Raw request codes used by the tests.
pub mod req {
    /// SET_FEATURES
    pub const SET_FEATURES: u32 = 2;
    /// SET_VRING_ENABLE
    pub const SET_VRING_ENABLE: u32 = 18;
    /// SEND_RARP
    pub const SEND_RARP: u32 = 19;
    /// GET_FEATURES
    pub const GET_FEATURES: u32 = 1;
}

/// One buffer of a chain to place: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device writes it (VRING_DESC_F_WRITE).
    pub writable: bool,
}

/// Driver side of one split ring.
#[derive(Debug)]
pub struct TestQueue {
    /// Queue size.
    pub size: u16,
    /// Kick eventfd (we write).
    pub kick: EventFd,
    /// Call eventfd (backend writes).
    pub call: EventFd,
    free: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
}

/// The test frontend.
pub struct TestFrontend {
    /// vhost's frontend (protocol).
    pub fe: Frontend,
    raw: UnixStream,
    /// Guest memory as the frontend maps it.
    pub mem: GuestMemoryMmap<()>,
    mem_file: File,
    /// Frontend virtual address of MEM_GPA.
    pub va_base: u64,
    /// Queues, by index.
    pub queues: Vec<TestQueue>,
    next_data: u64,
    /// Features acked by `negotiate`.
    pub features: u64,
}

fn memfd(name: &str, size: u64) -> File {
    let name = std::ffi::CString::new(name).expect("name");
    // SAFETY: plain syscall.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("memfd set_len");
    f
}

impl TestFrontend {
    /// Connect to `path`, retrying until the backend listens (up to `timeout`).
    pub fn connect(path: &Path, num_queues: usize, timeout: Duration) -> Self {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let raw = stream.try_clone().expect("clone");
        let fe = Frontend::from_stream(stream, num_queues as u64);
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let mem_file = memfd("ft-test-guest", MEM_SIZE);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(MEM_GPA),
            MEM_SIZE as usize,
            Some(FileOffset::new(mem_file.try_clone().expect("dup"), 0)),
        )])
        .expect("guest memory");
        let va_base = mem.get_host_address(GuestAddress(MEM_GPA)).expect("va") as u64;
        TestFrontend {
            fe,
            raw,
            mem,
            mem_file,
            va_base,
            queues: Vec::new(),
            next_data: DATA_GPA,
            features: 0,
        }
    }

    /// Reconnect a fresh protocol session on `path` keeping this guest memory and ring contents
    /// (what a VMM does after the backend restarts).
    pub fn reconnect(&mut self, path: &Path, timeout: Duration) {
        let n = self.queues.len().max(1);
        let fresh = Self::connect(path, n, timeout);
        self.fe = fresh.fe;
        self.raw = fresh.raw;
    }

    /// The raw socket (same connection as `fe`), for hand-made messages.
    pub fn raw(&mut self) -> &mut UnixStream {
        &mut self.raw
    }

    /// A new frontend on `path` (a new protocol session) whose guest memory and split-ring
    /// driver state are a copy of this one's: what a backend sees when a VMM restores a
    /// checkpoint of this guest. Nothing is sent yet.
    pub fn restored_copy(&self, path: &Path, timeout: Duration) -> Self {
        let mut f = Self::connect(path, self.queues.len().max(1), timeout);
        let mut image = vec![0u8; MEM_SIZE as usize];
        self.mem
            .read_slice(&mut image, GuestAddress(MEM_GPA))
            .expect("read guest memory");
        f.mem
            .write_slice(&image, GuestAddress(MEM_GPA))
            .expect("copy guest memory");
        f.queues = self
            .queues
            .iter()
            .map(|q| TestQueue {
                size: q.size,
                kick: EventFd::new(0).expect("eventfd"),
                call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
                free: q.free.clone(),
                avail_idx: q.avail_idx,
                last_used: q.last_used,
            })
            .collect();
        f.next_data = self.next_data;
        f.features = self.features;
        f
    }

    /// Send a raw message (header + body).
    pub fn send_raw(&mut self, request: u32, flags: u32, body: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        self.raw.write_all(&m).expect("send raw");
    }

    /// Send a raw message with one fd attached.
    pub fn send_raw_with_fd(&mut self, request: u32, flags: u32, body: &[u8], fd: RawFd) {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        let n = self.raw.send_with_fd(&m[..], fd).expect("send with fd");
        assert_eq!(n, m.len());
    }

    /// Read one raw reply: (request, flags, body).
    pub fn recv_raw(&mut self) -> std::io::Result<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; 12];
        self.raw.read_exact(&mut h)?;
        let w = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let mut body = vec![0u8; w(8) as usize];
        self.raw.read_exact(&mut body)?;
        Ok((w(0), w(4), body))
    }

    /// Send a raw message with NEED_REPLY and return the u64 ack value (0 = success).
    pub fn raw_acked(&mut self, request: u32, body: &[u8]) -> u64 {
        self.send_raw(request, 0x1 | 0x8, body);
        let (r, flags, b) = self.recv_raw().expect("ack");
        assert_eq!(r, request, "reply to another request");
        assert_eq!(flags & 0x4, 0x4, "not a reply");
        u64::from_le_bytes(b[..8].try_into().expect("u64 ack"))
    }

    /// SET_VRING_ENABLE by hand (vhost's Frontend refuses it before SET_FEATURES).
    pub fn raw_vring_enable(&mut self, q: u32, enable: bool) -> u64 {
        let mut b = q.to_le_bytes().to_vec();
        b.extend_from_slice(&u32::from(enable).to_le_bytes());
        self.raw_acked(req::SET_VRING_ENABLE, &b)
    }

    /// SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (all offered); returns
    /// (features offered, protocol features).
    pub fn handshake(&mut self) -> (u64, VhostUserProtocolFeatures) {
        self.fe.set_owner().expect("set_owner");
        let features = self.fe.get_features().expect("get_features");
        assert!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
        // vhost's Frontend needs PROTOCOL_FEATURES acked before get_protocol_features.
        self.fe.set_features(features).expect("set_features");
        let proto = self
            .fe
            .get_protocol_features()
            .expect("get_protocol_features");
        self.fe
            .set_protocol_features(proto)
            .expect("set_protocol_features");
        (features, proto)
    }

    /// The guest memory region as a vhost memory region description.
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: MEM_GPA,
            memory_size: MEM_SIZE,
            userspace_addr: self.va_base,
            mmap_offset: 0,
            mmap_handle: self.mem_file.as_raw_fd(),
        }
    }

    /// Share the guest memory (SET_MEM_TABLE).
    pub fn set_mem_table(&mut self) {
        let region = self.region_info();
        self.fe.set_mem_table(&[region]).expect("set_mem_table");
    }

    /// GPAs (desc, avail, used) of queue `q`'s rings.
    pub fn ring_gpas(q: usize) -> (u64, u64, u64) {
        let base = MEM_GPA + q as u64 * RING_STRIDE;
        (base, base + 0x4000, base + 0x8000)
    }

    /// Initialise queue `q`'s rings in memory (all zero) and the driver state; does not talk
    /// to the backend.
    pub fn init_queue(&mut self, q: usize, size: u16) {
        let (desc, _, _) = Self::ring_gpas(q);
        self.mem
            .write_slice(&vec![0u8; RING_STRIDE as usize], GuestAddress(desc))
            .expect("clear rings");
        while self.queues.len() <= q {
            self.queues.push(TestQueue {
                size: 0,
                kick: EventFd::new(0).expect("eventfd"),
                call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
                free: Vec::new(),
                avail_idx: 0,
                last_used: 0,
            });
        }
        let tq = &mut self.queues[q];
        tq.size = size;
        tq.free = (0..size).rev().collect();
        tq.avail_idx = 0;
        tq.last_used = 0;
    }

    /// Send SET_VRING_NUM, BASE, ADDR, CALL and KICK for queue `q` (rings as they are in
    /// memory, base = our avail idx as given).
    pub fn setup_vring(&mut self, q: usize, base: u16) {
        self.set_vring_layout(q, base);
        self.fe
            .set_vring_call(q, &self.queues[q].call)
            .expect("set_vring_call");
        self.fe
            .set_vring_kick(q, &self.queues[q].kick)
            .expect("set_vring_kick");
    }

    /// Send only SET_VRING_NUM, BASE and ADDR for queue `q`: for tests that order the kick
    /// and call fds (or the memory table) around them as a particular frontend does.
    pub fn set_vring_layout(&mut self, q: usize, base: u16) {
        let (desc, avail, used) = Self::ring_gpas(q);
        let size = self.queues[q].size;
        let va = |gpa: u64| gpa - MEM_GPA + self.va_base;
        self.fe.set_vring_num(q, size).expect("set_vring_num");
        self.fe.set_vring_base(q, base).expect("set_vring_base");
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: va(desc),
            used_ring_addr: va(used),
            avail_ring_addr: va(avail),
            log_addr: None,
        };
        self.fe.set_vring_addr(q, &cfg).expect("set_vring_addr");
    }

    /// Allocate `len` bytes of data buffer space (never reused).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let gpa = self.next_data;
        self.next_data = (gpa + len).div_ceil(64) * 64;
        assert!(
            self.next_data <= MEM_GPA + MEM_SIZE,
            "test memory exhausted"
        );
        gpa
    }

    /// Place a chain of a readable buffer holding `data` and a writable buffer of the same length
    /// (the shape of `ft-test-device`'s requests) on queue `q` (no kick). Returns (head, gpa of
    /// the writable buffer).
    pub fn add_in_out(&mut self, q: usize, data: &[u8]) -> (u16, u64) {
        let inp = self.alloc(data.len() as u64);
        let out = self.alloc(data.len() as u64);
        self.write(inp, data);
        let len = data.len() as u32;
        let head = self.add_chain(
            q,
            &[
                Buf {
                    gpa: inp,
                    len,
                    writable: false,
                },
                Buf {
                    gpa: out,
                    len,
                    writable: true,
                },
            ],
        );
        (head, out)
    }

    /// Place a chain on queue `q`'s avail ring (no kick); returns its head.
    pub fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let (desc, avail, _) = Self::ring_gpas(q);
        let tq = &mut self.queues[q];
        assert!(tq.free.len() >= bufs.len(), "queue {q} out of descriptors");
        let ids: Vec<u16> = (0..bufs.len())
            .map(|_| tq.free.pop().unwrap_or(0))
            .collect();
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            let d = desc + 16 * u64::from(ids[i]);
            self.mem.write_obj(b.gpa, GuestAddress(d)).expect("desc");
            self.mem
                .write_obj(b.len, GuestAddress(d + 8))
                .expect("desc");
            self.mem
                .write_obj(flags, GuestAddress(d + 12))
                .expect("desc");
            self.mem
                .write_obj(next, GuestAddress(d + 14))
                .expect("desc");
        }
        let slot = tq.avail_idx % tq.size;
        self.mem
            .write_obj(ids[0], GuestAddress(avail + 4 + 2 * u64::from(slot)))
            .expect("avail ring");
        tq.avail_idx = tq.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(tq.avail_idx, GuestAddress(avail + 2))
            .expect("avail idx");
        ids[0]
    }

    /// Kick queue `q`.
    pub fn kick(&self, q: usize) {
        self.queues[q].kick.write(1).expect("kick");
    }

    /// The used ring's idx as in memory.
    pub fn used_idx(&self, q: usize) -> u16 {
        let (_, _, used) = Self::ring_gpas(q);
        self.mem.read_obj(GuestAddress(used + 2)).expect("used idx")
    }

    /// Wait until `n` new used entries appeared on queue `q` (or `timeout`); returns the new
    /// (head, len) entries (possibly fewer than `n` on timeout). Descriptors of returned heads
    /// are not recycled (tests never run out with generous queue sizes).
    pub fn wait_used(&mut self, q: usize, n: usize, timeout: Duration) -> Vec<(u16, u32)> {
        let (_, _, used) = Self::ring_gpas(q);
        let start = Instant::now();
        loop {
            let idx = self.used_idx(q);
            let have = idx.wrapping_sub(self.queues[q].last_used) as usize;
            if have >= n || start.elapsed() >= timeout {
                let mut out = Vec::new();
                let tq = &mut self.queues[q];
                while tq.last_used != idx {
                    let slot = u64::from(tq.last_used % tq.size);
                    let e = used + 4 + 8 * slot;
                    let id: u32 = self.mem.read_obj(GuestAddress(e)).expect("used elem");
                    let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).expect("used elem");
                    out.push((id as u16, len));
                    tq.last_used = tq.last_used.wrapping_add(1);
                }
                return out;
            }
            let mut pfd = libc::pollfd {
                fd: self.queues[q].call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 20) };
            let _ = self.queues[q].call.read();
        }
    }

    /// Return the descriptors of completed chains (2-descriptor chains placed by `add_chain`
    /// with heads `heads`) to the free list.
    pub fn recycle(&mut self, q: usize, heads: &[u16]) {
        let (desc, _, _) = Self::ring_gpas(q);
        for &h in heads {
            let mut id = h;
            loop {
                self.queues[q].free.push(id);
                let d = desc + 16 * u64::from(id);
                let flags: u16 = self.mem.read_obj(GuestAddress(d + 12)).expect("desc");
                if flags & VRING_DESC_F_NEXT == 0 {
                    break;
                }
                id = self.mem.read_obj(GuestAddress(d + 14)).expect("desc");
            }
        }
    }

    /// Set the used-ring position we consider consumed (after a reconnect with rings kept).
    pub fn set_last_used(&mut self, q: usize, idx: u16) {
        self.queues[q].last_used = idx;
    }

    /// Our avail idx for queue `q`.
    pub fn avail_idx(&self, q: usize) -> u16 {
        self.queues[q].avail_idx
    }

    /// GET_INFLIGHT_FD then SET_INFLIGHT_FD (what QEMU does on first start); returns the
    /// region description and fd to keep for later connections.
    pub fn setup_inflight(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> (VhostUserInflight, File) {
        let req = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        let (info, file) = self.fe.get_inflight_fd(&req).expect("get_inflight_fd");
        assert!(info.mmap_size > 0);
        self.fe
            .set_inflight_fd(&info, file.as_raw_fd())
            .expect("set_inflight_fd");
        (info, file)
    }

    /// Create a dirty log covering guest memory and hand it over (SET_LOG_BASE with LOG_SHMFD).
    pub fn setup_dirty_log(&mut self) -> GuestMemoryMmap<()> {
        let pages = (MEM_GPA + MEM_SIZE) / 4096;
        let size = pages.div_ceil(8).div_ceil(4096) * 4096;
        let f = memfd("ft-test-log", size);
        self.fe
            .set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: size,
                    mmap_offset: 0,
                    mmap_handle: f.as_raw_fd(),
                }),
            )
            .expect("set_log_base");
        GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(f, 0)),
        )])
        .expect("map log")
    }

    /// Whether page `gpa / 4096` is marked in `log`.
    pub fn page_dirty(log: &GuestMemoryMmap<()>, gpa: u64) -> bool {
        let page = gpa / 4096;
        let byte: u8 = log.read_obj(GuestAddress(page / 8)).expect("log byte");
        byte & (1 << (page % 8)) != 0
    }

    /// Clear the whole log.
    pub fn clear_log(log: &GuestMemoryMmap<()>) {
        let r = log.find_region(GuestAddress(0)).expect("log region");
        log.write_slice(&vec![0u8; r.len() as usize], GuestAddress(0))
            .expect("clear log");
    }

    /// Truncate the guest memory file to `len` bytes under every mapping of it (a hostile
    /// frontend; QEMU seals its memfds against this). This process's own view of guest memory
    /// beyond `len` is gone too: touching it raises SIGBUS here.
    pub fn truncate_guest_memory(&self, len: u64) {
        self.mem_file.set_len(len).expect("truncate guest memory");
    }

    /// Write bytes into guest memory.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("write guest");
    }

    /// Read bytes from guest memory.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("read guest");
        v
    }
}
