// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Daemon side of the control socket: one thread that serves the coordinator's connection (and
//! up to [`MAX_CONNECTIONS`] in all, see there why), hands each request to a [`ControlHandler`]
//! and writes its reply, and forwards `OUTPUT_PENDING` notifications raised by the queue threads
//! through a [`Notifier`] to every connection.
//!
//! Invariants:
//! - The handler runs on the control thread only, one request at a time.
//! - Replies go out in request order, one per request; notifications are whole frames between
//!   replies (only the control thread writes to the sockets).
//! - A queue thread never blocks on the socket: [`Notifier::output_pending`] is one atomic
//!   `fetch_max` plus, at most once per new epoch, a non-blocking eventfd write. Notifications
//!   coalesce: only the newest epoch not yet announced is sent.
//! - A malformed frame gets an `ERROR` reply; if frame sync is lost (oversized length) the
//!   connection is closed after that reply and the next connection is accepted.
//! - No peer can stall the control thread or lock out a new coordinator: sockets are
//!   non-blocking and output is buffered per connection (bounded; a peer that reads none of it
//!   for the write timeout is dropped, and its further requests are not read meanwhile); a frame
//!   must complete within the frame timeout; the listener is always polled, and with every slot
//!   taken a new connection evicts the one that has gone longest without a request.
//! - Requests whose generation or epoch exceeds [`MAX_REQUEST_NUMBER`] are refused
//!   (`MALFORMED`) before the handler sees them.
//! - The socket file is mode 0600, only peers with our uid (or root) are served, and the file is
//!   unlinked on shutdown if it is still ours.

use super::codec::{encode_into, FrameDecoder, HEADER_LEN, MAX_FRAME_LEN};
#[cfg(doc)]
use super::message::MAX_REQUEST_NUMBER;
use super::message::{ErrorCode, Notification, Reply, Request};
use crate::epoch::Epoch;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long output may stay pending with the peer reading none of it before the connection is
/// closed. Writes never block the control thread; this only bounds how long a connection that
/// does not read keeps its slot and its buffered output.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a frame may take from its first byte to its last before the connection is closed
/// (a peer that stops mid-frame). Idle connections between frames have no timeout: when all
/// slots are taken, a new connection evicts the stalest one instead (see `ServeLoop::accept`).
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; a further one evicts the stalest (see `ServeLoop::accept`).
///
/// More than one because fencing must not depend on the deposed coordinator hanging up: a new
/// coordinator connects while the old one is still attached, and its newer generation fences the
/// old one inside the handler. A second slot also lets an operator's `STATUS` query through.
/// Requests of all connections are handled one at a time on the control thread, so the handler
/// never runs concurrently with itself.
pub const MAX_CONNECTIONS: usize = 4;

/// What a daemon implements to answer control requests. Runs on the control thread.
pub trait ControlHandler: Send + Sync + 'static {
    /// Answers one request; refusals are `Reply::Error`.
    fn handle(&self, req: Request) -> Reply;
}

impl<F> ControlHandler for F
where
    F: Fn(Request) -> Reply + Send + Sync + 'static,
{
    fn handle(&self, req: Request) -> Reply {
        self(req)
    }
}

/// State shared by the control thread, its stop handle and every notifier.
#[derive(Debug)]
struct Shared {
    /// Newest epoch reported as having pending output (0 = none; epochs start at 1).
    pending: AtomicU64,
    stop: AtomicBool,
    /// Wakes the control thread for a notification or a stop.
    wake: EventFd,
}

impl Shared {
    fn wake(&self) {
        // A non-blocking eventfd write fails only if the counter would overflow, and then the
        // control thread is already due to wake up.
        let _ = self.wake.write(1);
    }
}

/// Cheap, cloneable handle for queue threads to raise notifications. Never blocks.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    shared: Option<Arc<Shared>>,
}

impl Notifier {
    /// A notifier that drops everything, for daemons run without a control socket.
    pub fn disabled() -> Notifier {
        Notifier { shared: None }
    }

