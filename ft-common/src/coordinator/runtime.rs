// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The coordinator's I/O shell: one thread owns the [`Cycle`] state machine and the
//! checkpointer, feeds it inputs from the device links, the checkpointer, timers and operator
//! requests, and executes the actions it returns (VM control, SEAL/COMMIT/ABORT through the
//! links, checkpoints, telemetry).
//!
//! Invariants: the generation is persisted before the first link is started (no command can
//! go out under an unpersisted generation) and again before an ABORT under a new one; actions
//! are executed in the order the state machine emitted them, and the links keep per-device
//! order, so COMMITs reach every daemon in epoch order.

use super::api::ApiServer;
use super::checkpointer::Checkpointer;
use super::checkpointer_spec::CheckpointerSpec;
use super::cycle::{Action, Cycle, CycleConfig, Event, Input};
use super::device_link::{DeviceLink, LinkCmd, LinkConfig, LinkRequester, LinkSink};
use super::handle::{CoordinatorHandle, Op};
use super::handle::{Msg, OP_TIMEOUT};
use super::metrics::{self, MetricsServer};
use super::telemetry::Telemetry;
use crate::arbiter::Claim;
use crate::control::message::{Reply, Request};
use crate::epoch::Generation;
use crate::fence::GenerationStore;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `--device NAME=CONTROL_SOCKET`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub socket: PathBuf,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok(DeviceSpec {
                name: n.to_string(),
                socket: p.into(),
            }),
            _ => Err(format!("bad device {s:?}: expected NAME=CONTROL_SOCKET")),
        }
    }
}

/// Everything the coordinator needs to run.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub devices: Vec<DeviceSpec>,
    pub checkpointer: CheckpointerSpec,
    pub cycle: CycleConfig,
    pub link: LinkConfig,
    pub state_file: PathBuf,
    pub api: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    /// `--etcd`: the primary's key, already held (see [`crate::arbiter`]). Then the generation
    /// is also taken in etcd, every `COMMIT` carries the lease deadline, a lost lease deposes
    /// the coordinator, and `ftctl abort` revokes the lease.
    pub claim: Option<Arc<Claim>>,
}

/// A running coordinator.
pub struct Coordinator {
    tx: mpsc::Sender<Msg>,
    generation: Generation,
    thread: Option<JoinHandle<()>>,
    requesters: Vec<LinkRequester>,
    api: Option<ApiServer>,
    metrics: Option<MetricsServer>,
}

