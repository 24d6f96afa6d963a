// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The epoch cycle as a pure state machine: inputs (timer, output pending, seal replies,
//! checkpoint capture/ack/failure, commit replies, device loss, operator commands) go in,
//! actions (pause VM, seal, start checkpoint, resume VM, commit, stop VM, abort) come out. No
//! sockets, no clocks of its own (`now` is an argument), so it is unit- and property-tested
//! directly; `runtime.rs` is the I/O shell that drives it.
//!
//! One cycle for epoch `E`: `PauseVm` -> `SealAll E` -> every device `SEALED E` ->
//! `StartCheckpoint E` (with the collected states) -> `Captured E` -> `ResumeVm` -> idle.
//! The checkpoint's acknowledgement arrives later: sealed, captured epochs wait in an
//! in-order queue while epoch `E+1` runs (pipelining).
//!
//! Invariants (checked by the property test at the bottom):
//! 1. `Commit E` is emitted only for an epoch whose checkpoint was acknowledged (`Acked E`), and
//!    never for an epoch that failed, timed out, or was dropped by an abort.
//! 2. Commits go out strictly in epoch order, one at a time: `Commit E` only after every earlier
//!    captured epoch is committed (all devices answered) or known failed.
//! 3. Epochs sealed are strictly increasing, and never below what a device reported open.
//! 4. After a device failure (disconnect, a commit refused or unanswered) no new epoch is cut
//!    until the failure clears: under `stop-vm` when the operator resumes, under `continue` as
//!    soon as every device is connected again. A `COMMIT_FAILED` the daemon reports and survives
//!    (`--on-commit-error report`) is not a device failure: it is counted and the cycle goes on.
//! 5. After an abort, once a device answers `FENCED` (a newer coordinator took over), or once
//!    the etcd lease is lost (`LeaseLost`), this coordinator is deposed: nothing is sealed or
//!    committed again.
//! 6. `last_committed` / `epochs_committed` count only epochs every device committed.

use crate::control::message::{CommitStats, TransactionState};
use crate::epoch::{Epoch, Generation};
use serde::Serialize;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Index of a device in the coordinator's device list.
pub type DeviceId = usize;

/// What to do when a device fails (disconnects, or can no longer commit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Stop the VM and the cycle, until the operator resumes.
    StopVm,
    /// Leave the VM running (its output stays held meanwhile) and continue the cycle by itself
    /// as soon as every device is connected again.
    Continue,
}

/// Cycle timing and policy.
#[derive(Clone, Debug)]
pub struct CycleConfig {
    /// Periodic cut.
    pub interval: Option<Duration>,
    /// Event-driven cut on `OUTPUT_PENDING` no sooner than this after the previous cut.
    pub min_interval: Option<Duration>,
    /// Capture plus acknowledgement of one checkpoint must finish within this.
    pub checkpoint_timeout: Duration,
    pub on_device_failure: FailurePolicy,
    /// Bound on captured epochs waiting for acknowledgement; no cut while it is reached.
    pub max_pending: usize,
}

impl Default for CycleConfig {
    fn default() -> Self {
        CycleConfig {
            interval: Some(Duration::from_millis(100)),
            min_interval: None,
            checkpoint_timeout: Duration::from_secs(10),
            on_device_failure: FailurePolicy::StopVm,
            max_pending: 64,
        }
    }
}

