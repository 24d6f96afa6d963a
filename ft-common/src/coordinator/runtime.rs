// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The coordinator's I/O shell: one thread owns the [`Cycle`] state machine, the checkpointer
//! and every device link's socket. It waits in one `ppoll` on its mailbox (checkpointer
//! reports, operator requests) and the control sockets, feeds the cycle what arrives, and
//! executes the actions it returns (VM control, SEAL/COMMIT/ABORT written to the daemons,
//! checkpoints, telemetry). A daemon's reply becomes the cycle's next action on the thread
//! that read it: the hot path (OUTPUT_PENDING, SEAL, SEALED, COMMIT, COMMITTED) crosses no
//! thread inside the coordinator.
//!
//! Invariants: the generation is persisted before the first link connects (no command can go
//! out under an unpersisted generation) and again before an ABORT under a new one; actions
//! are executed in the order the state machine emitted them, and each link writes its
//! requests in order, so COMMITs reach every daemon in epoch order. Nothing on this thread
//! blocks on a daemon: every call is bounded by the link's call timeout.

use super::api::ApiServer;
use super::checkpointer::Checkpointer;
use super::checkpointer::Sink;
use super::checkpointer_spec::CheckpointerSpec;
use super::cycle::{Action, Cycle, CycleConfig, Event, Input};
use super::device_link::{DeviceLink, LinkConfig, LinkRequester};
use super::handle::{CoordinatorHandle, Op, OpAnswer};
use super::handle::{Mailbox, Msg};
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
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

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
    mailbox: Mailbox,
    generation: Generation,
    thread: Option<JoinHandle<()>>,
    requesters: Vec<LinkRequester>,
    api: Option<ApiServer>,
    metrics: Option<MetricsServer>,
}