impl Coordinator {
    /// Takes a new generation (persisted first), connects the device links and starts the
    /// cycle, the API socket and the metrics endpoint.
    pub fn start(cfg: CoordinatorConfig) -> io::Result<Coordinator> {
        if cfg.devices.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "at least one --device is needed",
            ));
        }
        if let Some(a) = cfg.metrics {
            metrics::check_loopback(a)?;
        }
        let store = GenerationStore::new(&cfg.state_file);
        let (tx, rx) = mpsc::channel::<Msg>();
        let generation = match &cfg.claim {
            Some(claim) => {
                let lost = tx.clone();
                claim.set_lost_hook(Box::new(move |error| {
                    let _ = lost.send(Msg::Input(Input::LeaseLost { error }));
                }));
                // Above every generation ever written for this VM; refused if another host
                // took it over since this host last held it.
                claim
                    .advance_generation(&store, Generation(0), true)
                    .map_err(|e| io::Error::other(e.to_string()))?
            }
            None => store.advance()?,
        };
        log::info!(
            "coordinator generation {generation} (persisted in {})",
            cfg.state_file.display()
        );
        // The sender is Sync: no lock of our own for the link threads and the checkpointer to
        // contend on.
        let sink_tx = tx.clone();
        let sink: LinkSink = Arc::new(move |i| {
            let _ = sink_tx.send(Msg::Input(i));
        });
        let acks = acks_protect_output(&cfg.checkpointer);
        if !acks.0 {
            log::warn!(
                "checkpointer {:?}: {} — output is gated, but not fault tolerant",
                cfg.checkpointer,
                acks.1
            );
        }
        let checkpointer = cfg.checkpointer.build(sink.clone());
        let mut links = Vec::with_capacity(cfg.devices.len());
        for (i, d) in cfg.devices.iter().enumerate() {
            links.push(DeviceLink::spawn(
                i,
                d.name.clone(),
                d.socket.clone(),
                cfg.link,
                sink.clone(),
            )?);
        }
        let requesters: Vec<LinkRequester> = links.iter().map(DeviceLink::requester).collect();
        let shell = Shell {
            cycle: Cycle::new(cfg.cycle.clone(), generation, links.len()),
            checkpointer,
            links,
            store,
            telemetry: Telemetry::new(cfg.devices.len()),
            devices: cfg.devices.clone(),
            out: Vec::with_capacity(16),
            queue: VecDeque::with_capacity(16),
            last_abort: None,
            call_timeout: cfg.link.call_timeout,
            acks,
            claim: cfg.claim.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("ft-coordinator".into())
            .spawn(move || shell.run(rx))?;
        let mut c = Coordinator {
            tx,
            generation,
            thread: Some(thread),
            requesters,
            api: None,
            metrics: None,
        };
        if let Some(p) = &cfg.api {
            c.api = Some(ApiServer::start(p, c.handle())?);
        }
        if let Some(a) = cfg.metrics {
            c.metrics = Some(MetricsServer::start(a, c.handle())?);
        }
        Ok(c)
    }

    /// The generation this coordinator started with.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// A cloneable handle for operator requests.
    pub fn handle(&self) -> CoordinatorHandle {
        CoordinatorHandle::new(self.tx.clone(), self.requesters.clone())
    }

    /// Runs an operator request.
    pub fn op(&self, op: Op) -> Result<Value, String> {
        self.handle().op(op)
    }

    /// The bound metrics address (useful with port 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::addr)
    }

    /// Stops everything; device links close their connections.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.api.take();
        self.metrics.take();
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Shell {
    cycle: Cycle,
    checkpointer: Box<dyn Checkpointer>,
    links: Vec<DeviceLink>,
    store: GenerationStore,
    telemetry: Telemetry,
    devices: Vec<DeviceSpec>,
    out: Vec<Action>,
    queue: VecDeque<Input>,
    last_abort: Option<Value>,
    call_timeout: Duration,
    /// Whether an acknowledgement means a secondary holds the checkpoint, and why (not).
    acks: (bool, &'static str),
    claim: Option<Arc<Claim>>,
}

/// Whether the checkpointer's acknowledgements mean that a secondary holds the checkpoint
/// (so committed output survives the loss of this host), with the reason.
pub fn acks_protect_output(spec: &CheckpointerSpec) -> (bool, &'static str) {
    if matches!(spec, CheckpointerSpec::Sim { .. }) {
        (
            false,
            "sim acknowledges every checkpoint without taking one",
        )
    } else if matches!(spec, CheckpointerSpec::Qmp { .. }) {
        (
            false,
            "qmp pauses the VM for the seal but ships no state: an acknowledgement only means the seal happened",
        )
    } else {
        (
            true,
            "an acknowledgement is the checkpointer reporting the checkpoint held by the secondary",
        )
    }
}

impl Shell {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let now = Instant::now();
            let timeout = self
                .cycle
                .next_deadline(now)
                .map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now));
            match rx.recv_timeout(timeout) {
                Ok(Msg::Input(i)) => self.feed(i),
                Ok(Msg::Op(op, answer)) => {
                    let r = self.op(op);
                    let _ = answer.send(r);
                }
                Ok(Msg::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => self.feed(Input::Tick),
            }
        }
        // Let a cut in progress end cleanly (bounded by the control call timeout).
        self.feed(Input::WindDown);
        let deadline = Instant::now() + self.call_timeout;
        while !self.cycle.is_idle() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Msg::Input(i)) => self.feed(i),
                Ok(Msg::Op(_, answer)) => {
                    let _ = answer.send(Err("coordinator is stopping".into()));
                }
                Ok(Msg::Shutdown) => {}
                Err(_) => {
                    log::error!("a cut was still in progress at shutdown; the VM may stay paused");
                    break;
                }
            }
        }
        // Dropping the links closes the control connections; daemons keep holding output.
        log::info!("coordinator stopped");
    }

    fn feed(&mut self, input: Input) {
        self.queue.push_back(input);
        while let Some(i) = self.queue.pop_front() {
            match &i {
                Input::Committed { device, stats, .. } => {
                    self.telemetry.committed(*device, stats);
                    self.check_commit_within_margin(*device, stats.total_us);
                }
                Input::DeviceLost { device, .. } => self.telemetry.disconnected(*device),
                _ => {}
            }
            let mut out = std::mem::take(&mut self.out);
            self.cycle.handle(Instant::now(), i, &mut out);
            for a in out.drain(..) {
                self.execute(a);
            }
            self.out = out;
        }
    }

    /// The lease's timing argument assumes every commit ends within the margin; one that did
    /// not is a configuration error (raise the margin and the TTL), so it is said loudly.
    fn check_commit_within_margin(&self, device: usize, total_us: u64) {
        let Some(c) = &self.claim else { return };
        let margin = c.margin();
        if Duration::from_micros(total_us) > margin {
            log::warn!(
                "device {} took {} ms to commit, more than the lease margin of {} ms: a commit \
                 started just before the deadline could still run when the lease passes to \
                 another host; raise --lease-margin (and --lease-ttl)",
                self.devices.get(device).map_or("?", |d| d.name.as_str()),
                total_us / 1000,
                margin.as_millis()
            );
        }
    }

    fn execute(&mut self, a: Action) {
        match a {
            Action::PauseVm => {
                // A checkpointer that pauses asynchronously reports VmPaused/CutAbandoned
                // through its sink later.
                if let Some(r) = self.checkpointer.begin_cut(self.cycle.generation()) {
                    self.queue.push_back(Input::VmPaused(r));
                }
            }
            Action::ResumeVm => {
                let r = self.checkpointer.resume_vm();
                self.queue.push_back(Input::VmResumed(r));
            }
            Action::StopVm => {
                if let Err(e) = self.checkpointer.pause_vm() {
                    log::error!("cannot stop the VM: {e}");
                }
            }
            Action::SealAll {
                generation,
                epoch,
                devices,
            } => {
                for d in devices {
                    self.send(d, LinkCmd::Seal(generation, epoch));
                }
            }
            Action::StartCheckpoint { epoch, states } => {
                self.checkpointer
                    .start(self.cycle.generation(), epoch, states)
            }
            Action::CancelCheckpoint { epoch } => self.checkpointer.cancel(epoch),
            Action::Commit {
                generation,
                epoch,
                devices,
            } => {
                // Failover tests freeze the coordinator here: acknowledged, not yet committed.
                crate::killpoint::reached("before-commit");
                // Read once per commit: every device gets the same deadline, and the daemons
                // refuse to start it later (the lease may have passed to another host).
                let deadline = self.claim.as_ref().map(|c| c.deadline());
                for d in devices {
                    self.send(d, LinkCmd::Commit(generation, epoch, deadline));
                }
            }
            Action::AbortAll { generation } => self.abort_all(generation),
            Action::Record(s) => self.telemetry.sample(s),
            Action::Report(e) => self.report(e),
        }
    }

    fn send(&mut self, device: usize, cmd: LinkCmd) {
        let ok = self.links.get(device).is_some_and(|l| l.send(cmd));
        if !ok {
            self.queue.push_back(Input::DeviceLost {
                device,
                error: "device link thread stopped".into(),
            });
        }
    }

    fn report(&mut self, e: Event) {
        let name = |d: usize| self.devices.get(d).map_or("?", |s| s.name.as_str());
        match e {
            Event::EpochCommitted { epoch } => log::debug!("epoch {epoch} committed"),
            Event::SealFailed { epoch, error } => {
                self.telemetry.seal_failures += 1;
                log::warn!("seal of epoch {epoch} failed, no checkpoint: {error}");
            }
            Event::CheckpointFailed { epoch, error } => {
                self.telemetry.checkpoint_failures += 1;
                log::error!("checkpoint of epoch {epoch} failed, output stays held: {error}");
            }
            Event::EpochDropped { epoch, reason } => {
                log::warn!("epoch {epoch} will not be committed: {reason}")
            }
            Event::DeviceFailed { device, error } => {
                log::error!("device {} failed, cycle stopped: {error}", name(device))
            }
            Event::CommitFailed {
                device,
                epoch,
                error,
            } => log::error!(
                "device {} failed the commit of epoch {epoch} and goes on: {error}",
                name(device)
            ),
            Event::EpochCommitFailed { epoch } => {
                log::warn!("epoch {epoch} was not committed by every device")
            }
            Event::Deposed { device, error } => log::error!(
                "deposed: device {} answered FENCED, a newer coordinator has taken over: {error}",
                name(device)
            ),
            Event::VmControlFailed { error } => log::error!("VM control failed: {error}"),
            Event::LeaseLost { error } => {
                log::error!("deposed: the etcd lease is lost, the VM is stopped: {error}")
            }
        }
    }

    /// ABORT to every daemon, synchronously, so the operator sees each answer.
    fn abort_all(&mut self, generation: Generation) {
        let mut answers = Vec::with_capacity(self.links.len());
        let pending: Vec<_> = self
            .links
            .iter()
            .map(|l| {
                let r = l.requester();
                (r.shared().name.clone(), r)
            })
            .collect();
        for (name, r) in pending {
            let a = match r.call(Request::Abort { generation }, OP_TIMEOUT) {
                Ok(Reply::Aborted {
                    cancelled_requests,
                    cancelled_bytes,
                    last_committed,
                }) => json!({"device": name, "aborted": true,
                    "cancelled_requests": cancelled_requests,
                    "cancelled_bytes": cancelled_bytes, "last_committed": last_committed}),
                Ok(other) => json!({"device": name, "aborted": false,
                    "error": format!("{other:?}")}),
                Err(e) => json!({"device": name, "aborted": false, "error": e}),
            };
            log::warn!("abort generation {generation}: {a}");
            answers.push(a);
        }
        self.last_abort = Some(json!({"generation": generation, "devices": answers}));
    }

    fn op(&mut self, op: Op) -> Result<Value, String> {
        match op {
            Op::Status => Ok(self.status()),
            Op::Metrics => {
                let mut text =
                    metrics::render(&self.cycle.status(), &self.telemetry, &self.link_view());
                self.checkpointer.render_metrics(&mut text);
                if let Some(c) = &self.claim {
                    c.render_metrics(&mut text);
                }
                Ok(Value::String(text))
            }
            Op::Pause => {
                self.feed(Input::Pause);
                Ok(json!({"paused": true}))
            }
            Op::Resume => {
                self.feed(Input::Resume);
                let s = self.cycle.status();
                Ok(json!({"paused": s.paused, "halted": s.halted, "deposed": s.deposed}))
            }
            Op::Checkpoint => {
                let before = self.cycle.status().last_sealed;
                self.feed(Input::CutNow);
                let s = self.cycle.status();
                Ok(
                    json!({"requested": true, "cut_started": s.last_sealed != before,
                    "phase": s.phase, "halted": s.halted, "paused": s.paused}),
                )
            }
            Op::Abort => {
                // Newer than anything handed out, persisted before anyone hears of it: with
                // etcd also written there under the key (above every generation of the VM),
                // locally only if etcd cannot be reached.
                let in_etcd = self.claim.as_ref().and_then(|c| {
                    c.advance_generation(&self.store, self.cycle.generation(), false)
                        .map_err(|e| log::warn!("abort: generation not written to etcd: {e}"))
                        .ok()
                });
                let g = match in_etcd {
                    Some(g) => g,
                    None => {
                        let stored = self.store.load().map_err(|e| e.to_string())?;
                        let g =
                            Generation(stored.0.max(self.cycle.generation().0).saturating_add(1));
                        self.store
                            .store(g)
                            .map_err(|e| format!("cannot persist generation {g}: {e}"))?;
                        g
                    }
                };
                self.feed(Input::Abort { generation: g });
                let mut answer = self.last_abort.take().unwrap_or(json!({"generation": g}));
                // Deposed: hand the key over at once instead of after the TTL.
                if let Some(c) = &self.claim {
                    answer["lease_revoked"] = match c.revoke() {
                        Ok(()) => json!(true),
                        Err(e) => {
                            log::error!("cannot revoke the etcd lease: {e}");
                            json!(e.to_string())
                        }
                    };
                }
                Ok(answer)
            }
            Op::Announce => {
                let g = self.cycle.generation();
                let answers: Vec<Value> = self
                    .links
                    .iter()
                    .map(|l| {
                        let r = l.requester();
                        let name = r.shared().name.clone();
                        match r.call(Request::Announce { generation: g }, OP_TIMEOUT) {
                            Ok(Reply::Announced { packets }) => {
                                json!({"device": name, "announced": true, "packets": packets})
                            }
                            Ok(other) => json!({"device": name, "announced": false,
                                "reply": format!("{other:?}")}),
                            Err(e) => json!({"device": name, "announced": false, "error": e}),
                        }
                    })
                    .collect();
                Ok(json!({"generation": g, "devices": answers}))
            }
        }
    }

    fn link_view(&self) -> Vec<metrics::DeviceView> {
        self.links
            .iter()
            .map(|l| {
                let sh = l.shared();
                metrics::DeviceView {
                    name: sh.name.clone(),
                    connected: sh.connected.load(std::sync::atomic::Ordering::Acquire),
                    status: sh.status.lock().ok().and_then(|s| s.clone()),
                }
            })
            .collect()
    }

    fn status(&self) -> Value {
        let cs = self.cycle.status();
        let t = &self.telemetry;
        let devices: Vec<Value> = self
            .link_view()
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let dt = t.devices.get(i).cloned().unwrap_or_default();
                let cd = cs.devices.get(i);
                let (held_req, held_bytes, oldest, epochs) = match &v.status {
                    Some(s) => (
                        json!(s.held_requests),
                        json!(s.held_bytes),
                        json!(s.epochs.iter().map(|e| e.oldest_age_us).max()),
                        json!(s.epochs),
                    ),
                    None => (Value::Null, Value::Null, Value::Null, json!([])),
                };
                json!({
                    "name": v.name,
                    "socket": self.devices.get(i).map(|d| d.socket.display().to_string()),
                    "connected": v.connected,
                    "failure": cd.and_then(|c| c.failure.clone()),
                    "held_requests": held_req,
                    "held_bytes": held_bytes,
                    "oldest_held_age_us": oldest,
                    "held_epochs": epochs,
                    "daemon_last_committed": v.status.as_ref().and_then(|s| s.last_committed),
                    "commits_ok": dt.commits_ok,
                    "requests_committed": dt.requests_committed,
                    "commits_failed": cd.map_or(0, |c| c.commits_failed),
                    "disconnects": dt.disconnects,
                    "fdatasync": dt.fdatasync.summary(),
                    "writes": dt.writes.summary(),
                    "commit_total": dt.commit_total.summary(),
                    // Disk replication as the daemon last reported it (block, --replicate-to).
                    "replica": v.status.as_ref().and_then(|s| s.replica.clone()),
                    // The failback dirty-block log (block, --dirty-log).
                    "dirty_log": v.status.as_ref().and_then(|s| s.dirty_log.clone()),
                })
            })
            .collect();
        json!({
            "generation": cs.generation,
            "checkpointer": {
                "kind": self.checkpointer.describe(),
                "acks_protect_output": self.acks.0,
                "acks_meaning": self.acks.1,
                "last_error": cs.checkpointer_last_error,
                "awaiting_ack": cs.awaiting_ack,
                "failures": t.checkpoint_failures,
                "capture": self.checkpointer.status(),
            },
            "cycle": cs,
            "devices": devices,
            "latency": {
                "seal": t.seal.summary(),
                "checkpoint": t.checkpoint.summary(),
                "commit": t.commit.summary(),
                "seal_to_commit": t.seal_to_commit.summary(),
                "cut_to_cut": t.cut_to_cut.summary(),
            },
            "seal_failures": t.seal_failures,
            "lease": self.claim.as_ref().map(|c| c.status()),
        })
    }
}