/// An input to the machine.
#[derive(Clone, Debug)]
pub enum Input {
    /// Nothing happened but time passed.
    Tick,
    OutputPending {
        device: DeviceId,
        epoch: Epoch,
    },
    /// Operator: cut an epoch now.
    CutNow,
    /// Operator: stop cutting epochs (pending acknowledgements still commit).
    Pause,
    /// Operator: cut again; also clears a halt after a device failure once all are connected.
    Resume,
    VmPaused(Result<(), String>),
    /// The checkpointer could not bring the VM to a consistent cut (standby unreachable, live
    /// migration failed before its switchover, QEMU gone) and left it running: no epoch was
    /// sealed, output stays held, and the next cut retries. Unlike `VmPaused(Err)` this does
    /// not halt the cycle.
    CutAbandoned {
        error: String,
    },
    VmResumed(Result<(), String>),
    Sealed {
        device: DeviceId,
        epoch: Epoch,
        state: TransactionState,
    },
    SealFailed {
        device: DeviceId,
        epoch: Epoch,
        error: String,
    },
    /// The checkpoint of `epoch` has been taken; the VM may run again.
    Captured {
        epoch: Epoch,
    },
    /// The secondary holds checkpoint `epoch`.
    Acked {
        epoch: Epoch,
    },
    CheckpointFailed {
        epoch: Epoch,
        error: String,
    },
    Committed {
        device: DeviceId,
        epoch: Epoch,
        stats: CommitStats,
    },
    /// The commit of `epoch` failed on `device`. `device_failed`: the device can no longer
    /// commit (an error reply such as `COMMIT_REFUSED`, a timeout, or `COMMIT_FAILED` from a
    /// daemon that now refuses commits); false for a `COMMIT_FAILED` the daemon reported and
    /// survives (`--on-commit-error report`): the guest saw I/O errors for that epoch, later
    /// epochs commit normally.
    CommitFailed {
        device: DeviceId,
        epoch: Epoch,
        error: String,
        device_failed: bool,
    },
    /// `device` answered `FENCED`: a coordinator with a newer generation has taken over.
    Fenced {
        device: DeviceId,
        error: String,
    },
    /// The etcd lease on the primary's key is lost (`--etcd`): another host may acquire the
    /// key and take over, so this coordinator is deposed.
    LeaseLost {
        error: String,
    },
    DeviceLost {
        device: DeviceId,
        error: String,
    },
    /// (Re)connected; `open_epoch` from its `STATUS`, `output_pending` if it holds output.
    DeviceConnected {
        device: DeviceId,
        open_epoch: Epoch,
        output_pending: bool,
    },
    /// Operator: depose this primary with the (already persisted) newer generation.
    Abort {
        generation: Generation,
    },
    /// The coordinator is stopping: cut no more; a cut in progress ends without a checkpoint
    /// (a seal in flight is waited for, so no SEAL reaches a daemon after the VM runs again)
    /// and the VM runs again unless a failure policy or an abort keeps it stopped. Held output
    /// stays held in the daemons. The shell feeds inputs until [`Cycle::is_idle`].
    WindDown,
}

/// A latency sample for telemetry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sample {
    /// Pause requested -> every device sealed.
    Seal(Duration),
    /// Checkpoint started -> acknowledged.
    Checkpoint(Duration),
    /// `COMMIT` sent -> every device answered.
    Commit(Duration),
    /// `SEAL` sent -> every device committed.
    SealToCommit(Duration),
    /// One cut to the next (the whole cycle; with periodic cuts, the interval).
    CutToCut(Duration),
}

/// Something worth logging and counting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    SealFailed {
        epoch: Epoch,
        error: String,
    },
    CheckpointFailed {
        epoch: Epoch,
        error: String,
    },
    /// A captured epoch that will never be committed (failed, timed out or aborted).
    EpochDropped {
        epoch: Epoch,
        reason: String,
    },
    EpochCommitted {
        epoch: Epoch,
    },
    /// A device failed the commit of `epoch` and survives (its guest saw I/O errors).
    CommitFailed {
        device: DeviceId,
        epoch: Epoch,
        error: String,
    },
    /// The commit of `epoch` ended with at least one device failing it: not counted committed.
    EpochCommitFailed {
        epoch: Epoch,
    },
    /// A newer coordinator fenced this one.
    Deposed {
        device: DeviceId,
        error: String,
    },
    /// The etcd lease was lost: deposed.
    LeaseLost {
        error: String,
    },
    DeviceFailed {
        device: DeviceId,
        error: String,
    },
    VmControlFailed {
        error: String,
    },
}

/// An action for the I/O shell.
#[derive(Clone, Debug)]
pub enum Action {
    /// Pause the VM; answer with `VmPaused`.
    PauseVm,
    /// `SEAL generation epoch` to each device; answer with `Sealed`/`SealFailed` per device.
    SealAll {
        generation: Generation,
        epoch: Epoch,
        devices: Vec<DeviceId>,
    },
    /// Take checkpoint `epoch`; answer with `Captured`, later `Acked` or `CheckpointFailed`.
    StartCheckpoint {
        epoch: Epoch,
        states: Vec<TransactionState>,
    },
    /// The checkpoint timed out; stop it if possible (its late result is ignored anyway).
    CancelCheckpoint {
        epoch: Epoch,
    },
    /// Resume the VM; answer with `VmResumed`.
    ResumeVm,
    /// `COMMIT generation epoch` to each device; answer with `Committed`/`CommitFailed`.
    Commit {
        generation: Generation,
        epoch: Epoch,
        devices: Vec<DeviceId>,
    },
    /// Stop the VM after a failure or an abort (no answer expected).
    StopVm,
    /// `ABORT generation` to every device.
    AbortAll {
        generation: Generation,
    },
    Record(Sample),
    Report(Event),
}

