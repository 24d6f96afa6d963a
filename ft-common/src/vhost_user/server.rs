// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The listener and connection loop.
//!
//! One frontend is served at a time. When it goes away (EOF, socket error) every ring is
//! stopped through the workers (the device drains or cancels; unfinished requests stay marked
//! in the inflight region), and the next frontend is accepted on the same listener with fresh
//! protocol state; device and workers live on.
//!
//! Each message (header, body, fds) is received here in full and validated before the vhost
//! crate sees it; vhost parses it from one end of a socketpair we feed, and its replies are
//! forwarded back. Owning reception fixes what the vhost crate gets wrong for us:
//! - SET_VRING_ENABLE is rejected by vhost unless PROTOCOL_FEATURES was acked, but QEMU 7.2
//!   sends it before SET_FEATURES; we handle it ourselves at any time.
//! - SEND_RARP is not handled by vhost at all; we pass the MAC to the device.
//! - A header vhost would reject (unknown request, bad version, reserved flags, fds on a
//!   message that takes none) makes vhost return without reading the body, desynchronising
//!   the stream; we drop such a message whole, NACK it if a reply was asked for, log it and
//!   go on. A body larger than the protocol maximum ends the connection (cannot resync).
//!
//! After vhost handled a message, its error is classified: socket errors end the connection;
//! handler errors were already NACKed by vhost (REPLY_ACK) and are logged; validation errors
//! vhost returned before replying are NACKed here, except for messages whose reply carries a
//! payload we cannot forge (GET_*), where the connection is closed rather than leaving the
//! frontend waiting forever.
//!
//! Stopping: [`ServerStop::stop`] (or a signal registered with [`ServerStop::on_signals`])
//! makes `run` drain the current connection, stop the workers and return.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{FrontendReq, MAX_MSG_SIZE};
use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::device::{DeviceOps, VhostUserDevice};
use super::handler::{ConnHandler, Shared};
use super::memory::DirtyLog;
use super::replay::ReplayStore;
use super::sigbus;
use super::worker::{self, Command, WorkerHandle};
use crate::unix_socket::{bind_listening, SocketFile};
use std::marker::PhantomData;

const HDR_SIZE: usize = 12;
/// Most fds a message carries (vhost's MAX_ATTACHED_FD_ENTRIES).
const MAX_FDS: usize = 32;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const FLAG_RESERVED: u32 = !0xf;
/// How long a reply may wait for the frontend to make room in its socket buffer.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Makes a running server return from [`VhostUserServer::run`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ServerStop {
    evt: Arc<EventFd>,
}

/// Eventfd written by the signal handler (async-signal-safe: one write(2)).
static SIGNAL_STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = SIGNAL_STOP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) of 8 bytes from a live local to an eventfd.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

impl ServerStop {
    /// Ask the server to stop.
    pub fn stop(&self) {
        let _ = self.evt.write(1);
    }

    /// Stop the server when one of `signals` (e.g. SIGINT, SIGTERM) arrives. One server per
    /// process can be signal-stopped.
    pub fn on_signals(&self, signals: &[libc::c_int]) -> std::io::Result<()> {
        SIGNAL_STOP_FD.store(self.evt.as_raw_fd(), Ordering::Relaxed);
        for &s in signals {
            vmm_sys_util::signal::register_signal_handler(s, on_stop_signal)
                .map_err(|e| std::io::Error::other(format!("signal {s}: {e}")))?;
        }
        Ok(())
    }
}

/// A vhost-user server for one device on one socket.
pub struct VhostUserServer<D: VhostUserDevice> {
    shared: Arc<Shared>,
    /// The typed message handles of the workers, for control threads.
    handles: Vec<WorkerHandle<D::Worker>>,
    _device: PhantomData<fn() -> D>,
    listener: Listener,
    /// Removes the socket file when the server goes.
    _socket_file: SocketFile,
    threads: Vec<JoinHandle<()>>,
    stop: ServerStop,
}

