// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One daemon's control connection as a non-blocking state machine, driven by the coordinator's
//! own thread ([`super::runtime`] polls every link's socket beside its mailbox). The link
//! writes the cycle's SEAL and COMMIT the moment the cycle decides them and turns the daemon's
//! replies and `OUTPUT_PENDING` notifications into cycle [`Input`]s on the same thread: no
//! thread hand-off between the state machine and the socket. It also answers operator requests
//! (STATUS, ABORT, ANNOUNCE), refreshes a `STATUS` snapshot when idle, and reconnects after the
//! daemon goes away.
//!
//! Requests are pipelined: each one written is remembered in order with its deadline, and the
//! daemon answers each exactly once, in order, so the oldest remembered request owns the next
//! reply. A request that timed out stays in that order, written off, and its late reply is
//! skipped.
//!
//! Invariants:
//! - Every SEAL/COMMIT gets exactly one answer into the cycle (`Sealed`/`SealFailed`,
//!   `Committed`/`CommitFailed`), unless the connection is lost, which is reported once as
//!   `DeviceLost` (the cycle then stops waiting for this device). Every operator request is
//!   answered, with an error when the connection is lost or the call times out.
//! - After a (re)connect the link reads `STATUS` before reporting `DeviceConnected` and before
//!   it takes any command, so the cycle learns the daemon's open epoch and never seals below it
//!   (protocol section 9).
//! - Requests are written in the order issued, so COMMITs reach the daemon in epoch order.
//! - Any framing or protocol violation by the daemon drops the connection: the link does not
//!   guess, it reconnects and re-reads `STATUS`.

use super::cycle::{DeviceId, Input};
use super::handle::{Mailbox, Msg};
use crate::control::codec::{encode_into, FrameDecoder, MAX_FRAME_LEN};
use crate::control::deadline::MonotonicTime;
use crate::control::message::{
    DaemonMessage, DeviceStatus, ErrorCode, Notification, Reply, Request,
};
use crate::epoch::{Epoch, Generation};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A one-shot answer to an operator request.
pub type Answer = mpsc::Sender<Result<Reply, String>>;

/// Timing of a link.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Bound on one control call.
    pub call_timeout: Duration,
    /// Pause between reconnect attempts.
    pub reconnect_interval: Duration,
    /// `STATUS` refresh period while idle.
    pub status_interval: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            call_timeout: Duration::from_secs(5),
            reconnect_interval: Duration::from_millis(100),
            status_interval: Duration::from_millis(500),
        }
    }
}

/// State shared with the API and metrics threads.
#[derive(Debug)]
pub struct LinkShared {
    pub name: String,
    pub path: PathBuf,
    pub connected: AtomicBool,
    /// The newest `STATUS` the daemon sent.
    pub status: Mutex<Option<DeviceStatus>>,
}

impl LinkShared {
    fn set_status(&self, st: DeviceStatus) {
        if let Ok(mut s) = self.status.lock() {
            *s = Some(st);
        }
    }
}

/// Sends operator requests to a link from any thread, through the coordinator's mailbox.
#[derive(Clone, Debug)]
pub struct LinkRequester {
    device: DeviceId,
    mailbox: Mailbox,
    shared: Arc<LinkShared>,
}

impl LinkRequester {
    /// Sends `req` and waits up to `timeout` for the daemon's reply. Never call it on the
    /// coordinator's thread: that thread is the one that would answer.
    pub fn call(&self, req: Request, timeout: Duration) -> Result<Reply, String> {
        let (tx, rx) = mpsc::channel();
        if !self.mailbox.send(Msg::Call(self.device, req, tx)) {
            return Err("coordinator stopped".into());
        }
        rx.recv_timeout(timeout)
            .map_err(|_| "no answer from the device link".to_string())?
    }

    pub fn shared(&self) -> &Arc<LinkShared> {
        &self.shared
    }
}

