// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Entry points for the fuzz targets in `fuzz/` (and the regression tests that replay the
//! inputs they found): whole-input functions that must never panic, hang or touch memory
//! outside what they were given.
//!
//! - [`protocol`]: a sequence of vhost-user messages (raw ones, with fds of several kinds, and
//!   well-formed setup steps with fuzzed parameters) against a real [`VhostUserServer`] with a
//!   small device whose workers pop and complete chains from fuzzed guest memory. The server
//!   and its workers live across inputs, as they live across frontends, on their own threads:
//!   an input's messages are written while the server reads them and its replies are read
//!   while it writes them (written all first, a large input filled the socket buffer and the
//!   target waited on itself; replies left unread made the server wait out its reply timeout).
//! - [`inflight_recovery`]: a fuzzed INFLIGHT_SHMFD region recovered and then driven.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::device::{QueueWorker, StopStatus, VhostUserDevice, WorkerCtx};
use super::inflight::{queue_region_size, InflightQueue, InflightRegion};
use super::server::VhostUserServer;

fn memfd(size: u64) -> Option<File> {
    // SAFETY: plain syscall with a static name.
    let fd = unsafe { libc::memfd_create(c"ft-vhost-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).ok()?;
    Some(f)
}

/// Reads fuzz input front to back; past the end everything reads as 0.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// INFLIGHT_SHMFD recovery: the input picks a ring size, a region layout and the used ring's
/// idx, fills two queues' areas, and then drives pops and completions. Recovery must return
/// distinct heads below the ring size, at most the ring size of them, or an error.
pub fn inflight_recovery(data: &[u8]) {
    let mut inp = Input(data);
    let ring = 1u16 << (inp.u8() % 10);
    let layout = ring.max(1 << (inp.u8() % 10));
    let used_idx = inp.u16();
    let size = queue_region_size(layout) * 2;
    let Some(file) = memfd(size) else { return };
    let fill = inp.bytes(size as usize).to_vec();
    let _ = file.write_at(&fill, 0);
    let asked = if inp.u8() & 1 == 0 { layout } else { ring };
    let Ok(region) = InflightRegion::open(&file, size, 0, 2, asked, super::sigbus::ConnId::next())
    else {
        return;
    };
    for q in 0..2 {
        let Some(mut iq) = InflightQueue::new(region.clone(), q, ring) else {
            continue;
        };
        if !iq.is_fresh() {
            if let Ok(heads) = iq.recover(used_idx) {
                assert!(heads.len() <= usize::from(ring), "more heads than the ring");
                let mut seen = vec![false; usize::from(ring)];
                for h in heads {
                    assert!(h < ring, "head {h} beyond ring {ring}");
                    assert!(!seen[usize::from(h)], "head {h} twice");
                    seen[usize::from(h)] = true;
                }
            }
        }
        iq.mark_in_use(used_idx);
        let mut used = used_idx;
        for _ in 0..64 {
            if inp.is_empty() {
                break;
            }
            let op = inp.u8();
            let head = inp.u16() % (ring + 4);
            match op % 5 {
                0 => iq.start(head),
                1 => iq.pre_complete(head),
                2 => {
                    used = used.wrapping_add(1);
                    iq.complete(head, used);
                }
                3 => iq.abandon(head),
                _ => {
                    // The frontend scribbles over the region while the ring runs.
                    let off = u64::from(inp.u16()) % size;
                    let _ = file.write_at(inp.bytes(16), off);
                }
            }
            let _ = iq.is_inflight(head);
        }
    }
}

/// The device the protocol target serves: two queues (one worker each), a config space,
/// workers that copy readable bytes into writable buffers and complete every chain.
struct FuzzDevice;

impl VhostUserDevice for FuzzDevice {
    type Worker = FuzzWorker;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 28) | (1 << 29)
    }
    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (offset as usize + i).min(255) as u8;
        }
    }
    fn create_worker(&self, _group: usize, _queues: &[u16]) -> std::io::Result<FuzzWorker> {
        Ok(FuzzWorker)
    }
}

struct FuzzWorker;

impl QueueWorker for FuzzWorker {
    type Msg = std::convert::Infallible;
    type Reply = std::convert::Infallible;