    /// The first held request landed in empty epoch `epoch`.
    pub fn output_pending(&self, epoch: Epoch) {
        if let Some(s) = &self.shared {
            if s.pending.fetch_max(epoch.0, Ordering::AcqRel) < epoch.0 {
                s.wake();
            }
        }
    }

    /// Raises any notification.
    pub fn notify(&self, n: Notification) {
        match n {
            Notification::OutputPending { epoch } => self.output_pending(epoch),
        }
    }
}

/// The socket file and its listener; unlinks the file on drop if it is still the one we bound.
#[derive(Debug)]
struct Bound {
    listener: UnixListener,
    path: PathBuf,
    /// (dev, ino) of the socket file we created.
    id: (u64, u64),
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Ok(md) = fs::symlink_metadata(&self.path) {
            if (md.dev(), md.ino()) == self.id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// A bound, not yet serving, control socket. Bind early (to fail fast and to hand the
/// [`Notifier`] to queue threads), then [`ControlServer::spawn`] with the handler.
#[derive(Debug)]
pub struct ControlServer {
    bound: Bound,
    shared: Arc<Shared>,
    write_timeout: Duration,
    frame_timeout: Duration,
    /// Connections accepted so far.
    accepted: u64,
}

impl ControlServer {
    /// Binds `path` with mode 0600. A stale socket file (nobody listening) is replaced; a live
    /// one (`AddrInUse`) or a non-socket file (`AlreadyExists`) is left alone and refused.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<ControlServer> {
        let path = path.as_ref().to_path_buf();
        remove_stale_socket(&path)?;
        // The file appears listening and already 0600 (the peer uid check on accept stays).
        let listener = crate::unix_socket::bind_listening(&path, 0o600)?;
        listener.set_nonblocking(true)?;
        let md = fs::symlink_metadata(&path)?;
        let bound = Bound {
            listener,
            path,
            id: (md.dev(), md.ino()),
        };
        Ok(ControlServer {
            bound,
            shared: Arc::new(Shared {
                pending: AtomicU64::new(0),
                stop: AtomicBool::new(false),
                wake: EventFd::new(EFD_NONBLOCK)?,
            }),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            accepted: 0,
        })
    }

    /// The path the socket is bound to.
    pub fn path(&self) -> &Path {
        &self.bound.path
    }

    /// A notifier feeding this server's connections.
    pub fn notifier(&self) -> Notifier {
        Notifier {
            shared: Some(self.shared.clone()),
        }
    }

    /// How long output may stay pending, none of it read, before the connection is dropped.
    pub fn set_write_timeout(&mut self, t: Duration) {
        self.write_timeout = t;
    }

    /// How long a started frame may take to complete before the connection is dropped.
    pub fn set_frame_timeout(&mut self, t: Duration) {
        self.frame_timeout = t;
    }

    /// Starts the control thread.
    pub fn spawn<H: ControlHandler>(self, handler: H) -> io::Result<ControlServerHandle> {
        let path = self.bound.path.clone();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("ft-control".into())
            .spawn(move || {
                let mut lp = ServeLoop {
                    server: self,
                    handler,
                    conns: Vec::new(),
                    last_notified: 0,
                };
                lp.run();
            })?;
        Ok(ControlServerHandle {
            shared,
            path,
            thread: Some(thread),
        })
    }
}

/// A running control server. Dropping it stops the thread and unlinks the socket.
#[derive(Debug)]
pub struct ControlServerHandle {
    shared: Arc<Shared>,
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl ControlServerHandle {
    /// The path the socket is bound to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A notifier feeding this server's connections.
    pub fn notifier(&self) -> Notifier {
        Notifier {
            shared: Some(self.shared.clone()),
        }
    }

    /// Stops serving, closes the connections, unlinks the socket, and waits for the thread.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("control thread for {} panicked", self.path.display());
            }
        }
    }
}

impl Drop for ControlServerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !md.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is served by a live process", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale control socket {}", path.display());
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(e),
    }
}