impl<D: VhostUserDevice> VhostUserServer<D> {
    /// Listen on `socket` (an existing file there is replaced) and start one worker per queue
    /// group of `device`.
    pub fn new(device: Arc<D>, socket: &Path) -> std::io::Result<Self> {
        let n = device.num_queues();
        let groups = device.queue_groups();
        let mut queue_group = vec![usize::MAX; n];
        for (g, qs) in groups.iter().enumerate() {
            for &q in qs {
                let slot = queue_group.get_mut(q as usize).ok_or_else(|| {
                    std::io::Error::other(format!("queue group {g} names queue {q} >= {n}"))
                })?;
                if *slot != usize::MAX {
                    return Err(std::io::Error::other(format!("queue {q} in two groups")));
                }
                *slot = g;
            }
        }
        if let Some(q) = queue_group.iter().position(|&g| g == usize::MAX) {
            return Err(std::io::Error::other(format!("queue {q} is in no group")));
        }
        // A frontend shrinking a file it shared must cost its connection, not this process.
        sigbus::install()?;
        let log = Arc::new(DirtyLog::default());
        let mut workers = Vec::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (g, qs) in groups.iter().enumerate() {
            let w = device.create_worker(g, qs)?;
            let (c, h, t) = worker::spawn(g, w, log.clone())?;
            workers.push(c);
            handles.push(h);
            threads.push(t);
        }
        let device: Arc<dyn DeviceOps> = device;
        let listen_error = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("listen on {}: {e}", socket.display()))
        };
        match std::fs::remove_file(socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(listen_error(e)),
            _ => {}
        }
        // The socket file appears only once it listens: a VMM started when it appears connects.
        let listener = bind_listening(socket, 0o600).map_err(listen_error)?;
        let socket_file = SocketFile::new(socket).map_err(listen_error)?;
        let listener = Listener::from(listener);
        Ok(VhostUserServer {
            shared: Arc::new(Shared {
                replay: ReplayStore::new(n),
                device,
                workers,
                queue_group,
                log,
            }),
            handles,
            _device: PhantomData,
            listener,
            _socket_file: socket_file,
            threads,
            stop: ServerStop {
                evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            },
        })
    }

    /// Handles to the worker of each queue group (index = group), for control threads.
    pub fn worker_handles(&self) -> Vec<WorkerHandle<D::Worker>> {
        self.handles.clone()
    }

    /// Where replay records for a VM restored from a checkpoint go (`--replay FILE`, or a
    /// control request before the guest runs); see `replay.rs`.
    pub fn replay_store(&self) -> ReplayStore {
        self.shared.replay.clone()
    }

    /// Handle that stops [`run`](Self::run).
    pub fn stop_handle(&self) -> ServerStop {
        self.stop.clone()
    }

    /// Serve frontends one after another until stopped.
    pub fn run(mut self) -> std::io::Result<()> {
        let res = self.serve_all();
        for w in &self.shared.workers {
            let _ = w.command(Command::Shutdown);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        res
    }

    fn serve_all(&mut self) -> std::io::Result<()> {
        let stop_fd = self.stop.evt.as_raw_fd();
        loop {
            if wait_readable(self.listener.as_raw_fd(), stop_fd)? {
                info!("vhost-user: stop requested");
                return Ok(());
            }
            let stream = match self.listener.accept() {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    warn!("vhost-user: accept: {e}");
                    continue;
                }
            };
            info!("vhost-user: frontend connected");
            let stopped = self.serve(stream)?;
            info!("vhost-user: frontend gone; waiting for the next one");
            if stopped {
                return Ok(());
            }
        }
    }

    /// Serve one already connected frontend until it goes away (fuzzing and tests drive the
    /// server through a socketpair with this).
    #[doc(hidden)]
    pub fn serve_stream(&mut self, sock: UnixStream) -> std::io::Result<()> {
        self.serve(sock).map(|_| ())
    }

    /// Serve one connection; returns true if a stop was requested meanwhile.
    fn serve(&mut self, mut sock: UnixStream) -> std::io::Result<bool> {
        let conn = Arc::new(Mutex::new(ConnHandler::new(self.shared.clone())?));
        // A frontend that never reads its replies must not block this thread (and with it
        // SIGTERM) for good once the socket buffer is full: give up on it after a while.
        sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
        // vhost parses messages from one end of a socketpair we feed whole, validated
        // messages into; its replies come back on the other end and are forwarded.
        let (pair, theirs) = UnixStream::pair()?;
        pair.set_nonblocking(true)?;
        let theirs_probe = theirs.try_clone()?;
        let mut req = BackendReqHandler::from_stream(theirs, conn.clone());
        let stop_fd = self.stop.evt.as_raw_fd();
        let conn_id = lock(&conn).conn_id();
        let broken = sigbus::Watch::new(conn_id)?;
        let mut stopped = false;
        loop {
            match wait_readable_or(sock.as_raw_fd(), &[stop_fd, broken.fd()]) {
                Ok(Some(0)) => {
                    stopped = true;
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    error!("vhost-user: poll: {e}");
                    break;
                }
            }
            if let Some(addr) = conn_id.fault() {
                memory_broken(addr);
                break;
            }
            let msg = match recv_message(&mut sock, stop_fd) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    // Stop requested while the frontend sat in the middle of a message.
                    stopped = true;
                    break;
                }
                Err(e) => {
                    warn!("vhost-user: receive: {e}; closing");
                    break;
                }
            };
            let mut io = ConnIo {
                sock: &mut sock,
                pair: &pair,
                theirs: &theirs_probe,
            };
            match self.dispatch(&conn, &mut req, &mut io, msg) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    warn!("vhost-user: connection error: {e}");
                    break;
                }
            }
            // The message itself may have touched memory the frontend had shrunk.
            if let Some(addr) = conn_id.fault() {
                memory_broken(addr);
                break;
            }
        }
        lock(&conn).close();
        Ok(stopped)
    }

    /// Handle one message; Ok(false) ends the connection.
    fn dispatch(
        &self,
        conn: &Arc<Mutex<ConnHandler>>,
        req: &mut BackendReqHandler<Mutex<ConnHandler>>,
        io: &mut ConnIo<'_>,
        msg: Message,
    ) -> std::io::Result<bool> {
        let hdr = msg.hdr;
        let code = FrontendReq::try_from(hdr.request).ok();
        debug!(
            "vhost-user: <- {} flags {:#x} size {} fds {}",
            code.map_or_else(|| hdr.request.to_string(), |c| format!("{c:?}")),
            hdr.flags,
            hdr.size,
            msg.fds.len()
        );
        let need_reply = hdr.flags & FLAG_NEED_REPLY != 0;
        let ack = |sock: &mut UnixStream, ok: bool| -> std::io::Result<()> {
            if need_reply && lock(conn).reply_ack() {
                send_reply(sock, hdr.request, &u64::from(!ok).to_le_bytes())?;
            }
            Ok(())
        };
        let bad_header = code.is_none()
            || hdr.flags & 0x3 != FLAG_VERSION_1
            || hdr.flags & (FLAG_REPLY | FLAG_RESERVED) != 0;
        if bad_header || (!msg.fds.is_empty() && !takes_fds(code)) {
            crate::guest_warn!(
                "vhost-user: malformed message dropped: request {} flags {:#x} size {} fds {}",
                hdr.request,
                hdr.flags,
                hdr.size,
                msg.fds.len()
            );
            ack(io.sock, false)?;
            return Ok(true);
        }
        match code {
            Some(FrontendReq::SET_VRING_ENABLE) => {
                let body = &msg.body;
                let res = if body.len() != 8 {
                    Err(format!("SET_VRING_ENABLE with {}-byte body", body.len()))
                } else {
                    let index = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
                    let num = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
                    match num {
                        // The handler logs its own failures.
                        0 | 1 => lock(conn)
                            .vring_enable(index, num == 1)
                            .map_err(|_| String::new()),
                        _ => Err(format!("SET_VRING_ENABLE {index} with value {num}")),
                    }
                };
                if let Err(e) = &res {
                    if !e.is_empty() {
                        warn!("vhost-user: {e}");
                    }
                }
                let ok = match res {
                    Ok(()) => !self.report_unreported(conn, need_reply, code),
                    Err(_) => {
                        if need_reply && lock(conn).reply_ack() {
                            let _ = lock(conn).take_unreported();
                        }
                        false
                    }
                };
                ack(io.sock, ok)?;
                Ok(true)
            }
            Some(FrontendReq::SEND_RARP) => {
                let res = if msg.body.len() != 8 {
                    Err(format!("SEND_RARP with {}-byte body", msg.body.len()))
                } else {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&msg.body[..6]);
                    lock(conn).send_rarp(mac)
                };
                if let Err(e) = &res {
                    crate::guest_warn!("vhost-user: {e}");
                }
                ack(io.sock, res.is_ok())?;
                Ok(true)
            }
            _ => {
                let fds: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
                send_all(io.pair, &msg.raw, &fds)?;
                drop(msg.fds);
                let res = req.handle_request();
                // A ring failure from an earlier message that asked for no reply turns this
                // message's acknowledgement into a NACK.
                let nack = res.is_ok() && self.report_unreported(conn, need_reply, code);
                if res.is_err() && need_reply && lock(conn).reply_ack() {
                    let _ = lock(conn).take_unreported();
                }
                io.forward_replies(nack)?;
                io.discard_leftover();
                match res {
                    Ok(()) => Ok(true),
                    Err(e) => self.after_error(conn, io.sock, hdr, code, e),
                }
            }
        }
    }

    /// If this message gets a plain REPLY_ACK and a ring failure is still unreported, take it
    /// and return true: the acknowledgement must be a NACK.
    fn report_unreported(
        &self,
        conn: &Arc<Mutex<ConnHandler>>,
        need_reply: bool,
        code: Option<FrontendReq>,
    ) -> bool {
        let mut c = lock(conn);
        if !need_reply || !c.reply_ack() || code.is_some_and(has_payload_reply) {
            return false;
        }
        match c.take_unreported() {
            Some(reason) => {
                let name = code.map_or_else(String::new, |c| format!("{c:?}"));
                crate::guest_warn!("vhost-user: {name} answered with an error: {reason}");
                true
            }
            None => false,
        }
    }

    fn after_error(
        &self,
        conn: &Arc<Mutex<ConnHandler>>,
        sock: &mut UnixStream,
        hdr: RawHeader,
        code: Option<FrontendReq>,
        e: VuError,
    ) -> std::io::Result<bool> {
        let name = code.map_or_else(|| hdr.request.to_string(), |c| format!("{c:?}"));
        match e {
            VuError::Disconnected => Ok(false),
            VuError::PartialMessage
            | VuError::SocketBroken(_)
            | VuError::SocketError(_)
            | VuError::SocketRetry(_) => {
                warn!("vhost-user: {name}: {e}; closing");
                Ok(false)
            }
            VuError::ReqHandlerError(_) => {
                // The handler logged the cause; vhost already NACKed if asked to.
                match code {
                    Some(FrontendReq::GET_INFLIGHT_FD) => {
                        // "No inflight region": mmap_size 0, no fd (QEMU accepts this).
                        send_reply(sock, hdr.request, &[0u8; 24])?;
                        Ok(true)
                    }
                    Some(c) if has_payload_reply(c) => {
                        error!("vhost-user: {name} failed and has no error reply; closing");
                        Ok(false)
                    }
                    _ => Ok(true),
                }
            }
            other => {
                crate::guest_warn!("vhost-user: {name} rejected: {other}");
                if code.is_some_and(has_payload_reply) {
                    error!("vhost-user: cannot answer {name}; closing");
                    return Ok(false);
                }
                if hdr.flags & FLAG_NEED_REPLY != 0 && lock(conn).reply_ack() {
                    send_reply(sock, hdr.request, &1u64.to_le_bytes())?;
                }
                Ok(true)
            }
        }
    }
}