    fn handle_message(&mut self, _ctx: &mut WorkerCtx, msg: Self::Msg) -> Self::Reply {
        match msg {}
    }

    fn handle_kick(&mut self, ctx: &mut WorkerCtx, q: u16) {
        let mut buf = [0u8; 512];
        // Bounded like a device must be: a ring that keeps announcing work it does not yield
        // ends the loop (the ring marks itself broken).
        for _ in 0..4 {
            let Some(vr) = ctx.queue(q) else { return };
            vr.disable_notification();
            let mut n = 0;
            while let Some(chain) = vr.pop() {
                n += 1;
                let head = chain.head_index();
                let mem = chain.memory().clone();
                let mut len = 0;
                if let (Ok(mut r), Ok(mut w)) = (chain.clone().reader(&mem), chain.writer(&mem)) {
                    let got = r.read(&mut buf).unwrap_or(0);
                    len = w.write(&buf[..got]).unwrap_or(0) as u32;
                }
                let _ = vr.add_used(head, len);
                assert!(
                    n <= 1024,
                    "pop yielded more chains than the ring could hold"
                );
            }
            vr.signal_used();
            if !vr.enable_notification() {
                return;
            }
        }
    }

    fn stop_queue(&mut self, _ctx: &mut WorkerCtx, _q: u16) -> StopStatus {
        StopStatus::Done
    }
}

/// The server thread of the protocol target: one per process, serving one input's stream
/// after another (as the daemon serves one frontend after another). It serves while the
/// input's messages are still being written, so neither side waits for the other's socket
/// buffer.
struct ServerThread {
    streams: Sender<UnixStream>,
    done: Receiver<()>,
}

fn server_thread() -> &'static Mutex<ServerThread> {
    static SERVER: OnceLock<Mutex<ServerThread>> = OnceLock::new();
    SERVER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("ft-vhost-fuzz-{}.sock", std::process::id()));
        let mut server = VhostUserServer::new(Arc::new(FuzzDevice), &path).expect("fuzz server");
        let _ = std::fs::remove_file(&path);
        let (streams, rx) = channel::<UnixStream>();
        let (tx, done) = channel();
        std::thread::Builder::new()
            .name("fuzz-server".into())
            .spawn(move || {
                for s in rx {
                    let _ = server.serve_stream(s);
                    if tx.send(()).is_err() {
                        break;
                    }
                }
            })
            .expect("fuzz server thread");
        Mutex::new(ServerThread { streams, done })
    })
}

/// Waits until `sock` is writable or readable.
fn wait_io(sock: &UnixStream) {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT | libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; no timeout (the server always reads or closes).
    unsafe { libc::poll(&mut pfd, 1, -1) };
}