/// Uid of the process on the other end of `s`.
fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    // SAFETY: ucred is plain data; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid fd, valid out pointer and length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Bytes of unsent output a connection may accumulate (two maximal frames: a reply plus
/// notifications) before it is dropped as not reading.
const MAX_PENDING_OUTPUT: usize = 2 * (HEADER_LEN + MAX_FRAME_LEN);

struct Connection {
    /// Sequence number, for logs.
    id: u64,
    stream: UnixStream,
    decoder: FrameDecoder,
    /// Encoded frames not yet written; `out[sent..]` is pending. Requests of a connection with
    /// pending output are not read (backpressure on a peer that does not read its replies).
    out: Vec<u8>,
    sent: usize,
    /// Last time the peer sent a complete request (or connected): eviction order.
    last_request: Instant,
    /// Whether the peer ever had a request answered, and its last fenced command was not
    /// refused as `FENCED`: idle strangers and deposed coordinators are evicted first.
    served: bool,
    /// When the first byte of the frame now being received arrived.
    frame_started: Option<Instant>,
    /// Since when output has been pending without the peer taking any of it.
    stalled_since: Option<Instant>,
    /// Why the connection is to be closed at the end of this loop iteration.
    dead: Option<String>,
}

impl Connection {
    fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Encodes one message behind the pending output (an unencodable reply becomes an error
    /// reply) and writes what the socket takes now, never blocking.
    fn send<T: serde::Serialize>(&mut self, msg: &T) -> io::Result<()> {
        if let Err(e) = encode_into(msg, &mut self.out, MAX_FRAME_LEN) {
            let code = e.error_code().unwrap_or(ErrorCode::Internal);
            log::error!("control reply not sent: {e}");
            encode_into(
                &Reply::error(code, format!("reply not encodable: {e}")),
                &mut self.out,
                MAX_FRAME_LEN,
            )
            .map_err(io::Error::other)?;
        }
        if self.pending() > MAX_PENDING_OUTPUT {
            return Err(io::Error::other(format!(
                "peer does not read: {} bytes of output pending",
                self.pending()
            )));
        }
        self.flush(Instant::now())
    }

    /// Writes pending output until the socket would block (`MSG_NOSIGNAL`: a coordinator that
    /// hung up must not kill the daemon with SIGPIPE, whatever the program did with it).
    fn flush(&mut self, now: Instant) -> io::Result<()> {
        let before = self.sent;
        while self.sent < self.out.len() {
            let buf = &self.out[self.sent..];
            // SAFETY: buf is a valid readable slice for its length; the fd is open.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            // 0 < n <= buf.len() here.
            self.sent += n as usize;
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
            self.stalled_since = None;
        } else if self.sent != before || self.stalled_since.is_none() {
            self.stalled_since = Some(now);
        }
        Ok(())
    }

    /// The instant at which this connection times out, if a timer runs for it.
    fn deadline(&self, frame_timeout: Duration, write_timeout: Duration) -> Option<Instant> {
        let frame = self.frame_started.map(|t| t + frame_timeout);
        let write = self.stalled_since.map(|t| t + write_timeout);
        match (frame, write) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

struct ServeLoop<H> {
    server: ControlServer,
    handler: H,
    conns: Vec<Connection>,
    /// Newest epoch for which OUTPUT_PENDING was sent or dropped (no coordinator connected).
    last_notified: u64,
}

impl<H: ControlHandler> ServeLoop<H> {
    fn run(&mut self) {
        let path = self.server.bound.path.display().to_string();
        log::info!("control socket {path} serving");
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(MAX_CONNECTIONS + 2);
        loop {
            // [wake, connections..., listener]. The listener is always polled: a new
            // coordinator must never wait behind stale connections (see `accept`).
            // Connections are only marked dead during an iteration and swept at its end, so
            // `fds[1 + i]` stays `conns[i]` throughout.
            let n = self.conns.len();
            fds.clear();
            let pfd = |fd, events| libc::pollfd {
                fd,
                events,
                revents: 0,
            };
            fds.push(pfd(self.server.shared.wake.as_raw_fd(), libc::POLLIN));
            fds.extend(self.conns.iter().map(|c| {
                // Output pending: wait until the peer takes it before reading more requests.
                let ev = if c.pending() > 0 {
                    libc::POLLOUT
                } else {
                    libc::POLLIN
                };
                pfd(c.stream.as_raw_fd(), ev)
            }));
            fds.push(pfd(self.server.bound.listener.as_raw_fd(), libc::POLLIN));
            let (ft, wt) = (self.server.frame_timeout, self.server.write_timeout);
            let timeout = self
                .conns
                .iter()
                .filter_map(|c| c.deadline(ft, wt))
                .min()
                .map_or(-1, |d| {
                    let ms = d.saturating_duration_since(Instant::now()).as_millis();
                    // Round up so the deadline has passed when poll returns.
                    ms.saturating_add(1).min(i32::MAX as u128) as i32
                });
            // SAFETY: fds is a valid, exclusively borrowed array of fds.len() pollfd.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("control socket {path}: poll failed: {e}; stopping");
                break;
            }
            if fds[0].revents != 0 {
                let _ = self.server.shared.wake.read();
                if self.server.shared.stop.load(Ordering::Acquire) {
                    break;
                }
                self.flush_notification();
            }
            let now = Instant::now();
            for (i, pfd) in fds[1..1 + n].iter().enumerate() {
                let conn = &mut self.conns[i];
                if conn.dead.is_some() {
                    continue;
                }
                let result = if pfd.revents & libc::POLLOUT != 0 {
                    // Output drained: answer the requests that waited for it.
                    conn.flush(now)
                        .map_err(|e| format!("write: {e}"))
                        .and_then(|()| match conn.pending() {
                            0 => serve_buffered(&self.handler, conn),
                            _ => Ok(()),
                        })
                } else if pfd.revents & libc::POLLIN != 0 {
                    serve_readable(&self.handler, conn)
                } else if pfd.revents != 0 {
                    // POLLHUP / POLLERR while output was pending: nobody will read it.
                    Err("peer hung up with output unread".into())
                } else {
                    Ok(())
                };
                if let Err(why) = result {
                    conn.dead = Some(why);
                }
            }
            for conn in self.conns.iter_mut().filter(|c| c.dead.is_none()) {
                if conn.frame_started.is_some_and(|t| now >= t + ft) {
                    conn.dead = Some(format!(
                        "frame not completed within {ft:?} ({} bytes received)",
                        conn.decoder.buffered()
                    ));
                } else if conn.stalled_since.is_some_and(|t| now >= t + wt) {
                    conn.dead = Some(format!(
                        "peer took none of {} bytes of output within {wt:?}",
                        conn.pending()
                    ));
                }
            }
            self.sweep();
            if fds[1 + n].revents != 0 {
                self.accept();
            }
        }
        log::info!("control socket {path} stopped");
    }

    fn sweep(&mut self) {
        self.conns.retain(|c| match &c.dead {
            Some(why) => {
                log::info!("control connection {} closed: {why}", c.id);
                false
            }
            None => true,
        });
    }

    /// Accepts one connection. With every slot taken, the connection that has gone longest
    /// without a request is closed to make room, preferring ones that never had a request
    /// answered or whose last fenced command was refused as `FENCED`: a new coordinator must get in even if stale peers (a hung operator tool, a
    /// deposed coordinator, half-written frames) hold every slot, and a live coordinator sends
    /// requests every checkpoint, so it is never the one chosen while a stale one exists.
    fn accept(&mut self) {
        let stream = match self.server.bound.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                log::warn!("control accept: {e}");
                return;
            }
        };
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        match peer_uid(&stream) {
            Ok(uid) if uid == me || uid == 0 => {}
            Ok(uid) => {
                log::warn!("control connection from uid {uid} refused");
                return;
            }
            Err(e) => {
                log::warn!("control connection: cannot read peer credentials: {e}");
                return;
            }
        }
        // Non-blocking: reads happen after poll reports data, writes never wait.
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("control connection setup: {e}");
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            if let Some(victim) = self
                .conns
                .iter_mut()
                .min_by_key(|c| (c.served, c.last_request))
            {
                victim.dead = Some(format!(
                    "evicted for a new connection (all {MAX_CONNECTIONS} slots taken; idle {:?})",
                    victim.last_request.elapsed()
                ));
            }
            self.sweep();
        }
        self.server.accepted += 1;
        let id = self.server.accepted;
        log::info!("control connection {id} accepted");
        self.conns.push(Connection {
            id,
            stream,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            sent: 0,
            last_request: Instant::now(),
            served: false,
            frame_started: None,
            stalled_since: None,
            dead: None,
        });
    }

    fn flush_notification(&mut self) {
        let pending = self.server.shared.pending.load(Ordering::Acquire);
        if pending <= self.last_notified {
            return;
        }
        self.last_notified = pending;
        // With nobody connected the notification is dropped; a coordinator that connects later
        // reads STATUS instead.
        let n = Notification::OutputPending {
            epoch: Epoch(pending),
        };
        for c in self.conns.iter_mut().filter(|c| c.dead.is_none()) {
            if let Err(e) = c.send(&n) {
                c.dead = Some(format!("notification write: {e}"));
            }
        }
    }
}