/// What the reply at the head of the pipeline answers.
#[derive(Debug)]
enum Await {
    /// The `STATUS` read right after connecting.
    Hello,
    Seal(Epoch),
    Commit(Epoch),
    /// The `STATUS` read after a `COMMIT_FAILED`: does the daemon now refuse commits?
    StatusAfterCommitFailed {
        epoch: Epoch,
        error: String,
    },
    /// The idle refresh.
    Status,
    Call(Answer),
    /// Timed out and already answered: the late reply is skipped.
    WrittenOff,
}

#[derive(Debug)]
struct Pending {
    what: Await,
    deadline: Instant,
}

/// An open connection.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    decoder: FrameDecoder,
    /// Encoded frames not yet accepted by the socket; `out[written..]` is still to go.
    out: Vec<u8>,
    written: usize,
    pending: VecDeque<Pending>,
    /// The hello `STATUS` was answered: commands may go out.
    ready: bool,
}

/// Why a connection is dropped.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("daemon closed the control connection")]
    Closed,
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("control framing: {0}")]
    Codec(#[from] crate::control::codec::CodecError),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// One daemon's control connection (see the module documentation).
#[derive(Debug)]
pub struct DeviceLink {
    id: DeviceId,
    cfg: LinkConfig,
    shared: Arc<LinkShared>,
    conn: Option<Conn>,
    /// While disconnected: when to try again.
    retry_at: Instant,
    /// While connected and idle: when to refresh `STATUS`.
    status_due: Instant,
    /// Failed connects since the last success, and when one was last logged (and its error).
    connect_failures: u64,
    connect_logged: Option<(Instant, String)>,
}

/// A repeated connect failure with the same error is logged at most this often.
const CONNECT_LOG_EVERY: Duration = Duration::from_secs(30);

impl DeviceLink {
    /// A link for device `id` named `name` at control socket `path`; it connects on the first
    /// [`DeviceLink::tick`].
    pub fn new(id: DeviceId, name: String, path: PathBuf, cfg: LinkConfig) -> DeviceLink {
        let now = Instant::now();
        DeviceLink {
            id,
            cfg,
            shared: Arc::new(LinkShared {
                name,
                path,
                connected: AtomicBool::new(false),
                status: Mutex::new(None),
            }),
            conn: None,
            retry_at: now,
            status_due: now,
            connect_failures: 0,
            connect_logged: None,
        }
    }

    /// A requester that reaches this link through `mailbox`.
    pub(crate) fn requester(&self, mailbox: Mailbox) -> LinkRequester {
        LinkRequester {
            device: self.id,
            mailbox,
            shared: self.shared.clone(),
        }
    }

    pub fn shared(&self) -> &Arc<LinkShared> {
        &self.shared
    }

    fn ready(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.ready)
    }

    /// The socket and the `poll` events to wait for, while connected.
    pub fn poll_interest(&self) -> Option<(RawFd, libc::c_short)> {
        self.conn.as_ref().map(|c| {
            let mut events = libc::POLLIN;
            if c.written < c.out.len() {
                events |= libc::POLLOUT;
            }
            (c.stream.as_raw_fd(), events)
        })
    }

    /// When [`DeviceLink::tick`] has work at the latest.
    pub fn next_deadline(&self) -> Instant {
        match &self.conn {
            None => self.retry_at,
            Some(c) => {
                let timeout = c.pending.iter().map(|p| p.deadline).min();
                let refresh = (c.ready && c.pending.is_empty()).then_some(self.status_due);
                match (timeout, refresh) {
                    (Some(a), Some(b)) => a.min(b),
                    (Some(t), None) | (None, Some(t)) => t,
                    // Not ready and nothing pending cannot happen (the hello is pending).
                    (None, None) => Instant::now() + self.cfg.status_interval,
                }
            }
        }
    }

    /// SEAL `epoch`; the answer comes as `Sealed` or `SealFailed` (now, when not connected).
    pub fn seal(&mut self, generation: Generation, epoch: Epoch, out: &mut Vec<Input>) {
        if !self.ready() {
            out.push(Input::SealFailed {
                device: self.id,
                epoch,
                error: "not connected".into(),
            });
            return;
        }
        self.request(
            &Request::Seal { generation, epoch },
            Await::Seal(epoch),
            out,
        );
    }

    /// COMMIT `epoch`; the answer comes as `Committed` or `CommitFailed`.
    pub fn commit(
        &mut self,
        generation: Generation,
        epoch: Epoch,
        deadline: Option<MonotonicTime>,
        out: &mut Vec<Input>,
    ) {
        if !self.ready() {
            out.push(Input::CommitFailed {
                device: self.id,
                epoch,
                error: "not connected".into(),
                device_failed: true,
            });
            return;
        }
        let req = Request::Commit {
            generation,
            epoch,
            deadline,
        };
        self.request(&req, Await::Commit(epoch), out);
    }

    /// An operator request, answered through `answer`.
    pub fn call(&mut self, req: &Request, answer: Answer, out: &mut Vec<Input>) {
        if !self.ready() {
            let _ = answer.send(Err(format!("device {} not connected", self.shared.name)));
            return;
        }
        self.request(req, Await::Call(answer), out);
    }

    /// Queues `req` and writes what the socket takes.
    fn request(&mut self, req: &Request, what: Await, out: &mut Vec<Input>) {
        let now = Instant::now();
        let Some(c) = self.conn.as_mut() else {
            // Callers check first; answered anyway, so nothing waits for a reply that cannot come.
            let p = Pending {
                what,
                deadline: now,
            };
            return self.write_off(p, "not connected", out);
        };
        if let Err(e) = encode_into(req, &mut c.out, MAX_FRAME_LEN) {
            // Our own request does not encode: a bug, not the daemon's fault. Answer it.
            log::error!("device {}: cannot encode {req:?}: {e}", self.shared.name);
            let p = Pending {
                what,
                deadline: now,
            };
            return self.write_off(p, &format!("cannot encode the request: {e}"), out);
        }
        c.pending.push_back(Pending {
            what,
            deadline: now + self.cfg.call_timeout,
        });
        self.status_due = now + self.cfg.status_interval;
        if let Err(e) = flush(c) {
            self.lost(e, out);
        }
    }

    /// Handles `revents` from `poll` on the socket.
    pub fn on_ready(&mut self, revents: libc::c_short, out: &mut Vec<Input>) {
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if revents & libc::POLLOUT != 0 {
            if let Err(e) = flush(c) {
                return self.lost(e, out);
            }
        }
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.read(out);
        }
    }

    /// Reads everything that arrived and dispatches every complete message.
    fn read(&mut self, out: &mut Vec<Input>) {
        loop {
            let Some(c) = self.conn.as_mut() else {
                return;
            };
            let msg = match c.decoder.decode::<DaemonMessage>() {
                Ok(Some(m)) => m,
                Ok(None) => match c.decoder.read_from(&mut c.stream) {
                    Ok(0) => return self.lost(LinkError::Closed, out),
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => return self.lost(e.into(), out),
                },
                Err(e) => return self.lost(e.into(), out),
            };
            match msg {
                // Before the hello STATUS is answered the cycle does not know this device is
                // up; that STATUS (answered after this notification) reports the output too.
                DaemonMessage::Notification(_) if !c.ready => {}
                DaemonMessage::Notification(Notification::OutputPending { epoch }) => {
                    out.push(Input::OutputPending {
                        device: self.id,
                        epoch,
                    })
                }
                DaemonMessage::Reply(r) => match c.pending.pop_front() {
                    Some(p) => self.answer(p.what, r, out),
                    None => {
                        let e = LinkError::Protocol(format!("unsolicited reply {r:?}"));
                        return self.lost(e, out);
                    }
                },
            }
        }
    }

    /// Turns the reply to `what` into cycle inputs or an operator answer.
    fn answer(&mut self, what: Await, r: Reply, out: &mut Vec<Input>) {
        let device = self.id;
        match (what, r) {
            (Await::WrittenOff, _) => log::debug!(
                "device {}: skipped a late reply to a timed-out request",
                self.shared.name
            ),
            (Await::Hello, Reply::Status(st)) => self.connected(*st, out),
            (Await::Hello, other) => {
                let e = LinkError::Protocol(format!("unexpected reply to STATUS: {other:?}"));
                self.lost(e, out);
            }
            (Await::Seal(epoch), Reply::Sealed { epoch: e, state }) if e == epoch => {
                out.push(Input::Sealed {
                    device,
                    epoch,
                    state,
                })
            }
            (Await::Seal(epoch), r) => {
                let error = self.refusal(r, out);
                out.push(Input::SealFailed {
                    device,
                    epoch,
                    error,
                });
            }
            (Await::Commit(epoch), Reply::Committed { epoch: e, stats }) if e == epoch => {
                out.push(Input::Committed {
                    device,
                    epoch,
                    stats,
                })
            }
            (Await::Commit(epoch), Reply::CommitFailed { error, errno, .. }) => {
                // The daemon's `--on-commit-error` decides whether it goes on: its STATUS says
                // whether it now refuses commits.
                let error = match errno {
                    Some(n) => format!("{error} (errno {n})"),
                    None => error,
                };
                let what = Await::StatusAfterCommitFailed { epoch, error };
                self.request(&Request::Status, what, out);
            }
            (Await::Commit(epoch), r) => {
                let error = self.refusal(r, out);
                out.push(Input::CommitFailed {
                    device,
                    epoch,
                    error,
                    device_failed: true,
                });
            }
            (Await::StatusAfterCommitFailed { epoch, error }, r) => {
                let refuses = match r {
                    Reply::Status(st) => {
                        let refuses = st.commit_refused;
                        self.shared.set_status(*st);
                        refuses
                    }
                    _ => true,
                };
                out.push(Input::CommitFailed {
                    device,
                    epoch,
                    error,
                    device_failed: refuses,
                });
            }
            (Await::Status, Reply::Status(st)) => self.shared.set_status(*st),
            (Await::Status, other) => log::warn!(
                "device {}: unexpected reply to STATUS: {other:?}",
                self.shared.name
            ),
            (Await::Call(answer), reply) => {
                if let Reply::Status(st) = &reply {
                    self.shared.set_status((**st).clone());
                }
                let _ = answer.send(Ok(reply));
            }
        }
    }

    /// Describes a reply that refused a SEAL or COMMIT; a `FENCED` one is also reported to
    /// the cycle (a newer coordinator has taken over).
    fn refusal(&self, r: Reply, out: &mut Vec<Input>) -> String {
        match r {
            Reply::Error {
                code: ErrorCode::Fenced,
                message,
            } => {
                out.push(Input::Fenced {
                    device: self.id,
                    error: message.clone(),
                });
                format!("FENCED: {message}")
            }
            Reply::Error { code, message } => format!("{code:?}: {message}"),
            other => format!("unexpected reply {other:?}"),
        }
    }

    /// The hello `STATUS` arrived: the link is up.
    fn connected(&mut self, st: DeviceStatus, out: &mut Vec<Input>) {
        let pending = st
            .epochs
            .iter()
            .any(|e| e.epoch >= st.open_epoch && e.requests > 0);
        let open_epoch = st.open_epoch;
        self.shared.set_status(st);
        if let Some(c) = self.conn.as_mut() {
            c.ready = true;
        }
        self.shared.connected.store(true, Ordering::Release);
        log::info!(
            "device {} connected ({} failed attempts before)",
            self.shared.name,
            self.connect_failures
        );
        self.connect_failures = 0;
        self.connect_logged = None;
        out.push(Input::DeviceConnected {
            device: self.id,
            open_epoch,
            output_pending: pending,
        });
    }

    /// Connects when due, times requests out, and refreshes `STATUS` when idle.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Input>) {
        if self.conn.is_none() {
            if now >= self.retry_at {
                self.try_connect(now, out);
            }
            return;
        }
        let expired: Vec<Pending> = match self.conn.as_mut() {
            Some(c) => c
                .pending
                .iter_mut()
                .filter(|p| p.deadline <= now && !matches!(p.what, Await::WrittenOff))
                .map(|p| Pending {
                    what: std::mem::replace(&mut p.what, Await::WrittenOff),
                    deadline: p.deadline,
                })
                .collect(),
            None => Vec::new(),
        };
        let error = format!(
            "no reply from the daemon within {:?}",
            self.cfg.call_timeout
        );
        for p in expired {
            self.write_off(p, &error, out);
        }
        if self.ready()
            && self.conn.as_ref().is_some_and(|c| c.pending.is_empty())
            && now >= self.status_due
        {
            self.request(&Request::Status, Await::Status, out);
        }
    }

    /// Answers `p` with `error` (a timeout, or a request that could not be written).
    fn write_off(&mut self, p: Pending, error: &str, out: &mut Vec<Input>) {
        let device = self.id;
        let error = error.to_string();
        match p.what {
            Await::Hello => {
                log::warn!("device {}: STATUS failed: {error}", self.shared.name);
                self.conn = None;
                self.retry_at = Instant::now() + self.cfg.reconnect_interval;
            }
            Await::Seal(epoch) => out.push(Input::SealFailed {
                device,
                epoch,
                error,
            }),
            Await::Commit(epoch) => out.push(Input::CommitFailed {
                device,
                epoch,
                error,
                device_failed: true,
            }),
            Await::StatusAfterCommitFailed { epoch, error } => out.push(Input::CommitFailed {
                device,
                epoch,
                error,
                device_failed: true,
            }),
            Await::Call(answer) => {
                let _ = answer.send(Err(error));
            }
            Await::Status | Await::WrittenOff => {}
        }
    }

    fn try_connect(&mut self, now: Instant, out: &mut Vec<Input>) {
        let opened = UnixStream::connect(&self.shared.path).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        let stream = match opened {
            Ok(s) => s,
            Err(e) => {
                self.retry_at = now + self.cfg.reconnect_interval;
                return self.connect_failed(&format!(
                    "cannot connect to control socket {}: {e}",
                    self.shared.path.display()
                ));
            }
        };
        self.conn = Some(Conn {
            stream,
            decoder: FrameDecoder::new(),
            out: Vec::with_capacity(256),
            written: 0,
            pending: VecDeque::new(),
            ready: false,
        });
        self.request(&Request::Status, Await::Hello, out);
    }

    /// Logs a failed connect with the socket path and the OS error: the first one, a changed
    /// error, and then at most every [`CONNECT_LOG_EVERY`] (a typo in `--device` must show).
    fn connect_failed(&mut self, msg: &str) {
        self.connect_failures += 1;
        let due = match &self.connect_logged {
            None => true,
            Some((at, last)) => last != msg || at.elapsed() >= CONNECT_LOG_EVERY,
        };
        if due {
            log::warn!(
                "device {}: {msg} ({} attempts so far; retrying every {:?})",
                self.shared.name,
                self.connect_failures,
                self.cfg.reconnect_interval
            );
            self.connect_logged = Some((Instant::now(), msg.to_string()));
        }
    }

    /// Drops the connection: a link that was up reports `DeviceLost` (the cycle stops waiting
    /// for its SEAL/COMMIT answers); operator requests get an error.
    fn lost(&mut self, e: LinkError, out: &mut Vec<Input>) {
        let Some(c) = self.conn.take() else {
            return;
        };
        let error = format!("device {} not connected", self.shared.name);
        for p in c.pending {
            if let Await::Call(answer) = p.what {
                let _ = answer.send(Err(error.clone()));
            }
        }
        if c.ready {
            self.shared.connected.store(false, Ordering::Release);
            log::error!("device {}: control connection lost: {e}", self.shared.name);
            out.push(Input::DeviceLost {
                device: self.id,
                error: e.to_string(),
            });
            // Straight back: the daemon may only have restarted.
            self.retry_at = Instant::now();
        } else {
            log::warn!("device {}: STATUS failed: {e}", self.shared.name);
            self.retry_at = Instant::now() + self.cfg.reconnect_interval;
        }
    }

    /// Closes the connection (coordinator shutdown); daemons keep holding output.
    pub fn close(&mut self) {
        if self.conn.take().is_some() {
            self.shared.connected.store(false, Ordering::Release);
        }
    }
}