impl Coordinator {
    /// Takes a new generation (persisted first), starts the cycle's thread (which connects the
    /// device links), the API socket and the metrics endpoint.
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
        let (mailbox, rx, wake) = Mailbox::new()?;
        let generation = match &cfg.claim {
            Some(claim) => {
                let lost = mailbox.clone();
                claim.set_lost_hook(Box::new(move |error| {
                    lost.send(Msg::Input(Input::LeaseLost { error }));
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
        // The sender is Sync: no lock of our own for the checkpointer's threads to contend on.
        let sink_box = mailbox.clone();
        let sink: Sink = Arc::new(move |i| {
            sink_box.send(Msg::Input(i));
        });
        let acks = acks_protect_output(&cfg.checkpointer);
        if !acks.0 {
            log::warn!(
                "checkpointer {:?}: {} — output is gated, but not fault tolerant",
                cfg.checkpointer,
                acks.1
            );
        }
        let checkpointer = cfg.checkpointer.build(sink);
        let links: Vec<DeviceLink> = cfg
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| DeviceLink::new(i, d.name.clone(), d.socket.clone(), cfg.link))
            .collect();
        let requesters: Vec<LinkRequester> =
            links.iter().map(|l| l.requester(mailbox.clone())).collect();
        let shell = Shell {
            cycle: Cycle::new(cfg.cycle.clone(), generation, links.len()),
            checkpointer,
            links,
            store,
            telemetry: Telemetry::new(cfg.devices.len()),
            devices: cfg.devices.clone(),
            out: Vec::with_capacity(16),
            link_out: Vec::with_capacity(16),
            queue: VecDeque::with_capacity(16),
            gathers: Vec::new(),
            call_timeout: cfg.link.call_timeout,
            acks,
            claim: cfg.claim.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("ft-coordinator".into())
            .spawn(move || shell.run(rx, wake))?;
        let mut c = Coordinator {
            mailbox,
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
        CoordinatorHandle::new(self.mailbox.clone(), self.requesters.clone())
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
        self.mailbox.send(Msg::Shutdown);
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
    /// What the links answered while an action was executed (fed after it).
    link_out: Vec<Input>,
    queue: VecDeque<Input>,
    /// ABORTs and ANNOUNCEs waiting for the devices' answers.
    gathers: Vec<Gather>,
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

/// How long the shell sleeps when neither the cycle nor a link has a deadline.
const IDLE_WAIT: Duration = Duration::from_secs(1);

impl Shell {
    fn run(mut self, rx: mpsc::Receiver<Msg>, wake: Arc<EventFd>) {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(1 + self.links.len());
        // Set by a shutdown: a cut in progress may still end cleanly until then (bounded by
        // the control call timeout).
        let mut stop_by: Option<Instant> = None;
        loop {
            let now = Instant::now();
            for i in 0..self.links.len() {
                self.links[i].tick(now, &mut self.link_out);
                self.feed_link_out();
            }
            if self.cycle.next_deadline(now).is_some_and(|d| d <= now) {
                self.feed(Input::Tick);
            }
            self.poll_gathers();
            if let Some(t) = stop_by {
                if self.cycle.is_idle() {
                    break;
                }
                if now >= t {
                    log::error!("a cut was still in progress at shutdown; the VM may stay paused");
                    break;
                }
            }

            let mut until = self.cycle.next_deadline(now).unwrap_or(now + IDLE_WAIT);
            for l in &self.links {
                until = until.min(l.next_deadline());
            }
            if let Some(t) = stop_by {
                until = until.min(t);
            }
            fds.clear();
            fds.push(libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for l in &self.links {
                // A negative fd keeps the link's slot and is ignored by ppoll.
                let (fd, events) = l.poll_interest().unwrap_or((-1, 0));
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
            }
            wait(&mut fds, until.saturating_duration_since(now));

            if fds[0].revents != 0 {
                let _ = wake.read();
            }
            loop {
                match rx.try_recv() {
                    Ok(Msg::Input(i)) => self.feed(i),
                    Ok(Msg::Op(_, answer)) if stop_by.is_some() => {
                        let _ = answer.send(Err("coordinator is stopping".into()));
                    }
                    Ok(Msg::Op(op, answer)) => self.op(op, answer),
                    Ok(Msg::Call(device, req, answer)) => match self.links.get_mut(device) {
                        Some(l) => {
                            l.call(&req, answer, &mut self.link_out);
                            self.feed_link_out();
                        }
                        None => {
                            let _ = answer.send(Err(format!("no device {device}")));
                        }
                    },
                    Ok(Msg::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => {
                        if stop_by.is_none() {
                            stop_by = Some(Instant::now() + self.call_timeout);
                            self.feed(Input::WindDown);
                        }
                        break;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            for (i, fd) in fds.iter().enumerate().skip(1) {
                if fd.revents != 0 {
                    self.links[i - 1].on_ready(fd.revents, &mut self.link_out);
                    self.feed_link_out();
                }
            }
        }
        // Closing the control connections; daemons keep holding output.
        for l in &mut self.links {
            l.close();
        }
        log::info!("coordinator stopped");
    }

    /// Feeds what the links reported.
    fn feed_link_out(&mut self) {
        self.queue.extend(self.link_out.drain(..));
        self.run_queue();
    }

    fn feed(&mut self, input: Input) {
        self.queue.push_back(input);
        self.run_queue();
    }

    /// Feeds the cycle every queued input, including those its actions queue meanwhile.
    fn run_queue(&mut self) {
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
                    match self.links.get_mut(d) {
                        Some(l) => l.seal(generation, epoch, &mut self.link_out),
                        None => self.no_such_device(d),
                    }
                }
                self.queue.extend(self.link_out.drain(..));
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
                    match self.links.get_mut(d) {
                        Some(l) => l.commit(generation, epoch, deadline, &mut self.link_out),
                        None => self.no_such_device(d),
                    }
                }
                self.queue.extend(self.link_out.drain(..));
            }
            Action::AbortAll { generation } => {
                let req = Request::Abort { generation };
                self.gather(GatherKind::Abort(generation), req, None);
            }
            Action::Record(s) => self.telemetry.sample(s),
            Action::Report(e) => self.report(e),
        }
    }

    /// The cycle named a device this shell does not have (a bug): it stops waiting for it.
    fn no_such_device(&mut self, device: usize) {
        self.queue.push_back(Input::DeviceLost {
            device,
            error: "no such device link".into(),
        });
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

    /// Sends `req` to every device; `reply` (if any) gets every answer once all are in. Each
    /// call ends within the call timeout, answered or not, so a gather always finishes.
    fn gather(&mut self, kind: GatherKind, req: Request, reply: Option<OpAnswer>) {
        let mut calls = Vec::with_capacity(self.links.len());
        for l in &mut self.links {
            let (tx, rx) = mpsc::channel();
            l.call(&req, tx, &mut self.link_out);
            calls.push(GatherCall {
                device: l.shared().name.clone(),
                rx,
                answer: None,
            });
        }
        self.queue.extend(self.link_out.drain(..));
        self.gathers.push(Gather { kind, calls, reply });
    }

    /// Finishes the gathers whose every device has answered.
    fn poll_gathers(&mut self) {
        let mut i = 0;
        while i < self.gathers.len() {
            let g = &mut self.gathers[i];
            for c in &mut g.calls {
                if c.answer.is_none() {
                    c.answer = match c.rx.try_recv() {
                        Ok(r) => Some(r),
                        Err(mpsc::TryRecvError::Empty) => None,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            Some(Err("the device link dropped the request".into()))
                        }
                    };
                }
            }
            if g.calls.iter().all(|c| c.answer.is_some()) {
                let g = self.gathers.swap_remove(i);
                self.finish_gather(g);
            } else {
                i += 1;
            }
        }
    }

    fn finish_gather(&mut self, g: Gather) {
        let answers = g.calls.into_iter().map(|c| {
            (
                c.device,
                c.answer.unwrap_or_else(|| Err("no answer".into())),
            )
        });
        let value = match g.kind {
            GatherKind::Abort(generation) => {
                let devices: Vec<Value> = answers
                    .map(|(name, r)| {
                        let a = match r {
                            Ok(Reply::Aborted {
                                cancelled_requests,
                                cancelled_bytes,
                                last_committed,
                            }) => json!({"device": name, "aborted": true,
                                "cancelled_requests": cancelled_requests,
                                "cancelled_bytes": cancelled_bytes,
                                "last_committed": last_committed}),
                            Ok(other) => json!({"device": name, "aborted": false,
                                "error": format!("{other:?}")}),
                            Err(e) => json!({"device": name, "aborted": false, "error": e}),
                        };
                        log::warn!("abort generation {generation}: {a}");
                        a
                    })
                    .collect();
                let mut answer = json!({"generation": generation, "devices": devices});
                self.revoke_lease(&mut answer);
                answer
            }
            GatherKind::Announce(generation) => {
                let devices: Vec<Value> = answers
                    .map(|(name, r)| match r {
                        Ok(Reply::Announced { packets }) => {
                            json!({"device": name, "announced": true, "packets": packets})
                        }
                        Ok(other) => json!({"device": name, "announced": false,
                            "reply": format!("{other:?}")}),
                        Err(e) => json!({"device": name, "announced": false, "error": e}),
                    })
                    .collect();
                json!({"generation": generation, "devices": devices})
            }
        };
        if let Some(reply) = g.reply {
            let _ = reply.send(Ok(value));
        }
    }

    /// Deposed, and every daemon has answered the ABORT: hand the etcd key over at once
    /// instead of after the TTL.
    fn revoke_lease(&self, answer: &mut Value) {
        if let Some(c) = &self.claim {
            answer["lease_revoked"] = match c.revoke() {
                Ok(()) => json!(true),
                Err(e) => {
                    log::error!("cannot revoke the etcd lease: {e}");
                    json!(e.to_string())
                }
            };
        }
    }

    /// Runs an operator request; ABORT and ANNOUNCE answer once every device has.
    fn op(&mut self, op: Op, answer: OpAnswer) {
        match op {
            Op::Abort => self.op_abort(answer),
            Op::Announce => {
                let g = self.cycle.generation();
                let req = Request::Announce { generation: g };
                self.gather(GatherKind::Announce(g), req, Some(answer));
            }
            _ => {
                let _ = answer.send(self.op_now(op));
            }
        }
    }

    fn op_abort(&mut self, answer: OpAnswer) {
        // Newer than anything handed out, persisted before anyone hears of it: with etcd also
        // written there under the key (above every generation of the VM), locally only if
        // etcd cannot be reached.
        let in_etcd = self.claim.as_ref().and_then(|c| {
            c.advance_generation(&self.store, self.cycle.generation(), false)
                .map_err(|e| log::warn!("abort: generation not written to etcd: {e}"))
                .ok()
        });
        let g = match in_etcd {
            Some(g) => g,
            None => {
                let stored = match self.store.load() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = answer.send(Err(e.to_string()));
                        return;
                    }
                };
                let g = Generation(stored.0.max(self.cycle.generation().0).saturating_add(1));
                if let Err(e) = self.store.store(g) {
                    let _ = answer.send(Err(format!("cannot persist generation {g}: {e}")));
                    return;
                }
                g
            }
        };
        // The cycle answers with AbortAll, which starts the gather this answer joins.
        self.feed(Input::Abort { generation: g });
        let started = self
            .gathers
            .iter_mut()
            .rev()
            .find(|x| x.reply.is_none() && matches!(x.kind, GatherKind::Abort(_)));
        match started {
            Some(x) => x.reply = Some(answer),
            None => {
                let mut v = json!({"generation": g});
                self.revoke_lease(&mut v);
                let _ = answer.send(Ok(v));
            }
        }
        // Links that are down answered at once.
        self.poll_gathers();
    }

    /// Operator requests answered at once.
    fn op_now(&mut self, op: Op) -> Result<Value, String> {
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
            Op::Abort | Op::Announce => Err(format!("{} is answered by a gather", op.name())),
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

/// What a [`Gather`] collects.
#[derive(Clone, Copy, Debug)]
enum GatherKind {
    Abort(Generation),
    Announce(Generation),
}

/// An operator request sent to every device, answered once each device has answered (or
/// failed to: each call is bounded by the call timeout).
struct Gather {
    kind: GatherKind,
    calls: Vec<GatherCall>,
    reply: Option<OpAnswer>,
}

/// One device's part of a [`Gather`].
struct GatherCall {
    device: String,
    /// Where the link answers.
    rx: mpsc::Receiver<Result<Reply, String>>,
    answer: Option<Result<Reply, String>>,
}

/// Waits in `ppoll` for `fds` up to `timeout` (nanosecond resolution: a cut deadline can be
/// sub-millisecond). An interrupted or failed wait just returns; the caller looks again.
fn wait(fds: &mut [libc::pollfd], timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd for the duration of the
    // call, `ts` a valid timespec, and a null signal mask leaves the mask unchanged.
    unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
}