fn lock(conn: &Mutex<ConnHandler>) -> std::sync::MutexGuard<'_, ConnHandler> {
    conn.lock().unwrap_or_else(|e| e.into_inner())
}

/// Messages whose reply carries a payload (not a plain REPLY_ACK u64).
fn has_payload_reply(code: FrontendReq) -> bool {
    matches!(
        code,
        FrontendReq::GET_FEATURES
            | FrontendReq::GET_PROTOCOL_FEATURES
            | FrontendReq::GET_VRING_BASE
            | FrontendReq::GET_QUEUE_NUM
            | FrontendReq::GET_CONFIG
            | FrontendReq::GET_INFLIGHT_FD
            | FrontendReq::GET_MAX_MEM_SLOTS
            | FrontendReq::SET_LOG_BASE
            | FrontendReq::GET_SHARED_OBJECT
            | FrontendReq::SET_DEVICE_STATE_FD
            | FrontendReq::CHECK_DEVICE_STATE
            | FrontendReq::GET_SHMEM_CONFIG
    )
}

/// Messages that may carry fds (mirrors the vhost crate's check).
fn takes_fds(code: Option<FrontendReq>) -> bool {
    matches!(
        code,
        Some(
            FrontendReq::SET_MEM_TABLE
                | FrontendReq::SET_VRING_CALL
                | FrontendReq::SET_VRING_KICK
                | FrontendReq::SET_VRING_ERR
                | FrontendReq::SET_LOG_BASE
                | FrontendReq::SET_LOG_FD
                | FrontendReq::SET_BACKEND_REQ_FD
                | FrontendReq::SET_INFLIGHT_FD
                | FrontendReq::ADD_MEM_REG
                | FrontendReq::REM_MEM_REG
                | FrontendReq::SET_DEVICE_STATE_FD
                | FrontendReq::GPU_SET_SOCKET
        )
    )
}