/// Reads and drops what the server replied (replies and the fds they carry): all there is on
/// a non-blocking socket, everything up to the server's close on a blocking one. False once
/// the server closed its end.
fn drain_replies(sock: &mut UnixStream) -> bool {
    let mut junk = [0u8; 4096];
    loop {
        match sock.read(&mut junk) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

const HDR: usize = 12;
/// Guest memory of the protocol target.
const GUEST: u64 = 0x4_0000;
/// Frontend virtual address the canned memory table uses.
const UADDR: u64 = 0x7f00_0000;

struct Builder {
    msgs: Vec<(Vec<u8>, Option<RawFd>)>,
    /// Files and eventfds kept open until the server is done with the input.
    keep: Vec<File>,
    events: Vec<EventFd>,
}

impl Builder {
    fn msg(&mut self, request: u32, flags: u32, body: &[u8], fd: Option<RawFd>) {
        let mut m = Vec::with_capacity(HDR + body.len());
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        self.msgs.push((m, fd));
    }

    fn eventfd(&mut self) -> Option<RawFd> {
        let e = EventFd::new(libc::EFD_NONBLOCK).ok()?;
        let fd = e.as_raw_fd();
        self.events.push(e);
        Some(fd)
    }

    /// An fd of the kind `spec` names (none, guest memory, eventfd, pipe, empty memfd, small
    /// memfd).
    fn fd(&mut self, spec: u8, guest: &File) -> Option<RawFd> {
        match spec % 6 {
            0 => None,
            1 => Some(guest.as_raw_fd()),
            2 => self.eventfd(),
            3 => {
                let mut p = [0; 2];
                // SAFETY: pipe(2) into a local array.
                if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                    return None;
                }
                // SAFETY: both fds are fresh and ours.
                self.keep.push(unsafe { File::from_raw_fd(p[1]) });
                // SAFETY: as above.
                self.keep.push(unsafe { File::from_raw_fd(p[0]) });
                Some(p[0])
            }
            4 => {
                let f = memfd(0)?;
                let fd = f.as_raw_fd();
                self.keep.push(f);
                Some(fd)
            }
            _ => {
                let f = memfd(4096)?;
                let fd = f.as_raw_fd();
                self.keep.push(f);
                Some(fd)
            }
        }
    }
}

const V1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

/// vhost-user message decoder and handler: see the module docs. Input: a sequence of records,
/// each an opcode byte and its parameters (raw message, canned setup steps, guest memory
/// writes). All messages are written to a socketpair, which is then closed, and the server
/// serves that "frontend" to the end on this thread; its workers process rings meanwhile.
pub fn protocol(data: &[u8]) {
    let Some(guest) = memfd(GUEST) else { return };
    let mut inp = Input(data);
    let mut b = Builder {
        msgs: Vec::new(),
        keep: Vec::new(),
        events: Vec::new(),
    };
    let mut count = 0;
    while !inp.is_empty() && count < 64 {
        count += 1;
        let op = inp.u8();
        let reply = if op & 0x80 != 0 { NEED_REPLY } else { 0 };
        match op % 8 {
            0 => {
                // A raw message: any request code, flags mostly valid, any body, an fd.
                let request = u32::from(inp.u8() % 48);
                let flags = if op & 0x40 != 0 {
                    inp.u32()
                } else {
                    V1 | reply
                };
                let n = usize::from(inp.u8());
                let body = inp.bytes(n).to_vec();
                let fd = b.fd(inp.u8(), &guest);
                b.msg(request, flags, &body, fd);
                if op & 0x20 != 0 {
                    // A header that lies about its body size.
                    if let Some((m, _)) = b.msgs.last_mut() {
                        m[8..12].copy_from_slice(&u32::from(inp.u16()).to_le_bytes());
                    }
                }
            }
            1 => {
                // SET_MEM_TABLE: one region over the guest memfd, size and offset fuzzed.
                let gpa = 0x1_0000 * u64::from(inp.u8() % 4 + 1);
                let size = match inp.u8() % 4 {
                    0 => GUEST * 2,
                    1 => u64::from(inp.u16()) << 4,
                    _ => GUEST,
                };
                let offset = u64::from(inp.u8() % 2) * 0x1000;
                let mut body = Vec::new();
                body.extend_from_slice(&1u32.to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                for v in [gpa, size, UADDR, offset] {
                    body.extend_from_slice(&v.to_le_bytes());
                }
                b.msg(5, V1 | reply, &body, Some(guest.as_raw_fd()));
            }
            2 => {
                // Vring setup of queue q: NUM, ADDR, BASE, CALL, KICK, ERR, ENABLE.
                let q = u32::from(inp.u8() % 3);
                let num = 1u32 << (inp.u8() % 10);
                let state = |i: u32, v: u32| [i.to_le_bytes(), v.to_le_bytes()].concat();
                b.msg(8, V1 | reply, &state(q, num), None);
                let mut addr = Vec::new();
                addr.extend_from_slice(&q.to_le_bytes());
                addr.extend_from_slice(&0u32.to_le_bytes());
                for _ in 0..3 {
                    let off = u64::from(inp.u16()) * 16 % GUEST;
                    addr.extend_from_slice(&(UADDR + off).to_le_bytes());
                }
                addr.extend_from_slice(&0u64.to_le_bytes());
                b.msg(9, V1 | reply, &addr, None);
                b.msg(10, V1 | reply, &state(q, u32::from(inp.u16())), None);
                let idx = u64::from(q);
                let call = b.eventfd();
                b.msg(13, V1 | reply, &idx.to_le_bytes(), call);
                let err = b.eventfd();
                b.msg(14, V1 | reply, &idx.to_le_bytes(), err);
                let kick = b.eventfd();
                b.msg(12, V1 | reply, &idx.to_le_bytes(), kick);
                b.msg(18, V1 | reply, &state(q, 1), None);
            }
            3 => {
                // Guest writes its rings and buffers.
                let off = u64::from(inp.u16()) * 4 % GUEST;
                let n = usize::from(inp.u8());
                let _ = guest.write_at(inp.bytes(n), off);
            }
            4 => {
                // Handshake: features (fuzzed subset of what is offered), protocol features.
                b.msg(3, V1, &[], None); // SET_OWNER
                let f = (1u64 << 32) | (1 << 28) | (1 << 29) | (1 << 30) | (1 << 26);
                let mask = u64::from(inp.u8()) << 26;
                b.msg(2, V1 | reply, &(f & !mask | (f & mask)).to_le_bytes(), None);
                let p = u64::from(inp.u16()) | 0x1 | 0x8;
                b.msg(16, V1 | reply, &p.to_le_bytes(), None);
            }
            5 => {
                // GET_INFLIGHT_FD or SET_INFLIGHT_FD with fuzzed sizes.
                let nq = inp.u16() % 4;
                let qs = 1u16 << (inp.u8() % 10);
                let mut body = Vec::new();
                let size = u64::from(inp.u16()) * 64;
                body.extend_from_slice(&size.to_le_bytes());
                body.extend_from_slice(&0u64.to_le_bytes());
                body.extend_from_slice(&nq.to_le_bytes());
                body.extend_from_slice(&qs.to_le_bytes());
                if op & 0x40 != 0 {
                    let fd = b.fd(inp.u8(), &guest);
                    b.msg(32, V1 | reply, &body, fd);
                } else {
                    b.msg(31, V1, &body, None);
                }
            }
            6 => {
                // GET_VRING_BASE (stops the ring) or SET_VRING_ENABLE 0/1.
                let q = u32::from(inp.u8() % 3);
                let state = [q.to_le_bytes(), u32::from(inp.u8() % 2).to_le_bytes()].concat();
                if op & 0x40 != 0 {
                    b.msg(18, V1 | reply, &state, None);
                } else {
                    b.msg(11, V1, &state, None);
                }
            }
            _ => {
                // SET_LOG_BASE over a fuzzed fd, or kick a ring.
                if op & 0x40 != 0 {
                    let mut body = Vec::new();
                    body.extend_from_slice(&(u64::from(inp.u16()) * 8).to_le_bytes());
                    body.extend_from_slice(&0u64.to_le_bytes());
                    let fd = b.fd(inp.u8(), &guest);
                    b.msg(6, V1, &body, fd);
                } else if let Some(e) = b.events.last() {
                    let _ = e.write(1);
                }
            }
        }
    }
    let Ok((mut ours, theirs)) = UnixStream::pair() else {
        return;
    };
    if ours.set_nonblocking(true).is_err() {
        return;
    }
    let srv = server_thread().lock().unwrap_or_else(|e| e.into_inner());
    if srv.streams.send(theirs).is_err() {
        return;
    }
    // Written while the server reads; replies are read meanwhile so its writes never wait.
    'msgs: for (m, fd) in &b.msgs {
        let fds: Vec<RawFd> = fd.iter().copied().collect();
        let mut sent = 0;
        while sent < m.len() {
            let fds = if sent == 0 { &fds[..] } else { &[][..] };
            match ours.send_with_fds(&[&m[sent..]], fds) {
                Ok(n) => sent += n,
                Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => {
                    if !drain_replies(&mut ours) {
                        break 'msgs;
                    }
                    wait_io(&ours);
                }
                // The server closed the connection (it may, on a bad message).
                Err(_) => break 'msgs,
            }
        }
    }
    let _ = ours.shutdown(std::net::Shutdown::Write);
    // Until the server is done with the input (it closes its end): its files stay open.
    let _ = ours.set_nonblocking(false);
    drain_replies(&mut ours);
    let _ = srv.done.recv();
    drop(srv);
    drop(b);
}