#[derive(Clone, Debug)]
enum Phase {
    Idle,
    Pausing {
        epoch: Epoch,
        started: Instant,
    },
    Sealing {
        epoch: Epoch,
        started: Instant,
        waiting: Vec<DeviceId>,
        sealed: Vec<DeviceId>,
        states: Vec<TransactionState>,
        error: Option<String>,
    },
    Capturing {
        epoch: Epoch,
        devices: Vec<DeviceId>,
        sealed_at: Instant,
        started: Instant,
        deadline: Instant,
    },
    Resuming,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum AckState {
    Waiting,
    Acked,
    Failed(String),
}

#[derive(Clone, Debug)]
struct PendingEpoch {
    epoch: Epoch,
    devices: Vec<DeviceId>,
    sealed_at: Instant,
    checkpoint_started: Instant,
    deadline: Instant,
    ack: AckState,
}

#[derive(Clone, Debug)]
struct InFlightCommit {
    epoch: Epoch,
    sealed_at: Instant,
    sent: Instant,
    waiting: Vec<DeviceId>,
    /// A device failed it (or was lost before answering): not counted as committed.
    failed: bool,
}

#[derive(Clone, Debug, Default)]
struct DeviceState {
    connected: bool,
    /// Why the device stopped the cycle, until the operator resumes.
    failure: Option<String>,
    commits_failed: u64,
}

/// Per-device part of [`CycleStatus`].
#[derive(Clone, Debug, Serialize)]
pub struct DeviceCycleStatus {
    pub connected: bool,
    pub failure: Option<String>,
    pub commits_failed: u64,
}

/// A snapshot for `ftctl status` and metrics.
#[derive(Clone, Debug, Serialize)]
pub struct CycleStatus {
    pub generation: Generation,
    pub phase: &'static str,
    pub next_epoch: Epoch,
    pub last_sealed: Option<Epoch>,
    pub last_committed: Option<Epoch>,
    pub epochs_sealed: u64,
    pub epochs_committed: u64,
    pub epochs_dropped: u64,
    /// Commits that at least one device failed or refused.
    pub epochs_commit_failed: u64,
    pub awaiting_ack: usize,
    pub commit_in_flight: Option<Epoch>,
    pub last_commit_latency_us: Option<u64>,
    pub checkpointer_last_error: Option<String>,
    pub paused: bool,
    pub halted: Option<String>,
    pub deposed: bool,
    pub vm_stopped: bool,
    pub devices: Vec<DeviceCycleStatus>,
}

/// The cycle state machine. See the module docs.
#[derive(Debug)]
pub struct Cycle {
    cfg: CycleConfig,
    generation: Generation,
    next_epoch: Epoch,
    phase: Phase,
    devices: Vec<DeviceState>,
    pending: VecDeque<PendingEpoch>,
    commit: Option<InFlightCommit>,
    last_cut: Option<Instant>,
    /// Newest epoch with output reported pending.
    output_pending: Option<Epoch>,
    cut_requested: bool,
    paused: bool,
    halted: Option<String>,
    /// The halt came from device failures (not from VM control), so a reconnect may clear it.
    device_halt: bool,
    deposed: bool,
    winding_down: bool,
    vm_stopped: bool,
    last_sealed: Option<Epoch>,
    last_committed: Option<Epoch>,
    epochs_sealed: u64,
    epochs_committed: u64,
    epochs_dropped: u64,
    epochs_commit_failed: u64,
    last_commit_latency: Option<Duration>,
    checkpointer_last_error: Option<String>,
}

impl Cycle {
    /// A cycle for `devices` devices (all disconnected until `DeviceConnected`), starting at
    /// epoch 1 or later as the devices report.
    pub fn new(cfg: CycleConfig, generation: Generation, devices: usize) -> Cycle {
        Cycle {
            cfg,
            generation,
            next_epoch: Epoch::FIRST,
            phase: Phase::Idle,
            devices: vec![DeviceState::default(); devices],
            pending: VecDeque::new(),
            commit: None,
            last_cut: None,
            output_pending: None,
            cut_requested: false,
            paused: false,
            halted: None,
            device_halt: false,
            deposed: false,
            winding_down: false,
            vm_stopped: false,
            last_sealed: None,
            last_committed: None,
            epochs_sealed: 0,
            epochs_committed: 0,
            epochs_dropped: 0,
            epochs_commit_failed: 0,
            last_commit_latency: None,
            checkpointer_last_error: None,
        }
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// No cut is in progress (the VM is not paused by the cycle).
    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }

