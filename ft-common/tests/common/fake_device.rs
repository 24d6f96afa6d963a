// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device side for the coordinator tests: a pluggable [`TestDevice`] trait, and a fake daemon
//! built on the real `ControlServer` and the real `TxQueue` (a genuine protocol peer that
//! enforces fencing and the epoch rules), recording what it releases and when. The real
//! daemons can implement [`DeviceFactory`] later and run the same tests.
#![allow(dead_code)]

use ft_common::control::message::*;
use ft_common::control::{ControlServer, ControlServerHandle, Notifier};
use ft_common::epoch::{Epoch, Generation};
use ft_common::fence::Fence;
use ft_common::txqueue::{Limits, TxQueue};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a coordinator test needs from a device daemon.
pub trait TestDevice: Send {
    fn name(&self) -> &str;
    fn socket(&self) -> &Path;
    /// The guest issues one output request; returns the epoch it was held in.
    fn submit(&self, tag: u64, bytes: u64) -> Epoch;
    /// Output that reached the world (backing file / tap), in release order.
    fn released(&self) -> Vec<(u64, Epoch)>;
    /// Requests currently held.
    fn held(&self) -> usize;
    /// Every control request seen, in order, with its arrival time.
    fn requests(&self) -> Vec<(Instant, Request)>;
    /// The daemon dies (control socket closed and removed).
    fn kill(&mut self);
}

/// Creates devices for a test.
pub trait DeviceFactory {
    fn spawn(&self, name: &str, dir: &Path, kind: DeviceKind) -> Box<dyn TestDevice>;
}

/// An oracle run on every SEAL/COMMIT; `Some(violation)` is recorded.
pub type Check = Box<dyn Fn(&Request) -> Option<String> + Send + Sync>;

/// Hooks a test can set on a fake device.
#[derive(Default)]
pub struct Hooks {
    /// Fail every COMMIT with this error (like an fdatasync EIO).
    pub fail_commits: Option<String>,
    /// Called on every SEAL/COMMIT before it is applied; a returned string is recorded as a
    /// violation (for oracles such as "the VM is paused" or "this epoch was acknowledged").
    pub check: Option<Check>,
}

pub struct FakeState {
    pub fence: Fence,
    pub txq: TxQueue<u64>,
    pub released: Vec<(u64, Epoch)>,
    pub requests: Vec<(Instant, Request)>,
    pub violations: Vec<String>,
    pub commits_ok: u64,
    pub commits_failed: u64,
    pub hooks: Hooks,
    /// `--on-commit-error stop`: after a failed commit every later one is refused.
    pub stop_on_commit_error: bool,
    pub commit_refused: bool,
}

pub struct FakeDevice {
    pub name: String,
    pub kind: DeviceKind,
    pub path: PathBuf,
    pub state: Arc<Mutex<FakeState>>,
    notifier: Notifier,
    server: Option<ControlServerHandle>,
    pub alive: Arc<AtomicBool>,
}

impl FakeDevice {
    pub fn start(name: &str, path: PathBuf, kind: DeviceKind) -> FakeDevice {
        let state = Arc::new(Mutex::new(FakeState {
            fence: Fence::default(),
            txq: TxQueue::new(Limits {
                max_requests: 1 << 20,
                max_bytes: 1 << 40,
            }),
            released: vec![],
            requests: vec![],
            violations: vec![],
            commits_ok: 0,
            commits_failed: 0,
            stop_on_commit_error: false,
            commit_refused: false,
            hooks: Hooks::default(),
        }));
        let server = ControlServer::bind(&path).expect("bind control socket");
        let notifier = server.notifier();
        let st = state.clone();
        let dev = name.to_string();
        let handle = server
            .spawn(move |req: Request| handle(&st, &dev, kind, req))
            .expect("spawn control server");
        FakeDevice {
            name: name.into(),
            kind,
            path,
            state,
            notifier,
            server: Some(handle),
            alive: Arc::new(AtomicBool::new(true)),
        }
    }

