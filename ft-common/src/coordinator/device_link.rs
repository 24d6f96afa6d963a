// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One daemon's control connection, owned by one thread: it executes the coordinator's
//! commands (SEAL, COMMIT, ABORT, ANNOUNCE, STATUS) one at a time over a [`ControlClient`],
//! forwards `OUTPUT_PENDING` notifications as they arrive, refreshes a `STATUS` snapshot when
//! idle, and reconnects after the daemon goes away.
//!
//! Invariants:
//! - Every SEAL/COMMIT command gets exactly one answer into the cycle (`Sealed`/`SealFailed`,
//!   `Committed`/`CommitFailed`), unless the connection is lost, which is reported once as
//!   `DeviceLost` (the cycle then stops waiting for this device).
//! - After a (re)connect the link reads `STATUS` before reporting `DeviceConnected`, so the
//!   cycle learns the daemon's open epoch and never seals below it (protocol section 9).
//! - Commands are executed in the order sent, so COMMITs reach the daemon in epoch order.

use super::cycle::{DeviceId, Input};
use crate::control::deadline::MonotonicTime;
use crate::control::message::{DeviceStatus, ErrorCode, Notification, Reply, Request};
use crate::control::{ClientError, ControlClient};
use crate::epoch::{Epoch, Generation};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where the link reports into the cycle.
pub type LinkSink = Arc<dyn Fn(Input) + Send + Sync>;

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

/// A command for the link thread.
#[derive(Debug)]
pub enum LinkCmd {
    Seal(Generation, Epoch),
    /// With the lease deadline of `--etcd` (`None` without).
    Commit(Generation, Epoch, Option<MonotonicTime>),
    /// Operator requests, answered directly.
    Call(Request, Answer),
    Shutdown,
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

/// The coordinator's handle on one link thread.
#[derive(Debug)]
pub struct DeviceLink {
    tx: mpsc::Sender<LinkCmd>,
    wake: Arc<EventFd>,
    shared: Arc<LinkShared>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceLink {
    /// Starts the link thread for device `id` named `name` at control socket `path`.
    pub fn spawn(
        id: DeviceId,
        name: String,
        path: PathBuf,
        cfg: LinkConfig,
        sink: LinkSink,
    ) -> std::io::Result<DeviceLink> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let shared = Arc::new(LinkShared {
            name: name.clone(),
            path,
            connected: AtomicBool::new(false),
            status: Mutex::new(None),
        });
        let mut worker = Worker {
            id,
            cfg,
            sink,
            rx,
            wake: wake.clone(),
            shared: shared.clone(),
            client: None,
            connect_failures: 0,
            connect_logged: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("ft-link-{name}"))
            .spawn(move || worker.run())?;
        Ok(DeviceLink {
            tx,
            wake,
            shared,
            thread: Some(thread),
        })
    }

    /// Queues a command; false if the link thread is gone.
    pub fn send(&self, cmd: LinkCmd) -> bool {
        let ok = self.tx.send(cmd).is_ok();
        let _ = self.wake.write(1);
        ok
    }

    /// A cloneable sender for operator requests from other threads.
    pub fn requester(&self) -> LinkRequester {
        LinkRequester {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
            shared: self.shared.clone(),
        }
    }