/// Writes what the socket takes of the queued frames. A partly written frame stays queued:
/// the rest follows in order when the socket is writable again.
fn flush(c: &mut Conn) -> Result<(), LinkError> {
    while c.written < c.out.len() {
        match c.stream.write(&c.out[c.written..]) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(n) => c.written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    c.out.clear();
    c.written = 0;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::codec::{read_message, write_message};
    use crate::control::message::{DeviceKind, TransactionState};
    use std::os::unix::net::UnixListener;

    fn status(open: u64) -> DeviceStatus {
        DeviceStatus {
            device: "vda".into(),
            kind: DeviceKind::Blk,
            mode: "hold".into(),
            generation: Generation(1),
            open_epoch: Epoch(open),
            last_sealed: None,
            last_committed: None,
            held_requests: 0,
            held_bytes: 0,
            epochs: vec![],
            commits_ok: 0,
            commits_failed: 0,
            fdatasyncs: 0,
            commit_refused: false,
            last_commit: None,
            replica: None,
            dirty_log: None,
        }
    }

    fn sealed(e: u64) -> Reply {
        Reply::Sealed {
            epoch: Epoch(e),
            state: TransactionState {
                device: "vda".into(),
                kind: DeviceKind::Blk,
                queues: vec![],
            },
        }
    }

    /// A link to a listener the test plays the daemon on.
    fn rig(call_timeout: Duration) -> (tempfile::TempDir, UnixListener, DeviceLink) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vda.ctl");
        let listener = UnixListener::bind(&path).unwrap();
        let cfg = LinkConfig {
            call_timeout,
            reconnect_interval: Duration::from_millis(10),
            status_interval: Duration::from_secs(3600),
        };
        let link = DeviceLink::new(0, "vda".into(), path, cfg);
        (dir, listener, link)
    }

    /// Drives the link (as the runtime's loop does) until `done` holds for its inputs.
    fn pump(link: &mut DeviceLink, out: &mut Vec<Input>, done: impl Fn(&[Input]) -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !done(out) {
            assert!(Instant::now() < end, "no progress; inputs so far: {out:?}");
            link.tick(Instant::now(), out);
            let Some((fd, events)) = link.poll_interest() else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            let mut fds = [libc::pollfd {
                fd,
                events,
                revents: 0,
            }];
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 5) };
            if fds[0].revents != 0 {
                link.on_ready(fds[0].revents, out);
            }
        }
    }

    /// Plays the daemon's side of a connect: answers the hello `STATUS`.
    fn accept(listener: &UnixListener, link: &mut DeviceLink, out: &mut Vec<Input>) -> UnixStream {
        link.tick(Instant::now(), out);
        let (mut s, _) = listener.accept().unwrap();
        let hello: Request = read_message(&mut s, MAX_FRAME_LEN).unwrap().unwrap();
        assert_eq!(hello, Request::Status);
        write_message(&mut s, &Reply::Status(Box::new(status(7)))).unwrap();
        pump(link, out, |i| {
            i.iter()
                .any(|i| matches!(i, Input::DeviceConnected { open_epoch, .. } if *open_epoch == Epoch(7)))
        });
        out.clear();
        s
    }

    /// A link already connected to the test's daemon side (hello answered).
    fn connected(
        call_timeout: Duration,
    ) -> (tempfile::TempDir, UnixListener, DeviceLink, UnixStream) {
        let (d, listener, mut link) = rig(call_timeout);
        let daemon = accept(&listener, &mut link, &mut vec![]);
        (d, listener, link, daemon)
    }

    fn read_request(s: &mut UnixStream) -> Request {
        read_message(s, MAX_FRAME_LEN).unwrap().unwrap()
    }

    #[test]
    fn commands_wait_for_the_hello_status() {
        let (_d, listener, mut link) = rig(Duration::from_secs(5));
        let mut out = vec![];
        link.tick(Instant::now(), &mut out);
        // Connected but STATUS unanswered: the cycle must not seal below the open epoch.
        link.seal(Generation(1), Epoch(3), &mut out);
        assert!(matches!(&out[..], [Input::SealFailed { epoch, .. }] if *epoch == Epoch(3)));
        out.clear();
        let _daemon = accept(&listener, &mut link, &mut out);
        assert!(link.shared().connected.load(Ordering::Acquire));
    }

    #[test]
    fn pipelined_replies_go_to_their_requests_in_order() {
        let (_d, _listener, mut link, mut daemon) = connected(Duration::from_secs(5));
        let mut out = vec![];
        let (tx, rx) = mpsc::channel();
        link.seal(Generation(1), Epoch(7), &mut out);
        link.call(&Request::Status, tx, &mut out);
        link.commit(Generation(1), Epoch(7), None, &mut out);
        assert!(out.is_empty());
        // All three are on the wire before the daemon answers any.
        assert!(
            matches!(read_request(&mut daemon), Request::Seal { epoch, .. } if epoch == Epoch(7))
        );
        assert_eq!(read_request(&mut daemon), Request::Status);
        assert!(
            matches!(read_request(&mut daemon), Request::Commit { epoch, .. } if epoch == Epoch(7))
        );
        write_message(&mut daemon, &sealed(7)).unwrap();
        write_message(
            &mut daemon,
            &Notification::OutputPending { epoch: Epoch(8) },
        )
        .unwrap();
        write_message(&mut daemon, &Reply::Status(Box::new(status(8)))).unwrap();
        let committed = Reply::Committed {
            epoch: Epoch(7),
            stats: Default::default(),
        };
        write_message(&mut daemon, &committed).unwrap();
        pump(&mut link, &mut out, |i| i.len() == 3);
        assert!(matches!(&out[0], Input::Sealed { epoch, .. } if *epoch == Epoch(7)));
        assert!(matches!(&out[1], Input::OutputPending { epoch, .. } if *epoch == Epoch(8)));
        assert!(matches!(&out[2], Input::Committed { epoch, .. } if *epoch == Epoch(7)));
        match rx.try_recv() {
            Ok(Ok(Reply::Status(st))) => assert_eq!(st.open_epoch, Epoch(8)),
            other => panic!("operator STATUS answered with {other:?}"),
        }
    }

    #[test]
    fn a_late_reply_to_a_timed_out_seal_is_skipped() {
        let (_d, _listener, mut link, mut daemon) = connected(Duration::from_millis(50));
        let mut out = vec![];
        link.seal(Generation(1), Epoch(7), &mut out);
        pump(&mut link, &mut out, |i| !i.is_empty());
        assert!(
            matches!(&out[..], [Input::SealFailed { epoch, error, .. }] if *epoch == Epoch(7) && error.contains("no reply")),
            "{out:?}"
        );
        out.clear();
        link.seal(Generation(1), Epoch(8), &mut out);
        read_request(&mut daemon);
        read_request(&mut daemon);
        // The late answer to 7, then the answer to 8: only 8 reaches the cycle.
        write_message(&mut daemon, &sealed(7)).unwrap();
        write_message(&mut daemon, &sealed(8)).unwrap();
        pump(&mut link, &mut out, |i| !i.is_empty());
        std::thread::sleep(Duration::from_millis(20));
        link.on_ready(libc::POLLIN, &mut out);
        assert!(
            matches!(&out[..], [Input::Sealed { epoch, .. }] if *epoch == Epoch(8)),
            "{out:?}"
        );
        assert!(link.shared().connected.load(Ordering::Acquire));
    }

    #[test]
    fn an_unsolicited_reply_drops_the_connection_and_the_link_reconnects() {
        let (_d, listener, mut link, mut daemon) = connected(Duration::from_secs(5));
        let mut out = vec![];
        write_message(&mut daemon, &sealed(7)).unwrap();
        pump(&mut link, &mut out, |i| !i.is_empty());
        assert!(
            matches!(&out[..], [Input::DeviceLost { error, .. }] if error.contains("unsolicited"))
        );
        assert!(!link.shared().connected.load(Ordering::Acquire));
        out.clear();
        let _again = accept(&listener, &mut link, &mut out);
    }

    #[test]
    fn garbage_from_the_daemon_drops_the_connection() {
        let frames: [&[u8]; 2] = [
            // A well-framed payload that is not a message.
            b"\x00\x00\x00\x06\x01{\"x\":",
            // A length far beyond the frame bound.
            b"\xff\xff\xff\xff\x01",
        ];
        for garbage in frames {
            let (_d, _listener, mut link, mut daemon) = connected(Duration::from_secs(5));
            let mut out = vec![];
            let (tx, rx) = mpsc::channel();
            link.call(&Request::Status, tx, &mut out);
            daemon.write_all(garbage).unwrap();
            pump(&mut link, &mut out, |i| !i.is_empty());
            assert!(
                matches!(&out[..], [Input::DeviceLost { .. }]),
                "{garbage:?}: {out:?}"
            );
            // The operator's request is answered, with an error.
            assert!(matches!(rx.try_recv(), Ok(Err(_))));
            assert!(!link.shared().connected.load(Ordering::Acquire));
        }
    }

    #[test]
    fn requests_queue_behind_a_daemon_that_reads_slowly() {
        let (_d, _listener, mut link, daemon) = connected(Duration::from_secs(5));
        let mut out = vec![];
        // A small send buffer, so a few hundred SEALs fill it.
        let fd = link.poll_interest().unwrap().0;
        let size: libc::c_int = 4096;
        // SAFETY: a valid socket and a c_int option value of the given length.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        const N: u64 = 2000;
        for e in 0..N {
            link.seal(Generation(1), Epoch(100 + e), &mut out);
        }
        let (_, events) = link.poll_interest().unwrap();
        assert!(
            events & libc::POLLOUT != 0,
            "the socket took all {N} SEALs at once"
        );
        // The daemon answers every SEAL once it reads it.
        let answerer = std::thread::spawn(move || {
            let mut s = daemon;
            for e in 0..N {
                match read_request(&mut s) {
                    Request::Seal { epoch, .. } => assert_eq!(epoch, Epoch(100 + e)),
                    other => panic!("{other:?}"),
                }
                write_message(&mut s, &sealed(100 + e)).unwrap();
            }
            s
        });
        pump(&mut link, &mut out, |i| i.len() == N as usize);
        for (e, i) in out.iter().enumerate() {
            assert!(
                matches!(i, Input::Sealed { epoch, .. } if *epoch == Epoch(100 + e as u64)),
                "{i:?}"
            );
        }
        let _s = answerer.join().unwrap();
    }
}
