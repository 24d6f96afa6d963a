// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Coordinator side of a control socket: request/reply calls with a timeout (`call`, or
//! `send` + `recv_reply` to fan a command out to several daemons at once), and collection of the
//! `OUTPUT_PENDING` notifications the daemon interleaves with replies.
//!
//! Invariants:
//! - Replies are matched to requests by order (the daemon answers each request exactly once, in
//!   order). A call that timed out still owes a reply; that late reply is recognised and skipped
//!   by the next read, so one slow answer does not shift every later one.
//! - Any framing or protocol violation by the daemon leaves the client `Broken`: it refuses to
//!   guess, and the coordinator reconnects and re-reads `STATUS`.
//! - Memory is bounded: the decoder holds at most one maximal frame and at most
//!   [`MAX_QUEUED_NOTIFICATIONS`] notifications are kept (oldest dropped; they only say "the
//!   newest epoch has output", so the newest is the one that matters).

use super::codec::{write_message, CodecError, FrameDecoder};
use super::message::{DaemonMessage, Notification, Reply, Request};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Notifications kept before the oldest are dropped.
pub const MAX_QUEUED_NOTIFICATIONS: usize = 1024;

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No reply within the timeout; the connection stays usable.
    #[error("no reply from the daemon within {0:?}")]
    Timeout(Duration),
    /// The daemon closed the connection.
    #[error("daemon closed the control connection")]
    Closed,
    /// Framing failed, or writing/reading the socket did.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The daemon sent a reply nobody asked for.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// An earlier failure left the stream in an unknown state; reconnect.
    #[error("control connection unusable after an earlier failure; reconnect")]
    Broken,
}

/// A connection from the coordinator to one daemon's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
    decoder: FrameDecoder,
    notifications: VecDeque<Notification>,
    timeout: Duration,
    /// Requests sent and still awaiting their reply.
    in_flight: usize,
    /// Replies still owed for calls that timed out.
    late_replies: usize,
    broken: bool,
}

impl ControlClient {
    /// Connects to `path`; `timeout` bounds every later call.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(ControlClient {
            stream,
            decoder: FrameDecoder::new(),
            notifications: VecDeque::new(),
            timeout,
            in_flight: 0,
            late_replies: 0,
            broken: false,
        })
    }

    /// Changes the timeout of later calls.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `req` and waits for its reply. Notifications arriving meanwhile are queued (see
    /// [`ControlClient::take_notifications`]). `Reply::Error` is a successful call: the daemon
    /// answered, with a refusal.
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        self.send(req)?;
        self.recv_reply()
    }

    /// Sends `req` without waiting, so a coordinator can fan one command out to several
    /// daemons and then collect the replies with [`ControlClient::recv_reply`] (the VM is
    /// paused during SEAL: the daemons should work in parallel, not one after the other).
    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        // wait_notification(ZERO) may have left the socket non-blocking.
        self.stream
            .set_nonblocking(false)
            .and_then(|_| {
                self.stream
                    .set_write_timeout(Some(self.timeout.max(Duration::from_millis(1))))
            })
            .map_err(|e| self.fail(CodecError::Io(e).into()))?;
        // A partly written frame would desynchronise the daemon's decoder: any write error
        // breaks the connection.
        write_message(&mut self.stream, req).map_err(|e| self.fail(e.into()))?;
        self.in_flight += 1;
        Ok(())
    }

    /// Waits up to the timeout for the reply to the oldest request sent and not yet answered.
    /// On timeout that reply is written off: it is skipped when it arrives.
    pub fn recv_reply(&mut self) -> Result<Reply, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        if self.in_flight == 0 {
            return Err(ClientError::Protocol("no request awaits a reply".into()));
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.next_message(deadline) {
                Ok(DaemonMessage::Reply(r)) => {
                    self.in_flight -= 1;
                    return Ok(r);
                }
                Ok(DaemonMessage::Notification(n)) => self.queue(n),
                Err(ClientError::Timeout(_)) => {
                    self.in_flight -= 1;
                    self.late_replies += 1;
                    return Err(ClientError::Timeout(self.timeout));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Requests sent whose replies have not been received (nor written off by a timeout).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Notifications received so far, oldest first; the queue is emptied.
    pub fn take_notifications(&mut self) -> Vec<Notification> {
        self.notifications.drain(..).collect()
    }

    /// The next notification, waiting up to `timeout` for one (`Duration::ZERO`: only what has
    /// already arrived). `Ok(None)` when none came.
    pub fn wait_notification(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Notification>, ClientError> {
        if let Some(n) = self.notifications.pop_front() {
            return Ok(Some(n));
        }
        if self.broken {
            return Err(ClientError::Broken);
        }
        if self.in_flight > 0 {
            // A reply would arrive here and have nowhere to go.
            return Err(ClientError::Protocol(
                "wait_notification with requests in flight; collect their replies first".into(),
            ));
        }
        let deadline = Instant::now() + timeout;
        match self.next_message(deadline) {
            Ok(DaemonMessage::Notification(n)) => Ok(Some(n)),
            Ok(DaemonMessage::Reply(r)) => {
                Err(self.fail(ClientError::Protocol(format!("unsolicited reply {r:?}"))))
            }
            Err(ClientError::Timeout(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The next message that is not a late reply to a timed-out call.
    fn next_message(&mut self, deadline: Instant) -> Result<DaemonMessage, ClientError> {
        loop {
            match self.decoder.decode::<DaemonMessage>() {
                Ok(Some(DaemonMessage::Reply(_))) if self.late_replies > 0 => {
                    self.late_replies -= 1;
                    log::debug!("skipped a late reply to a timed-out control call");
                }
                Ok(Some(m)) => return Ok(m),
                Ok(None) => self.fill(deadline)?,
                Err(e) => return Err(self.fail(e.into())),
            }
        }
    }

    /// Reads more bytes, waiting until `deadline` at most.
    fn fill(&mut self, deadline: Instant) -> Result<(), ClientError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let setup = if remaining.is_zero() {
            self.stream.set_nonblocking(true)
        } else {
            self.stream
                .set_nonblocking(false)
                .and_then(|_| self.stream.set_read_timeout(Some(remaining)))
        };
        setup.map_err(|e| self.fail(CodecError::Io(e).into()))?;
        loop {
            return match self.decoder.read_from(&mut self.stream) {
                Ok(0) => {
                    let _ = self.fail(ClientError::Closed);
                    Err(ClientError::Closed)
                }
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    Err(ClientError::Timeout(remaining))
                }
                Err(e) => Err(self.fail(CodecError::Io(e).into())),
            };
        }
    }

    fn queue(&mut self, n: Notification) {
        if self.notifications.len() >= MAX_QUEUED_NOTIFICATIONS {
            self.notifications.pop_front();
        }
        self.notifications.push_back(n);
    }

    fn fail(&mut self, e: ClientError) -> ClientError {
        self.broken = true;
        e
    }

    /// True once the connection can no longer be used.
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

impl AsRawFd for ControlClient {
    /// For a coordinator's own poll loop: readable means a notification or reply arrived; then
    /// call [`ControlClient::wait_notification`] with `Duration::ZERO`.
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl AsFd for ControlClient {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}