    fn wind_down(&mut self, out: &mut Vec<Action>) {
        self.paused = true;
        self.winding_down = true;
        match self.phase {
            Phase::Capturing { epoch, .. } => {
                out.push(Action::CancelCheckpoint { epoch });
                self.epochs_dropped += 1;
                self.resume_vm_unless_halted(out);
            }
            // A seal in flight finishes in `finish_sealing`; pausing and resuming are
            // answered synchronously by the shell.
            Phase::Idle | Phase::Sealing { .. } | Phase::Pausing { .. } | Phase::Resuming => {}
        }
    }

    /// Feeds one input at time `now`; actions are appended to `out` in execution order.
    pub fn handle(&mut self, now: Instant, input: Input, out: &mut Vec<Action>) {
        match input {
            Input::Tick => {}
            Input::OutputPending { epoch, .. } => {
                // A notification for an epoch already sealed crossed our SEAL: ignore it.
                if epoch >= self.next_epoch {
                    self.output_pending = self.output_pending.max(Some(epoch));
                }
            }
            Input::CutNow => self.cut_requested = true,
            Input::Pause => self.paused = true,
            Input::Resume => self.resume(out),
            Input::VmPaused(r) => self.vm_paused(r, out),
            Input::CutAbandoned { error } => self.cut_abandoned(error, out),
            Input::VmResumed(r) => self.vm_resumed(r, out),
            Input::Sealed {
                device,
                epoch,
                state,
            } => self.sealed(now, device, epoch, Ok(state), out),
            Input::SealFailed {
                device,
                epoch,
                error,
            } => self.sealed(now, device, epoch, Err(error), out),
            Input::Captured { epoch } => self.captured(epoch, out),
            Input::Acked { epoch } => self.acked(now, epoch, out),
            Input::CheckpointFailed { epoch, error } => self.checkpoint_failed(epoch, error, out),
            Input::Committed { device, epoch, .. } => self.commit_reply(now, device, epoch, out),
            Input::CommitFailed {
                device,
                epoch,
                error,
                device_failed,
            } => {
                // Only an answer we wait for counts: a device already reported lost (and so
                // no longer awaited) must not be failed twice.
                let awaited = match &mut self.commit {
                    Some(c) if c.epoch == epoch && c.waiting.contains(&device) => {
                        c.failed = true;
                        true
                    }
                    _ => false,
                };
                if awaited {
                    if let Some(d) = self.devices.get_mut(device) {
                        d.commits_failed += 1;
                    }
                    let error = format!("commit of epoch {epoch} failed: {error}");
                    if device_failed {
                        self.device_failed(device, error, out);
                    } else {
                        out.push(Action::Report(Event::CommitFailed {
                            device,
                            epoch,
                            error,
                        }));
                    }
                    self.commit_reply(now, device, epoch, out);
                }
            }
            Input::Fenced { device, error } => self.fenced(device, error, out),
            Input::LeaseLost { error } => self.lease_lost(error, out),
            Input::DeviceLost { device, error } => {
                if let Some(d) = self.devices.get_mut(device) {
                    d.connected = false;
                }
                self.device_failed(device, format!("disconnected: {error}"), out);
                self.forget_device(now, device, out);
            }
            Input::DeviceConnected {
                device,
                open_epoch,
                output_pending,
            } => {
                if let Some(d) = self.devices.get_mut(device) {
                    d.connected = true;
                }
                // Seals made over the old connection may not exist in this incarnation of
                // the daemon (it may have restarted): don't COMMIT them to it. Skipping is
                // safe, the next epoch it seals and commits releases everything older.
                for p in &mut self.pending {
                    p.devices.retain(|d| *d != device);
                }
                // Never seal below what a device already has open (a restarted coordinator).
                self.next_epoch = self.next_epoch.max(open_epoch);
                if output_pending {
                    self.output_pending = self.output_pending.max(Some(self.next_epoch));
                }
                if self.cfg.on_device_failure == FailurePolicy::Continue && self.device_halt {
                    // `continue`: the failed devices are back; carry on without the operator.
                    self.clear_device_halt();
                }
            }
            Input::Abort { generation } => self.abort(generation, out),
            Input::WindDown => self.wind_down(out),
        }
        self.expire(now, out);
        self.try_commit(now, out);
        self.maybe_cut(now, out);
    }

