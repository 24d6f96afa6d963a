#![allow(dead_code)]

//! A test vhost-user frontend: vhost's `Frontend` for the protocol, memfd-backed guest memory
//! shared with the backend, and a minimal split-ring driver (place descriptor chains, kick,
//! wait for used entries).
//!
//! A trimmed copy of ft-tests' `frontend.rs` from the `server` branch (not merged when this was
//! written); switch to `ft_tests::frontend` once it is.
//!
//! Guest memory is one region at [`MEM_GPA`]; queue `q`'s rings live at fixed offsets
//! ([`TestFrontend::ring_gpas`]), data buffers are handed out from [`DATA_GPA`] upwards by a
//! bump allocator ([`TestFrontend::alloc`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
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
            mem,
            mem_file,
            va_base,
            queues: Vec::new(),
            next_data: DATA_GPA,
            features: 0,
        }
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

    /// Share the guest memory (SET_MEM_TABLE).
    pub fn set_mem_table(&mut self) {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: MEM_GPA,
            memory_size: MEM_SIZE,
            userspace_addr: self.va_base,
            mmap_offset: 0,
            mmap_handle: self.mem_file.as_raw_fd(),
        };
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
        self.fe
            .set_vring_call(q, &self.queues[q].call)
            .expect("set_vring_call");
        self.fe
            .set_vring_kick(q, &self.queues[q].kick)
            .expect("set_vring_kick");
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