    pub fn shared(&self) -> &Arc<LinkShared> {
        &self.shared
    }
}

impl Drop for DeviceLink {
    fn drop(&mut self) {
        self.send(LinkCmd::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends operator requests to a link from any thread.
#[derive(Clone, Debug)]
pub struct LinkRequester {
    tx: mpsc::Sender<LinkCmd>,
    wake: Arc<EventFd>,
    shared: Arc<LinkShared>,
}

impl LinkRequester {
    /// Sends `req` and waits up to `timeout` for the daemon's reply.
    pub fn call(&self, req: Request, timeout: Duration) -> Result<Reply, String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(LinkCmd::Call(req, tx))
            .map_err(|_| "device link stopped".to_string())?;
        let _ = self.wake.write(1);
        rx.recv_timeout(timeout)
            .map_err(|_| "no answer from the device link".to_string())?
    }

    pub fn shared(&self) -> &Arc<LinkShared> {
        &self.shared
    }
}

struct Worker {
    id: DeviceId,
    cfg: LinkConfig,
    sink: LinkSink,
    rx: mpsc::Receiver<LinkCmd>,
    wake: Arc<EventFd>,
    shared: Arc<LinkShared>,
    client: Option<ControlClient>,
    /// Failed connects since the last success, and when one was last logged (and its error).
    connect_failures: u64,
    connect_logged: Option<(std::time::Instant, String)>,
}

/// A repeated connect failure with the same error is logged at most this often.
const CONNECT_LOG_EVERY: Duration = Duration::from_secs(30);

/// How a call went. `Lost` was already reported as `DeviceLost`: the cycle stops waiting for
/// this device, so no per-command answer follows.
enum Call {
    NotConnected,
    Lost,
    Done(Result<Reply, ClientError>),
}

enum Wait {
    Command,
    Socket,
    Timeout,
}

impl Worker {
    fn run(&mut self) {
        loop {
            if self.client.is_none() {
                self.try_connect();
            }
            let timeout = if self.client.is_some() {
                self.cfg.status_interval
            } else {
                self.cfg.reconnect_interval
            };
            let woke = self.wait(timeout);
            if matches!(woke, Wait::Socket) {
                self.read_notifications();
            }
            // Commands first: they may be waiting while the socket also became readable.
            loop {
                match self.rx.try_recv() {
                    Ok(LinkCmd::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Ok(cmd) => self.execute(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            if self.client.is_some() {
                self.read_notifications();
            }
            if matches!(woke, Wait::Timeout) && self.client.is_some() {
                self.refresh_status();
            }
        }
    }

    /// Waits for a command or (when connected) socket input.
    fn wait(&mut self, timeout: Duration) -> Wait {
        let mut fds = [
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.client.as_ref().map_or(-1, |c| c.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call; a
        // negative fd is ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            Wait::Timeout
        } else if fds[0].revents != 0 {
            let _ = self.wake.read();
            Wait::Command
        } else {
            Wait::Socket
        }
    }

    /// Logs a failed connect with the socket path and the OS error: the first one, a changed
    /// error, and then at most every [`CONNECT_LOG_EVERY`] (a typo in `--device` must show).
    fn connect_failed(&mut self, e: &ClientError) {
        self.connect_failures += 1;
        let msg = e.to_string();
        let due = match &self.connect_logged {
            None => true,
            Some((at, last)) => *last != msg || at.elapsed() >= CONNECT_LOG_EVERY,
        };
        if due {
            log::warn!(
                "device {}: {msg} ({} attempts so far; retrying every {:?})",
                self.shared.name,
                self.connect_failures,
                self.cfg.reconnect_interval
            );
            self.connect_logged = Some((std::time::Instant::now(), msg));
        }
    }

    fn try_connect(&mut self) {
        let mut c = match ControlClient::connect(&self.shared.path, self.cfg.call_timeout) {
            Ok(c) => c,
            Err(e) => return self.connect_failed(&e),
        };
        match c.call(&Request::Status) {
            Ok(Reply::Status(st)) => {
                let pending = st
                    .epochs
                    .iter()
                    .any(|e| e.epoch >= st.open_epoch && e.requests > 0);
                let open_epoch = st.open_epoch;
                if let Ok(mut s) = self.shared.status.lock() {
                    *s = Some(*st);
                }
                self.client = Some(c);
                self.shared.connected.store(true, Ordering::Release);
                log::info!(
                    "device {} connected ({} failed attempts before)",
                    self.shared.name,
                    self.connect_failures
                );
                self.connect_failures = 0;
                self.connect_logged = None;
                (self.sink)(Input::DeviceConnected {
                    device: self.id,
                    open_epoch,
                    output_pending: pending,
                });
            }
            Ok(other) => log::warn!(
                "device {}: unexpected reply to STATUS: {other:?}",
                self.shared.name
            ),
            Err(e) => log::warn!("device {}: STATUS failed: {e}", self.shared.name),
        }
    }

    fn lost(&mut self, e: &ClientError) {
        if self.client.take().is_some() {
            self.shared.connected.store(false, Ordering::Release);
            log::error!("device {}: control connection lost: {e}", self.shared.name);
            (self.sink)(Input::DeviceLost {
                device: self.id,
                error: e.to_string(),
            });
        }
    }

    fn read_notifications(&mut self) {
        loop {
            let Some(c) = self.client.as_mut() else {
                return;
            };
            match c.wait_notification(Duration::ZERO) {
                Ok(Some(Notification::OutputPending { epoch })) => {
                    (self.sink)(Input::OutputPending {
                        device: self.id,
                        epoch,
                    })
                }
                Ok(None) => return,
                Err(e) => return self.lost(&e),
            }
        }
    }

    /// One call; a broken connection is reported as `DeviceLost` here.
    fn call(&mut self, req: &Request) -> Call {
        let Some(c) = self.client.as_mut() else {
            return Call::NotConnected;
        };
        match c.call(req) {
            Err(e @ ClientError::Timeout(_)) => Call::Done(Err(e)),
            Err(e) => {
                self.lost(&e);
                Call::Lost
            }
            Ok(r) => Call::Done(Ok(r)),
        }
    }

    fn execute(&mut self, cmd: LinkCmd) {
        let device = self.id;
        match cmd {
            LinkCmd::Seal(generation, epoch) => {
                let input = match self.call(&Request::Seal { generation, epoch }) {
                    Call::NotConnected => Input::SealFailed {
                        device,
                        epoch,
                        error: "not connected".into(),
                    },
                    Call::Lost => return,
                    Call::Done(Ok(Reply::Sealed { epoch: e, state })) if e == epoch => {
                        Input::Sealed {
                            device,
                            epoch,
                            state,
                        }
                    }
                    Call::Done(Ok(Reply::Error {
                        code: ErrorCode::Fenced,
                        message,
                    })) => {
                        // Answer the seal too, so the cycle stops waiting for it.
                        (self.sink)(Input::Fenced {
                            device,
                            error: message.clone(),
                        });
                        Input::SealFailed {
                            device,
                            epoch,
                            error: format!("FENCED: {message}"),
                        }
                    }
                    Call::Done(r) => Input::SealFailed {
                        device,
                        epoch,
                        error: describe(r),
                    },
                };
                (self.sink)(input);
            }
            LinkCmd::Commit(generation, epoch, deadline) => {
                let input = match self.call(&Request::Commit {
                    generation,
                    epoch,
                    deadline,
                }) {
                    Call::NotConnected => Input::CommitFailed {
                        device,
                        epoch,
                        error: "not connected".into(),
                        device_failed: true,
                    },
                    Call::Lost => return,
                    Call::Done(Ok(Reply::Committed { epoch: e, stats })) if e == epoch => {
                        Input::Committed {
                            device,
                            epoch,
                            stats,
                        }
                    }
                    Call::Done(Ok(Reply::CommitFailed { error, errno, .. })) => {
                        // The daemon's `--on-commit-error` decides whether it goes on: its
                        // STATUS says whether it now refuses commits.
                        let refuses = match self.call(&Request::Status) {
                            Call::Done(Ok(Reply::Status(st))) => {
                                let r = st.commit_refused;
                                if let Ok(mut s) = self.shared.status.lock() {
                                    *s = Some(*st);
                                }
                                r
                            }
                            _ => true,
                        };
                        Input::CommitFailed {
                            device,
                            epoch,
                            error: match errno {
                                Some(n) => format!("{error} (errno {n})"),
                                None => error,
                            },
                            device_failed: refuses,
                        }
                    }
                    Call::Done(Ok(Reply::Error {
                        code: ErrorCode::Fenced,
                        message,
                    })) => {
                        (self.sink)(Input::Fenced {
                            device,
                            error: message.clone(),
                        });
                        Input::CommitFailed {
                            device,
                            epoch,
                            error: format!("FENCED: {message}"),
                            device_failed: true,
                        }
                    }
                    Call::Done(r) => Input::CommitFailed {
                        device,
                        epoch,
                        error: describe(r),
                        device_failed: true,
                    },
                };
                (self.sink)(input);
            }
            LinkCmd::Call(req, answer) => {
                let r = match self.call(&req) {
                    Call::NotConnected | Call::Lost => {
                        Err(format!("device {} not connected", self.shared.name))
                    }
                    Call::Done(Ok(reply)) => {
                        if let Reply::Status(st) = &reply {
                            if let Ok(mut s) = self.shared.status.lock() {
                                *s = Some((**st).clone());
                            }
                        }
                        Ok(reply)
                    }
                    Call::Done(Err(e)) => Err(e.to_string()),
                };
                let _ = answer.send(r);
            }
            LinkCmd::Shutdown => {}
        }
    }

    fn refresh_status(&mut self) {
        if let Call::Done(Ok(Reply::Status(st))) = self.call(&Request::Status) {
            if let Ok(mut s) = self.shared.status.lock() {
                *s = Some(*st);
            }
        }
    }
}

fn describe(r: Result<Reply, ClientError>) -> String {
    match r {
        Ok(Reply::Error { code, message }) => format!("{code:?}: {message}"),
        Ok(other) => format!("unexpected reply {other:?}"),
        Err(e) => e.to_string(),
    }
}