#[derive(Clone, Copy, Debug)]
struct RawHeader {
    request: u32,
    flags: u32,
    size: u32,
}

/// Logs why a connection whose mappings faulted is closed (see `sigbus.rs`).
fn memory_broken(addr: usize) {
    error!(
        "vhost-user: a file the frontend shared (guest memory, inflight region or dirty log) \
         shrank under its mapping (SIGBUS at {addr:#x}, recovered): closing the connection; \
         requests over that memory are not completed"
    );
}

/// Wait until `fd` or one of `others` is readable; returns the index in `others` of one that
/// is, or None if only `fd` is.
fn wait_readable_or(fd: RawFd, others: &[RawFd]) -> std::io::Result<Option<usize>> {
    let mut fds = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }; 4];
    let n = others.len().min(3) + 1;
    for (p, &o) in fds[1..n].iter_mut().zip(others) {
        p.fd = o;
    }
    loop {
        // SAFETY: fds[..n] are valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if let Some(i) = fds[1..n].iter().position(|p| p.revents != 0) {
            return Ok(Some(i));
        }
        if fds[0].revents != 0 {
            return Ok(None);
        }
    }
}

/// Wait until `fd` is readable; returns true if `stop_fd` fired instead.
fn wait_readable(fd: RawFd, stop_fd: RawFd) -> std::io::Result<bool> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(true);
        }
        if fds[0].revents != 0 {
            return Ok(false);
        }
    }
}