/// Reads what is available on `conn` and answers the complete requests in it. `Err` carries
/// the reason to close the connection.
fn serve_readable<H: ControlHandler>(handler: &H, conn: &mut Connection) -> Result<(), String> {
    match conn.decoder.read_from(&mut conn.stream) {
        Ok(0) => {
            return Err(match conn.decoder.finish() {
                Ok(()) => "end of stream".to_string(),
                Err(e) => e.to_string(),
            })
        }
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            return Ok(())
        }
        Err(e) => return Err(e.to_string()),
    }
    serve_buffered(handler, conn)
}

/// Answers every complete request already received, stopping while output is pending (the
/// rest waits in the decoder until the peer reads). Runs the frame timer of a partial frame.
fn serve_buffered<H: ControlHandler>(handler: &H, conn: &mut Connection) -> Result<(), String> {
    let now = Instant::now();
    let mut decoded = false;
    while conn.pending() == 0 {
        let reply = match conn.decoder.decode::<Request>() {
            Ok(None) => break,
            Ok(Some(req)) => {
                decoded = true;
                conn.last_request = now;
                match req.check_range() {
                    Ok(()) => {
                        let fenced_cmd = req.generation().is_some();
                        let reply = call_handler(handler, req);
                        let deposed = matches!(
                            reply,
                            Reply::Error {
                                code: ErrorCode::Fenced,
                                ..
                            }
                        );
                        if fenced_cmd || !conn.served {
                            conn.served = !deposed;
                        }
                        reply
                    }
                    Err(why) => Reply::error(ErrorCode::Malformed, why),
                }
            }
            Err(e) => {
                decoded = true;
                log::warn!("control connection {}: bad frame: {e}", conn.id);
                if let Some(code) = e.error_code() {
                    // Best effort when fatal: the connection closes anyway.
                    conn.send(&Reply::error(code, e.to_string()))
                        .map_err(|we| format!("error reply write: {we}"))?;
                }
                if e.is_fatal() {
                    return Err(e.to_string());
                }
                continue;
            }
        };
        conn.send(&reply).map_err(|e| format!("reply write: {e}"))?;
    }
    // What is left is a partial frame, unless output is pending (then whole frames may wait on
    // us, and the write timer runs instead). A partial frame must complete within the frame
    // timeout, counted from its first byte.
    if conn.decoder.buffered() == 0 || conn.pending() > 0 {
        conn.frame_started = None;
    } else if decoded || conn.frame_started.is_none() {
        conn.frame_started = Some(now);
    }
    Ok(())
}

/// Runs the handler; a panic in it becomes an `INTERNAL` error reply instead of killing the
/// control thread.
fn call_handler<H: ControlHandler>(handler: &H, req: Request) -> Reply {
    match catch_unwind(AssertUnwindSafe(|| handler.handle(req))) {
        Ok(reply) => reply,
        Err(_) => Reply::error(ErrorCode::Internal, "control handler panicked"),
    }
}