    /// When the shell must feed a `Tick` at the latest (None: only on events).
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut d: Option<Instant> = None;
        let mut consider = |t: Instant| d = Some(d.map_or(t, |x| x.min(t)));
        if let Phase::Capturing { deadline, .. } = self.phase {
            consider(deadline);
        }
        if let Some(p) = self.pending.iter().find(|p| p.ack == AckState::Waiting) {
            consider(p.deadline);
        }
        if self.can_cut() {
            if let Some(t) = self.next_cut_time(now) {
                consider(t);
            }
        }
        d
    }

    pub fn status(&self) -> CycleStatus {
        CycleStatus {
            generation: self.generation,
            phase: match self.phase {
                Phase::Idle => "idle",
                Phase::Pausing { .. } => "pausing",
                Phase::Sealing { .. } => "sealing",
                Phase::Capturing { .. } => "capturing",
                Phase::Resuming => "resuming",
            },
            next_epoch: self.next_epoch,
            last_sealed: self.last_sealed,
            last_committed: self.last_committed,
            epochs_sealed: self.epochs_sealed,
            epochs_committed: self.epochs_committed,
            epochs_dropped: self.epochs_dropped,
            epochs_commit_failed: self.epochs_commit_failed,
            awaiting_ack: self.pending.len(),
            commit_in_flight: self.commit.as_ref().map(|c| c.epoch),
            last_commit_latency_us: self.last_commit_latency.map(|d| d.as_micros() as u64),
            checkpointer_last_error: self.checkpointer_last_error.clone(),
            paused: self.paused,
            halted: self.halted.clone(),
            deposed: self.deposed,
            vm_stopped: self.vm_stopped,
            devices: self
                .devices
                .iter()
                .map(|d| DeviceCycleStatus {
                    connected: d.connected,
                    failure: d.failure.clone(),
                    commits_failed: d.commits_failed,
                })
                .collect(),
        }
    }

    fn can_cut(&self) -> bool {
        matches!(self.phase, Phase::Idle)
            && !self.paused
            && !self.deposed
            && self.halted.is_none()
            && !self.devices.is_empty()
            && self.devices.iter().all(|d| d.connected)
            && self.pending.len() < self.cfg.max_pending
    }

    /// Earliest time a cut is due given current triggers (`now` if one is due already).
    fn next_cut_time(&self, now: Instant) -> Option<Instant> {
        let Some(last) = self.last_cut else {
            return Some(now);
        };
        if self.cut_requested {
            return Some(now);
        }
        let mut t = self.cfg.interval.map(|i| last + i);
        if let (Some(min), Some(p)) = (self.cfg.min_interval, self.output_pending) {
            if p >= self.next_epoch {
                let e = last + min;
                t = Some(t.map_or(e, |x| x.min(e)));
            }
        }
        t
    }

    fn maybe_cut(&mut self, now: Instant, out: &mut Vec<Action>) {
        let due = self.next_cut_time(now).is_some_and(|t| t <= now);
        if !due || !self.can_cut() {
            return;
        }
        let epoch = self.next_epoch;
        if epoch.next() == epoch {
            self.halted = Some("epoch numbers exhausted".into());
            return;
        }
        self.cut_requested = false;
        if let Some(last) = self.last_cut {
            out.push(Action::Record(Sample::CutToCut(
                now.saturating_duration_since(last),
            )));
        }
        self.last_cut = Some(now);
        self.phase = Phase::Pausing {
            epoch,
            started: now,
        };
        out.push(Action::PauseVm);
    }

    fn cut_abandoned(&mut self, error: String, out: &mut Vec<Action>) {
        let Phase::Pausing { epoch, .. } = self.phase else {
            return;
        };
        // The epoch number was not consumed: nothing was sealed, the next cut reuses it.
        self.phase = Phase::Idle;
        self.checkpointer_last_error = Some(format!("epoch {epoch}: {error}"));
        out.push(Action::Report(Event::CheckpointFailed { epoch, error }));
    }