/// One message as received from the frontend.
struct Message {
    hdr: RawHeader,
    /// Header and body bytes as received.
    raw: Vec<u8>,
    body: Vec<u8>,
    fds: Vec<File>,
}

/// The sockets of one connection: the frontend's, and our end of the pair vhost parses from.
struct ConnIo<'a> {
    sock: &'a mut UnixStream,
    pair: &'a UnixStream,
    theirs: &'a UnixStream,
}

impl ConnIo<'_> {
    /// Forward everything vhost wrote (replies, with their fds) to the frontend; with `nack`,
    /// a plain REPLY_ACK among them is turned into a failure.
    fn forward_replies(&mut self, nack: bool) -> std::io::Result<()> {
        let mut buf = vec![0u8; HDR_SIZE + MAX_MSG_SIZE];
        loop {
            let mut fds = [-1 as RawFd; MAX_FDS];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: iov points into buf, which outlives the call.
            let r = unsafe { self.pair.recv_with_fds(&mut iov, &mut fds) };
            let (n, nfds) = match r {
                Ok(v) => v,
                Err(e) if e.errno() == libc::EAGAIN => return Ok(()),
                Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno())),
            };
            // SAFETY: the first nfds entries are fds we now own.
            let owned: Vec<File> = fds[..nfds]
                .iter()
                .map(|&fd| unsafe { File::from_raw_fd(fd) })
                .collect();
            if n == 0 {
                return Ok(());
            }
            if nack && n == HDR_SIZE + 8 {
                buf[HDR_SIZE..n].copy_from_slice(&1u64.to_le_bytes());
            }
            let raw: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
            send_all(self.sock, &buf[..n], &raw)?;
        }
    }

    /// vhost stopped parsing mid-message (it should not, as we validate first): drop the rest
    /// so the next message starts clean.
    fn discard_leftover(&mut self) {
        let mut left: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        if unsafe { libc::ioctl(self.theirs.as_raw_fd(), libc::FIONREAD, &mut left) } == 0
            && left > 0
        {
            error!("vhost-user: {left} bytes of a message left unparsed; discarded");
            let mut junk = vec![0u8; left as usize];
            let _ = (&mut &*self.theirs).read_exact(&mut junk);
        }
    }
}