    pub fn set_hooks(&self, hooks: Hooks) {
        self.state.lock().unwrap().hooks = hooks;
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    pub fn newest_generation(&self) -> Generation {
        self.state.lock().unwrap().fence.newest()
    }

    pub fn commit_epochs(&self) -> Vec<Epoch> {
        self.requests()
            .into_iter()
            .filter_map(|(_, r)| match r {
                Request::Commit { epoch, .. } => Some(epoch),
                _ => None,
            })
            .collect()
    }

    pub fn seal_epochs(&self) -> Vec<Epoch> {
        self.requests()
            .into_iter()
            .filter_map(|(_, r)| match r {
                Request::Seal { epoch, .. } => Some(epoch),
                _ => None,
            })
            .collect()
    }
}

fn handle(st: &Mutex<FakeState>, dev: &str, kind: DeviceKind, req: Request) -> Reply {
    let mut s = st.lock().unwrap();
    s.requests.push((Instant::now(), req.clone()));
    if let Some(g) = req.generation() {
        if let Err(e) = s.fence.admit(g) {
            return Reply::error(ErrorCode::Fenced, e.to_string());
        }
    }
    if matches!(req, Request::Seal { .. } | Request::Commit { .. }) {
        if let Some(v) = s.hooks.check.as_ref().and_then(|c| c(&req)) {
            s.violations.push(v);
        }
    }
    match req {
        Request::Seal { epoch, .. } => match s.txq.seal(epoch) {
            Ok(_) => Reply::Sealed {
                epoch,
                state: TransactionState {
                    device: dev.into(),
                    kind,
                    queues: vec![QueueState {
                        queue: 0,
                        next_avail: 0,
                        outstanding: s.txq.held().map(|a| *a.payload() as u16).collect(),
                        ..Default::default()
                    }],
                },
            },
            Err(e) => Reply::error(ErrorCode::StaleEpoch, e.to_string()),
        },
        Request::Commit { epoch, .. } => {
            if s.commit_refused {
                return Reply::error(ErrorCode::CommitRefused, "an earlier commit failed");
            }
            let taken = match s.txq.take_committable(epoch) {
                Ok(t) => t,
                Err(e) => return Reply::error(ErrorCode::NotSealed, e.to_string()),
            };
            if let Some(err) = s.hooks.fail_commits.clone() {
                // The taken requests fail (their guests see EIO); nothing is released.
                drop(taken);
                s.commits_failed += 1;
                s.commit_refused = s.stop_on_commit_error;
                return Reply::CommitFailed {
                    epoch,
                    error: err,
                    errno: Some(5),
                };
            }
            let (mut n, mut bytes) = (0, 0);
            for a in taken {
                n += 1;
                bytes += a.bytes();
                let e = a.epoch();
                let tag = *a.payload();
                s.released.push((tag, e));
            }
            s.commits_ok += 1;
            Reply::Committed {
                epoch,
                stats: CommitStats {
                    requests: n,
                    bytes,
                    submit_to_drain_us: 1,
                    fdatasync_us: if n > 0 { 10 } else { 0 },
                    total_us: 11,
                    epochs: 1,
                },
            }
        }
        Request::Abort { .. } => {
            let c = s.txq.counters();
            let cancelled = s.txq.abort();
            Reply::Aborted {
                cancelled_requests: cancelled.len() as u64,
                cancelled_bytes: c.held_bytes,
                last_committed: s.txq.last_committed(),
            }
        }
        Request::Replay { .. } => Reply::error(ErrorCode::Unsupported, "fake device"),
        Request::Announce { .. } => match kind {
            DeviceKind::Net => Reply::Announced { packets: 1 },
            DeviceKind::Blk => Reply::error(ErrorCode::Unsupported, "blk has no announce"),
        },
        Request::Status => {
            let now = Instant::now();
            let epochs = s
                .txq
                .epochs()
                .map(|e| EpochHeld {
                    epoch: e.epoch,
                    requests: e.requests as u64,
                    bytes: e.bytes,
                    oldest_age_us: e.oldest_age(now).as_micros() as u64,
                })
                .collect();
            Reply::Status(Box::new(DeviceStatus {
                device: dev.into(),
                kind,
                mode: "hold".into(),
                generation: s.fence.newest(),
                open_epoch: s.txq.open_epoch(),
                last_sealed: s.txq.last_sealed(),
                last_committed: s.txq.last_committed(),
                held_requests: s.txq.held_requests() as u64,
                held_bytes: s.txq.held_bytes(),
                epochs,
                commits_ok: s.commits_ok,
                commits_failed: s.commits_failed,
                fdatasyncs: s.commits_ok,
                commit_refused: s.commit_refused,
                last_commit: None,
                replica: None,
                dirty_log: None,
            }))
        }
    }
}

impl TestDevice for FakeDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn socket(&self) -> &Path {
        &self.path
    }
    fn submit(&self, tag: u64, bytes: u64) -> Epoch {
        let p = {
            let mut s = self.state.lock().unwrap();
            s.txq.push(tag, bytes).expect("queue has room")
        };
        if p.first_in_epoch {
            self.notifier.output_pending(p.epoch);
        }
        p.epoch
    }
    fn released(&self) -> Vec<(u64, Epoch)> {
        self.state.lock().unwrap().released.clone()
    }
    fn held(&self) -> usize {
        self.state.lock().unwrap().txq.held_requests()
    }
    fn requests(&self) -> Vec<(Instant, Request)> {
        self.state.lock().unwrap().requests.clone()
    }
    fn kill(&mut self) {
        self.alive.store(false, Ordering::Release);
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

/// Fake devices in a directory.
pub struct FakeFactory;

impl DeviceFactory for FakeFactory {
    fn spawn(&self, name: &str, dir: &Path, kind: DeviceKind) -> Box<dyn TestDevice> {
        Box::new(FakeDevice::start(
            name,
            dir.join(format!("{name}.ctl")),
            kind,
        ))
    }
}