    fn vm_paused(&mut self, r: Result<(), String>, out: &mut Vec<Action>) {
        let Phase::Pausing { epoch, started } = self.phase else {
            return;
        };
        if self.deposed {
            self.phase = Phase::Idle;
            return;
        }
        if let Err(error) = r {
            // No pause, no cut: a checkpoint of a running VM is not consistent.
            self.phase = Phase::Idle;
            self.halted = Some(format!("cannot pause the VM: {error}"));
            out.push(Action::Report(Event::VmControlFailed { error }));
            return;
        }
        self.vm_stopped = true;
        let devices: Vec<DeviceId> = (0..self.devices.len()).collect();
        // The epoch number is consumed now: daemons that seal it must never see it again.
        self.next_epoch = epoch.next();
        self.last_sealed = Some(epoch);
        self.epochs_sealed += 1;
        if self.output_pending.is_some_and(|p| p <= epoch) {
            self.output_pending = None;
        }
        self.phase = Phase::Sealing {
            epoch,
            started,
            waiting: devices.clone(),
            sealed: Vec::with_capacity(devices.len()),
            states: Vec::with_capacity(devices.len()),
            error: None,
        };
        out.push(Action::SealAll {
            generation: self.generation,
            epoch,
            devices,
        });
    }

    fn sealed(
        &mut self,
        now: Instant,
        device: DeviceId,
        e: Epoch,
        r: Result<TransactionState, String>,
        out: &mut Vec<Action>,
    ) {
        let Phase::Sealing {
            epoch,
            waiting,
            sealed,
            states,
            error,
            ..
        } = &mut self.phase
        else {
            return;
        };
        if *epoch != e || !waiting.contains(&device) {
            return;
        }
        waiting.retain(|d| *d != device);
        match r {
            Ok(s) => {
                sealed.push(device);
                states.push(s);
            }
            Err(msg) => {
                error.get_or_insert(format!("device {device}: {msg}"));
            }
        }
        self.finish_sealing(now, out);
    }