/// Fill `buf` from `sock`, waiting with `stop_fd` in the same poll: a frontend sitting in the
/// middle of a message must not keep a stop request (SIGTERM) waiting. A stop is reported as
/// `ErrorKind::Interrupted`.
fn read_exact_or_stop(
    sock: &mut UnixStream,
    buf: &mut [u8],
    stop_fd: RawFd,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        if wait_readable(sock.as_raw_fd(), stop_fd)? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "stop requested",
            ));
        }
        match sock.read(&mut buf[done..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receive one whole message (header, fds, body); None on EOF before a header.
fn recv_message(sock: &mut UnixStream, stop_fd: RawFd) -> std::io::Result<Option<Message>> {
    let mut raw = vec![0u8; HDR_SIZE];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: raw.as_mut_ptr().cast(),
        iov_len: HDR_SIZE,
    }];
    // SAFETY: iov points into raw, which outlives the call.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: the first nfds entries are fds we now own.
    let fds: Vec<File> = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    if n < HDR_SIZE {
        read_exact_or_stop(sock, &mut raw[n..], stop_fd)?;
    }
    let w = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
    let hdr = RawHeader {
        request: w(0),
        flags: w(4),
        size: w(8),
    };
    if hdr.size as usize > MAX_MSG_SIZE {
        return Err(std::io::Error::other(format!(
            "request {} with oversized body ({} bytes)",
            hdr.request, hdr.size
        )));
    }
    raw.resize(HDR_SIZE + hdr.size as usize, 0);
    read_exact_or_stop(sock, &mut raw[HDR_SIZE..], stop_fd)?;
    let body = raw[HDR_SIZE..].to_vec();
    Ok(Some(Message {
        hdr,
        raw,
        body,
        fds,
    }))
}

/// Send `data` with `fds` attached to the first chunk.
fn send_all(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let n = sock
        .send_with_fds(&[data], fds)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    if n < data.len() {
        (&mut &*sock).write_all(&data[n..])?;
    }
    Ok(())
}

fn send_reply(sock: &UnixStream, request: u32, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(HDR_SIZE + body.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    (&mut &*sock).write_all(&msg)
}