    fn finish_sealing(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Phase::Sealing {
            epoch,
            started,
            waiting,
            ..
        } = &self.phase
        else {
            return;
        };
        if !waiting.is_empty() {
            return;
        }
        let (epoch, started) = (*epoch, *started);
        let Phase::Sealing {
            sealed,
            states,
            error,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        out.push(Action::Record(Sample::Seal(
            now.saturating_duration_since(started),
        )));
        if self.deposed || self.winding_down {
            self.resume_vm_unless_halted(out);
            return;
        }
        if let Some(error) = error {
            // Protocol section 9 step 2: no checkpoint for E; the devices that sealed hold E
            // until a later acknowledged commit releases it.
            self.epochs_dropped += 1;
            out.push(Action::Report(Event::SealFailed { epoch, error }));
            self.resume_vm_unless_halted(out);
            return;
        }
        self.phase = Phase::Capturing {
            epoch,
            devices: sealed,
            sealed_at: started,
            started: now,
            deadline: now + self.cfg.checkpoint_timeout,
        };
        out.push(Action::StartCheckpoint { epoch, states });
    }

    fn resume_vm_unless_halted(&mut self, out: &mut Vec<Action>) {
        let keep_stopped = self.deposed
            || (self.halted.is_some() && self.cfg.on_device_failure == FailurePolicy::StopVm);
        if keep_stopped {
            self.phase = Phase::Idle;
            self.vm_stopped = true;
            out.push(Action::StopVm);
        } else {
            self.phase = Phase::Resuming;
            out.push(Action::ResumeVm);
        }
    }

    fn captured(&mut self, e: Epoch, out: &mut Vec<Action>) {
        let Phase::Capturing {
            epoch,
            sealed_at,
            started,
            deadline,
            ..
        } = self.phase
        else {
            return;
        };
        if epoch != e {
            return;
        }
        let Phase::Capturing { devices, .. } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        self.pending.push_back(PendingEpoch {
            epoch,
            devices,
            sealed_at,
            checkpoint_started: started,
            deadline,
            ack: AckState::Waiting,
        });
        self.resume_vm_unless_halted(out);
    }

    fn acked(&mut self, now: Instant, e: Epoch, out: &mut Vec<Action>) {
        // An acknowledgement implies the capture finished.
        if matches!(self.phase, Phase::Capturing { epoch, .. } if epoch == e) {
            self.captured(e, out);
        }
        if let Some(p) = self.pending.iter_mut().find(|p| p.epoch == e) {
            if p.ack == AckState::Waiting {
                p.ack = AckState::Acked;
                out.push(Action::Record(Sample::Checkpoint(
                    now.saturating_duration_since(p.checkpoint_started),
                )));
            }
        }
    }

    fn checkpoint_failed(&mut self, e: Epoch, error: String, out: &mut Vec<Action>) {
        if matches!(self.phase, Phase::Capturing { epoch, .. } if epoch == e) {
            self.phase = Phase::Idle;
            self.checkpointer_last_error = Some(format!("epoch {e}: {error}"));
            self.epochs_dropped += 1;
            out.push(Action::Report(Event::CheckpointFailed { epoch: e, error }));
            self.resume_vm_unless_halted(out);
            return;
        }
        if let Some(p) = self.pending.iter_mut().find(|p| p.epoch == e) {
            if p.ack == AckState::Waiting {
                self.checkpointer_last_error = Some(format!("epoch {e}: {error}"));
                out.push(Action::Report(Event::CheckpointFailed {
                    epoch: e,
                    error: error.clone(),
                }));
                p.ack = AckState::Failed(error);
            }
        }
    }

    /// Checkpoint timeouts: an epoch whose capture or acknowledgement is overdue fails.
    fn expire(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Phase::Capturing {
            epoch, deadline, ..
        } = self.phase
        {
            if now >= deadline {
                out.push(Action::CancelCheckpoint { epoch });
                self.checkpoint_failed(epoch, "checkpoint timed out".into(), out);
            }
        }
        let overdue: Vec<Epoch> = self
            .pending
            .iter()
            .filter(|p| p.ack == AckState::Waiting && now >= p.deadline)
            .map(|p| p.epoch)
            .collect();
        for epoch in overdue {
            out.push(Action::CancelCheckpoint { epoch });
            self.checkpoint_failed(epoch, "checkpoint acknowledgement timed out".into(), out);
        }
    }

    fn try_commit(&mut self, now: Instant, out: &mut Vec<Action>) {
        while self.commit.is_none() && !self.deposed {
            let Some(front) = self.pending.front() else {
                return;
            };
            match &front.ack {
                AckState::Waiting => return,
                AckState::Failed(reason) => {
                    let reason = reason.clone();
                    let epoch = front.epoch;
                    self.pending.pop_front();
                    self.epochs_dropped += 1;
                    out.push(Action::Report(Event::EpochDropped { epoch, reason }));
                }
                AckState::Acked => {
                    let Some(p) = self.pending.pop_front() else {
                        return;
                    };
                    // Only devices still connected can be told; a lost one holds its output.
                    let devices: Vec<DeviceId> = p
                        .devices
                        .iter()
                        .copied()
                        .filter(|d| self.devices.get(*d).is_some_and(|s| s.connected))
                        .collect();
                    self.commit = Some(InFlightCommit {
                        epoch: p.epoch,
                        sealed_at: p.sealed_at,
                        sent: now,
                        // A sealed device that is gone now keeps its output: not a full commit.
                        failed: devices.len() < p.devices.len(),
                        waiting: devices.clone(),
                    });
                    out.push(Action::Commit {
                        generation: self.generation,
                        epoch: p.epoch,
                        devices,
                    });
                    self.finish_commit(now, out);
                }
            }
        }
    }

    fn commit_reply(&mut self, now: Instant, device: DeviceId, e: Epoch, out: &mut Vec<Action>) {
        if let Some(c) = &mut self.commit {
            if c.epoch == e {
                c.waiting.retain(|d| *d != device);
            }
        }
        self.finish_commit(now, out);
    }

    fn finish_commit(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.commit.as_ref().is_some_and(|c| c.waiting.is_empty()) {
            return;
        }
        let Some(c) = self.commit.take() else {
            return;
        };
        let latency = now.saturating_duration_since(c.sent);
        self.last_commit_latency = Some(latency);
        if c.failed {
            self.epochs_commit_failed += 1;
            out.push(Action::Report(Event::EpochCommitFailed { epoch: c.epoch }));
            return;
        }
        self.last_committed = Some(c.epoch);
        self.epochs_committed += 1;
        out.push(Action::Record(Sample::Commit(latency)));
        out.push(Action::Record(Sample::SealToCommit(
            now.saturating_duration_since(c.sealed_at),
        )));
        out.push(Action::Report(Event::EpochCommitted { epoch: c.epoch }));
    }

    /// A lost device answers nothing more: stop waiting for it.
    fn forget_device(&mut self, now: Instant, device: DeviceId, out: &mut Vec<Action>) {
        if let Phase::Sealing { waiting, error, .. } = &mut self.phase {
            if waiting.contains(&device) {
                waiting.retain(|d| *d != device);
                error.get_or_insert(format!("device {device} disconnected"));
            }
        }
        self.finish_sealing(now, out);
        if let Some(c) = &mut self.commit {
            if c.waiting.contains(&device) {
                c.waiting.retain(|d| *d != device);
                c.failed = true;
            }
        }
        self.finish_commit(now, out);
    }

    fn device_failed(&mut self, device: DeviceId, error: String, out: &mut Vec<Action>) {
        if let Some(d) = self.devices.get_mut(device) {
            d.failure = Some(error.clone());
        }
        out.push(Action::Report(Event::DeviceFailed {
            device,
            error: error.clone(),
        }));
        if self.halted.is_none() {
            self.halted = Some(format!("device {device}: {error}"));
            self.device_halt = true;
            // Stop the VM now unless a cut in progress will do it on its way out.
            if self.cfg.on_device_failure == FailurePolicy::StopVm
                && matches!(self.phase, Phase::Idle)
                && !self.vm_stopped
            {
                self.vm_stopped = true;
                out.push(Action::StopVm);
            }
        }
    }

    fn resume(&mut self, out: &mut Vec<Action>) {
        self.paused = false;
        if self.deposed {
            return;
        }
        if self.halted.is_some() && self.devices.iter().all(|d| d.connected) {
            self.halted = None;
            self.device_halt = false;
            for d in &mut self.devices {
                d.failure = None;
            }
            if self.vm_stopped && matches!(self.phase, Phase::Idle) {
                self.phase = Phase::Resuming;
                out.push(Action::ResumeVm);
            }
        }
    }

    /// `continue` policy: a halt caused by device failures ends once every device is
    /// connected (a daemon that refused commits has restarted and reconnected).
    fn clear_device_halt(&mut self) {
        if self.deposed || !self.devices.iter().all(|d| d.connected) {
            return;
        }
        self.halted = None;
        self.device_halt = false;
        for d in &mut self.devices {
            d.failure = None;
        }
    }

    /// A newer coordinator fenced us: deposed, like an abort, but without `ABORT` (that is the
    /// new coordinator's to send, and ours would be fenced too).
    fn fenced(&mut self, device: DeviceId, error: String, out: &mut Vec<Action>) {
        if self.deposed {
            return;
        }
        out.push(Action::Report(Event::Deposed {
            device,
            error: error.clone(),
        }));
        self.halted = Some(format!(
            "deposed: device {device} answered FENCED ({error})"
        ));
        self.device_halt = false;
        self.depose(out);
        if !self.vm_stopped {
            self.vm_stopped = true;
            out.push(Action::StopVm);
        }
    }

    /// The etcd lease is gone: deposed like a fence, the VM stopped (the standby may take over
    /// once the lease expires on etcd).
    fn lease_lost(&mut self, error: String, out: &mut Vec<Action>) {
        if self.deposed {
            return;
        }
        out.push(Action::Report(Event::LeaseLost {
            error: error.clone(),
        }));
        self.halted = Some(format!("deposed: etcd lease lost ({error})"));
        self.device_halt = false;
        self.depose(out);
        if !self.vm_stopped {
            self.vm_stopped = true;
            out.push(Action::StopVm);
        }
    }

    /// Nothing of ours is sealed or committed again (the caller stops the VM).
    fn depose(&mut self, out: &mut Vec<Action>) {
        self.deposed = true;
        self.commit = None;
        for p in self.pending.drain(..) {
            self.epochs_dropped += 1;
            out.push(Action::Report(Event::EpochDropped {
                epoch: p.epoch,
                reason: "aborted".into(),
            }));
        }
        if let Phase::Capturing { epoch, .. } = self.phase {
            out.push(Action::CancelCheckpoint { epoch });
            self.epochs_dropped += 1;
            self.phase = Phase::Idle;
        }
    }

    fn vm_resumed(&mut self, r: Result<(), String>, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Resuming) {
            return;
        }
        self.phase = Phase::Idle;
        match r {
            Ok(()) => self.vm_stopped = false,
            Err(error) => {
                self.halted = Some(format!("cannot resume the VM: {error}"));
                out.push(Action::Report(Event::VmControlFailed { error }));
            }
        }
    }

    fn abort(&mut self, generation: Generation, out: &mut Vec<Action>) {
        if generation > self.generation {
            self.generation = generation;
        }
        self.depose(out);
        out.push(Action::AbortAll {
            generation: self.generation,
        });
        if !self.vm_stopped {
            self.vm_stopped = true;
            out.push(Action::StopVm);
        }
    }
}

#[cfg(test)]
mod tests;
