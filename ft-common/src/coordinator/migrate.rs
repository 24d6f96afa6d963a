// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `migrate:` checkpointer: every epoch's checkpoint is a real copy of the VM, taken with
//! QEMU's own migration and sent straight from QEMU to an `ft-standby`, which acknowledges it
//! once it is durable.
//!
//! `--checkpointer migrate:QMP_SOCKET,standby=ADDR[,mode=live|paused][,max-bandwidth=B/s]
//! [,downtime-ms=N][,converge-ms=N][,timeout-ms=N][,meta=FILE]`
//!
//! One checkpoint, live mode (default; capabilities `events` and `pause-before-switchover`):
//! `BEGIN` to the standby -> `migrate` to the standby's URI while the guest runs -> QEMU stops
//! the VM and reports `pre-switchover` -> `VmPaused` (the cycle SEALs every device) ->
//! `migrate-continue` -> `completed` -> `END` with the SEALED records -> `Captured` (the
//! cycle resumes the VM: `cont`) -> the standby answers `DURABLE` -> `Acked`.
//! Paused mode: `BEGIN` -> `stop` -> `VmPaused` -> SEAL -> `migrate` -> `completed` -> `END`
//! -> `Captured` -> `cont` -> `DURABLE` -> `Acked`.
//!
//! Invariants:
//! - `Acked E` only after the standby's `DURABLE E`. Every failure (standby unreachable or
//!   refusing, migration failed or cancelled, QEMU gone, a reply missing) ends in
//!   `CutAbandoned` (before the seal) or `CheckpointFailed E`, never in `Acked`.
//! - `Captured E` only after QEMU reported `completed`, and the VM is resumed (`cont`) only
//!   when no migration is active: a `cont` during a migration would silently turn the
//!   checkpoint into a live migration that no longer matches the SEAL.
//! - One capture at a time: a single worker thread runs captures in order; the next cut
//!   starts after the previous checkpoint is durable (or failed). Cuts requested meanwhile
//!   wait in the cycle (it cuts only when idle), so they merge into the next capture.
//! - The checkpoint's stream never lands on the primary's disk: QEMU writes it into the
//!   standby's socket.

use super::checkpointer::{Checkpointer, Sink};
use super::cycle::Input;
use super::qmp::{QmpClient, QmpError};
use super::telemetry::Latency;
use crate::control::message::TransactionState;
use crate::epoch::{Epoch, Generation};
use crate::standby::client::StandbyClient;
use crate::standby::protocol::{StandbyAddr, StandbyReply, StandbyRequest};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Live (pre-copy while the guest runs, pause at the switchover) or paused (stop, copy all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    Live,
    Paused,
}

impl CaptureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMode::Live => "live",
            CaptureMode::Paused => "paused",
        }
    }
}

/// Default `downtime-limit`: QEMU's own 300 ms let the live mode pause the VM for ~180 ms per
/// checkpoint (p50, 320 MiB guest running fio under TCG); 20 ms measured 17 ms.
pub const DEFAULT_DOWNTIME_MS: u64 = 20;

/// Parsed `migrate:` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateOptions {
    pub qmp: PathBuf,
    pub standby: StandbyAddr,
    pub mode: CaptureMode,
    /// `max-bandwidth` in bytes/s (QEMU's default of 128 MiB/s makes every copy slow).
    pub max_bandwidth: u64,
    /// `downtime-limit` in ms (live mode: how much may be left for the switchover);
    /// [`DEFAULT_DOWNTIME_MS`] unless given.
    pub downtime_ms: Option<u64>,
    /// Live mode: if the pre-copy has not reached its switchover after this long, `stop` the
    /// VM so it must (a guest dirtying memory faster than it is copied never converges).
    pub converge_after: Duration,
    /// Bound on each wait: a migration phase, a standby reply.
    pub timeout: Duration,
    /// JSON text attached to every checkpoint's manifest as `meta`.
    pub meta: Option<String>,
}

impl MigrateOptions {
    /// Parses what follows `migrate:`.
    pub fn parse(s: &str) -> Result<MigrateOptions, String> {
        let mut parts = s.split(',');
        let qmp = parts.next().unwrap_or("");
        if qmp.is_empty() {
            return Err("migrate: needs the QMP socket path".into());
        }
        let mut o = MigrateOptions {
            qmp: qmp.into(),
            standby: StandbyAddr::Unix(PathBuf::new()),
            mode: CaptureMode::Live,
            max_bandwidth: 16 << 30,
            downtime_ms: Some(DEFAULT_DOWNTIME_MS),
            converge_after: Duration::from_secs(3),
            timeout: Duration::from_secs(30),
            meta: None,
        };
        let mut standby = None;
        let num = |k: &str, v: &str| {
            v.parse::<u64>()
                .map_err(|e| format!("migrate option {k}={v}: {e}"))
        };
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| format!("migrate option {p:?}: expected KEY=VALUE"))?;
            match k {
                "standby" => standby = Some(v.parse::<StandbyAddr>()?),
                "mode" => {
                    o.mode = match v {
                        "live" => CaptureMode::Live,
                        "paused" => CaptureMode::Paused,
                        _ => return Err(format!("migrate mode {v:?}: expected live or paused")),
                    }
                }
                "max-bandwidth" => o.max_bandwidth = num(k, v)?.max(1),
                "downtime-ms" => o.downtime_ms = Some(num(k, v)?),
                "converge-ms" => o.converge_after = Duration::from_millis(num(k, v)?),
                "timeout-ms" => o.timeout = Duration::from_millis(num(k, v)?.max(1)),
                "meta" => {
                    let text = std::fs::read_to_string(v)
                        .map_err(|e| format!("migrate meta file {v}: {e}"))?;
                    serde_json::from_str::<Value>(&text)
                        .map_err(|e| format!("migrate meta file {v}: not JSON: {e}"))?;
                    o.meta = Some(text);
                }
                _ => return Err(format!("unknown migrate option {k:?}")),
            }
        }
        o.standby = standby.ok_or("migrate: needs standby=tcp:HOST:PORT or standby=unix:PATH")?;
        Ok(o)
    }
}

/// The most recent checkpoint, for `ftctl status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LastCheckpoint {
    pub epoch: Epoch,
    pub vm_pause_us: Option<u64>,
    pub capture_us: u64,
    pub bytes: u64,
    pub standby_fsync_us: u64,
    pub ack_after_capture_us: u64,
}

/// Per-checkpoint measurements.
#[derive(Clone, Debug, Default)]
pub struct MigrateStats {
    /// VM stopped (pre-switchover or `stop`) to `cont` returned.
    pub pause: Latency,
    /// `migrate` issued to `completed`.
    pub capture: Latency,
    /// The standby's fsync/publish time.
    pub fsync: Latency,
    /// `completed` to `DURABLE`.
    pub ack: Latency,
    pub bytes_total: u64,
    pub durable: u64,
    pub failed: u64,
    pub abandoned: u64,
    pub newest_durable: Option<Epoch>,
    pub last: Option<LastCheckpoint>,
    pub last_error: Option<String>,
    /// When the VM stopped for the capture in progress (read by `resume_vm`).
    paused_at: Option<Instant>,
    /// The pause `resume_vm` measured, for the checkpoint still waiting for `DURABLE`.
    pause_of_pending: Option<u64>,
}

enum Cmd {
    Cut(Generation),
    Capture {
        generation: Generation,
        epoch: Epoch,
        states: Vec<TransactionState>,
    },
}

/// QMP session shared by the worker (migration) and the cycle's thread (stop/cont); each
/// holds it only for one command or one short event wait.
struct QmpLink {
    socket: PathBuf,
    timeout: Duration,
    client: Option<QmpClient>,
}

impl QmpLink {
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut QmpClient) -> Result<T, QmpError>,
    ) -> Result<T, String> {
        if self.client.is_none() {
            let c = QmpClient::connect(&self.socket, self.timeout)
                .map_err(|e| format!("QMP {}: {e}", self.socket.display()))?;
            self.client = Some(c);
        }
        let Some(c) = self.client.as_mut() else {
            return Err("QMP not connected".into());
        };
        let r = f(c);
        if let Err(QmpError::Io(_) | QmpError::Protocol(_)) = &r {
            self.client = None;
        }
        r.map_err(|e| e.to_string())
    }
}

struct Shared {
    qmp: Mutex<QmpLink>,
    stats: Mutex<MigrateStats>,
    /// Set by `cancel`; the worker abandons the capture in progress at its next check.
    cancel: AtomicBool,
}

/// See the module docs.
pub struct MigrateCheckpointer {
    opts: MigrateOptions,
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<Cmd>>,
    sink: Sink,
}

/// Statuses of `query-migrate` during which a migration is still running.
fn active(status: &str) -> bool {
    matches!(
        status,
        "setup"
            | "active"
            | "pre-switchover"
            | "device"
            | "cancelling"
            | "wait-unplug"
            | "postcopy-active"
            | "postcopy-paused"
            | "postcopy-recover"
    )
}

fn query_migrate(c: &mut QmpClient) -> Result<Value, QmpError> {
    c.execute("query-migrate")
}

fn status_of(v: &Value) -> String {
    v.get("status")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string()
}

/// Cancels a running migration and waits until QEMU says it is over.
fn cancel_migration(link: &mut QmpLink, timeout: Duration) -> Result<(), String> {
    let st = link.with(query_migrate)?;
    if !active(&status_of(&st)) {
        return Ok(());
    }
    link.with(|c| c.execute("migrate_cancel"))?;
    let end = Instant::now() + timeout;
    loop {
        let st = link.with(query_migrate)?;
        if !active(&status_of(&st)) {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(format!(
                "migration still {} after migrate_cancel",
                status_of(&st)
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until QEMU left `finish-migrate`: `completed` is reported before the migration's
/// cleanup moves the VM to `postmigrate`, and `cont` is refused until then ("Migration is not
/// finalized yet").
fn wait_finalized(link: &mut QmpLink, timeout: Duration) -> Result<(), String> {
    let end = Instant::now() + timeout;
    loop {
        let st = link.with(|c| c.execute("query-status"))?;
        if st.get("status").and_then(Value::as_str) != Some("finish-migrate") {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err("VM still in finish-migrate".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl MigrateCheckpointer {
    pub fn new(opts: MigrateOptions, sink: Sink) -> MigrateCheckpointer {
        let shared = Arc::new(Shared {
            qmp: Mutex::new(QmpLink {
                socket: opts.qmp.clone(),
                timeout: Duration::from_secs(5),
                client: None,
            }),
            stats: Mutex::new(MigrateStats::default()),
            cancel: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            opts: opts.clone(),
            shared: shared.clone(),
            sink: sink.clone(),
            standby: StandbyClient::new(opts.standby.clone(), opts.timeout),
            cut: None,
            last_failure: None,
        };
        let tx = match std::thread::Builder::new()
            .name("ft-migrate-ckpt".into())
            .spawn(move || worker.run(rx))
        {
            Ok(_) => Some(tx),
            Err(e) => {
                log::error!("migrate checkpointer: cannot start its worker: {e}");
                None
            }
        };
        MigrateCheckpointer {
            opts,
            shared,
            tx,
            sink,
        }
    }

    fn qmp<T>(&self, f: impl FnOnce(&mut QmpLink) -> Result<T, String>) -> Result<T, String> {
        let mut l = self
            .shared
            .qmp
            .lock()
            .map_err(|_| "QMP link poisoned".to_string())?;
        f(&mut l)
    }

    fn send(&self, cmd: Cmd) -> bool {
        self.tx.as_ref().is_some_and(|t| t.send(cmd).is_ok())
    }
}

impl Checkpointer for MigrateCheckpointer {
    fn describe(&self) -> String {
        format!(
            "migrate:{} standby={} mode={}",
            self.opts.qmp.display(),
            self.opts.standby,
            self.opts.mode.as_str()
        )
    }

    /// Stops the VM outside a cut (failure policy, abort): any migration in progress is
    /// cancelled first, so nothing of it can complete afterwards.
    fn pause_vm(&mut self) -> Result<(), String> {
        let t = self.opts.timeout;
        self.qmp(|l| {
            cancel_migration(l, t)?;
            wait_finalized(l, t)?;
            l.with(QmpClient::stop)
        })
    }

    fn resume_vm(&mut self) -> Result<(), String> {
        let t = self.opts.timeout;
        let r = self.qmp(|l| {
            // Never `cont` during an active migration (see the module invariants).
            cancel_migration(l, t)?;
            wait_finalized(l, t)?;
            l.with(QmpClient::cont)
        });
        if let Ok(mut s) = self.shared.stats.lock() {
            if let Some(at) = s.paused_at.take() {
                if r.is_ok() {
                    let d = at.elapsed();
                    s.pause.record(d);
                    s.pause_of_pending = Some(d.as_micros() as u64);
                }
            }
        }
        r
    }

    fn begin_cut(&mut self, generation: Generation) -> Option<Result<(), String>> {
        self.shared.cancel.store(false, Ordering::Release);
        if self.send(Cmd::Cut(generation)) {
            None
        } else {
            Some(Err("migrate checkpointer worker stopped".into()))
        }
    }

    fn start(&mut self, generation: Generation, epoch: Epoch, states: Vec<TransactionState>) {
        if !self.send(Cmd::Capture {
            generation,
            epoch,
            states,
        }) {
            (self.sink)(Input::CheckpointFailed {
                epoch,
                error: "migrate checkpointer worker stopped".into(),
            });
        }
    }

    fn cancel(&mut self, _epoch: Epoch) {
        self.shared.cancel.store(true, Ordering::Release);
    }

    fn status(&self) -> Option<Value> {
        let s = self.shared.stats.lock().ok()?;
        Some(json!({
            "mode": self.opts.mode.as_str(),
            "standby": self.opts.standby.to_string(),
            "newest_durable_epoch": s.newest_durable,
            "checkpoints_durable": s.durable,
            "checkpoints_failed": s.failed,
            "cuts_abandoned": s.abandoned,
            "bytes_total": s.bytes_total,
            "last": s.last,
            "last_error": s.last_error,
            "vm_pause": s.pause.summary(),
            "capture": s.capture.summary(),
            "standby_fsync": s.fsync.summary(),
            "completed_to_durable": s.ack.summary(),
        }))
    }

    fn render_metrics(&self, out: &mut String) {
        let Ok(s) = self.shared.stats.lock() else {
            return;
        };
        use super::metrics::{scalar, summary};
        summary(
            out,
            "ft_checkpoint_vm_pause_seconds",
            "VM paused per checkpoint (stop or pre-switchover to cont).",
            "",
            &s.pause,
            true,
        );
        summary(
            out,
            "ft_checkpoint_capture_seconds",
            "migrate issued to completed.",
            "",
            &s.capture,
            true,
        );
        summary(
            out,
            "ft_checkpoint_standby_fsync_seconds",
            "Standby fsync and publish time per checkpoint.",
            "",
            &s.fsync,
            true,
        );
        scalar(
            out,
            "ft_checkpoint_bytes_total",
            "counter",
            "Migration stream bytes stored by the standby.",
            &[(String::new(), s.bytes_total as f64)],
        );
        scalar(
            out,
            "ft_checkpoint_last_bytes",
            "gauge",
            "Stream bytes of the newest durable checkpoint.",
            &[(
                String::new(),
                s.last.as_ref().map_or(0.0, |l| l.bytes as f64),
            )],
        );
        scalar(
            out,
            "ft_checkpoint_newest_durable_epoch",
            "gauge",
            "Epoch of the newest checkpoint the standby holds durably (0: none).",
            &[(String::new(), s.newest_durable.map_or(0.0, |e| e.0 as f64))],
        );
        scalar(
            out,
            "ft_checkpoints_total",
            "counter",
            "Checkpoints by outcome.",
            &[
                ("result=\"durable\"".into(), s.durable as f64),
                ("result=\"failed\"".into(), s.failed as f64),
                ("result=\"abandoned\"".into(), s.abandoned as f64),
            ],
        );
    }
}

/// The cut in progress between `Cut` and `Capture`.
struct CutState {
    generation: Generation,
    /// Live mode: when `migrate` was issued.
    migrate_at: Option<Instant>,
}

struct Worker {
    opts: MigrateOptions,
    shared: Arc<Shared>,
    sink: Sink,
    standby: StandbyClient,
    cut: Option<CutState>,
    last_failure: Option<Instant>,
}

/// Minimum time between a failed capture and the next attempt (no busy retry loop against a
/// dead standby; the cycle's cut triggers merge meanwhile).
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// Slice of one QMP event wait (the lock is released between slices).
const EVENT_SLICE: Duration = Duration::from_millis(20);

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        while let Ok(cmd) = rx.recv() {
            match cmd {
                Cmd::Cut(g) => {
                    if let Some(t) = self.last_failure {
                        std::thread::sleep(RETRY_BACKOFF.saturating_sub(t.elapsed()));
                    }
                    match self.cut(g) {
                        Ok(()) => (self.sink)(Input::VmPaused(Ok(()))),
                        Err(error) => {
                            self.failed(&error, true);
                            (self.sink)(Input::CutAbandoned { error });
                        }
                    }
                }
                Cmd::Capture {
                    generation,
                    epoch,
                    states,
                } => self.capture(generation, epoch, states),
            }
        }
    }

    fn failed(&mut self, error: &str, abandoned: bool) {
        self.last_failure = Some(Instant::now());
        log::warn!("migrate checkpointer: {error}");
        if let Ok(mut s) = self.shared.stats.lock() {
            if abandoned {
                s.abandoned += 1;
            } else {
                s.failed += 1;
            }
            s.last_error = Some(error.to_string());
        }
    }

    fn qmp<T>(&self, f: impl FnOnce(&mut QmpClient) -> Result<T, QmpError>) -> Result<T, String> {
        let mut l = self
            .shared
            .qmp
            .lock()
            .map_err(|_| "QMP link poisoned".to_string())?;
        l.with(f)
    }

    /// Drops the standby's checkpoint in progress; returns the standby's own error, if any.
    fn standby_cancel(&mut self, reason: &str) -> Option<String> {
        let r = self.standby.call(&StandbyRequest::Cancel {
            reason: reason.to_string(),
        });
        match r {
            Ok(StandbyReply::Cancelled { standby_error }) => standby_error,
            Ok(_) | Err(_) => {
                // Whatever it said, a fresh connection makes it discard the checkpoint.
                self.standby.disconnect();
                None
            }
        }
    }

    /// Ends a failed cut or capture: migration cancelled, standby told, the VM left running
    /// if it was running before the cut. Returns the error with the standby's reason added.
    fn abandon(&mut self, error: String) -> String {
        let t = self.opts.timeout;
        let cancelled = self
            .shared
            .qmp
            .lock()
            .map_err(|_| "QMP link poisoned".to_string())
            .and_then(|mut l| cancel_migration(&mut l, t));
        let mut error = error;
        if let Some(se) = self.standby_cancel(&error) {
            error = format!("{error}; standby: {se}");
        }
        if let Err(e) = cancelled {
            error = format!("{error}; {e}");
        }
        self.cut = None;
        error
    }

    fn cut(&mut self, generation: Generation) -> Result<(), String> {
        if self.cut.take().is_some() {
            // The previous cut never reached its capture (its seal failed): drop it.
            let _ = self.abandon("superseded by a new cut".into());
        }
        match self.standby.call(&StandbyRequest::Begin { generation }) {
            Ok(StandbyReply::Ready { .. }) => {}
            Ok(StandbyReply::Refused { reason }) => {
                return Err(format!("standby {} refused: {reason}", self.opts.standby))
            }
            Ok(other) => {
                self.standby.disconnect();
                return Err(format!("standby: unexpected reply {other:?}"));
            }
            Err(e) => return Err(e),
        }
        self.cut = Some(CutState {
            generation,
            migrate_at: None,
        });
        let live = self.opts.mode == CaptureMode::Live;
        let setup = self.qmp(|c| {
            let st = query_migrate(c)?;
            if active(&status_of(&st)) {
                return Err(QmpError::Protocol(format!(
                    "a migration is already {} (not ours?)",
                    status_of(&st)
                )));
            }
            c.execute_with(
                "migrate-set-capabilities",
                json!({"capabilities": [
                    {"capability": "events", "state": true},
                    {"capability": "pause-before-switchover", "state": live},
                ]}),
            )?;
            let mut p = json!({"max-bandwidth": self.opts.max_bandwidth});
            if let Some(d) = self.opts.downtime_ms {
                p["downtime-limit"] = json!(d);
            }
            c.execute_with("migrate-set-parameters", p)?;
            Ok(())
        });
        if let Err(e) = setup {
            return Err(self.abandon(e));
        }
        if !live {
            let r = self.qmp(QmpClient::stop);
            if let Err(e) = r {
                return Err(self.abandon(e));
            }
            self.mark_paused();
            return Ok(());
        }
        let uri = self.opts.standby.to_string();
        let started = Instant::now();
        // Events of earlier migrations (a `cancelled` from the last failure) must not end
        // this one.
        let r = self.qmp(|c| {
            c.clear_events();
            c.execute_with("migrate", json!({"uri": uri}))
        });
        if let Err(e) = r {
            return Err(self.abandon(e));
        }
        if let Some(c) = self.cut.as_mut() {
            c.migrate_at = Some(started);
        }
        let mut forced = false;
        let r = self.wait_status(&["pre-switchover"], |w| {
            if !forced && started.elapsed() >= w.opts.converge_after {
                forced = true;
                log::warn!(
                    "live capture has not converged after {} ms: stopping the VM to finish it",
                    w.opts.converge_after.as_millis()
                );
                w.mark_paused();
                w.qmp(QmpClient::stop).map(drop)
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => {
                if !forced {
                    self.mark_paused();
                }
                Ok(())
            }
            Err(e) => {
                let e = self.abandon(e);
                // A forced stop (or QEMU itself) may have left the VM paused: it ran before
                // the cut, so it runs again.
                let _ = self.qmp(|c| {
                    if !c.running()? {
                        c.cont()?;
                    }
                    Ok(())
                });
                if let Ok(mut s) = self.shared.stats.lock() {
                    s.paused_at = None;
                }
                Err(e)
            }
        }
    }

    fn mark_paused(&self) {
        if let Ok(mut s) = self.shared.stats.lock() {
            s.paused_at = Some(Instant::now());
        }
    }

    /// Waits for a MIGRATION status in `want`; `failed`/`cancelled`, a cancel request, QMP
    /// errors and the timeout are errors. `tick` runs between slices.
    fn wait_status(
        &mut self,
        want: &[&str],
        mut tick: impl FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        let end = Instant::now() + self.opts.timeout;
        let mut last_poll = Instant::now();
        loop {
            if self.shared.cancel.load(Ordering::Acquire) {
                return Err("cancelled (checkpoint timeout or shutdown)".into());
            }
            // Events first; a poll of query-migrate now and then covers a lost event (a
            // reconnected QMP session, an event consumed by another command).
            let ev = self.qmp(|c| c.next_event(EVENT_SLICE))?;
            let mut status = ev.and_then(|e| {
                (e.get("event").and_then(Value::as_str) == Some("MIGRATION"))
                    .then(|| e["data"]["status"].as_str().map(str::to_string))
                    .flatten()
            });
            if status.is_none() && last_poll.elapsed() >= Duration::from_millis(200) {
                last_poll = Instant::now();
                status = Some(status_of(&self.qmp(query_migrate)?));
            }
            if let Some(s) = status {
                if want.contains(&s.as_str()) {
                    return Ok(());
                }
                if s == "failed" || s == "cancelled" || s == "none" {
                    let desc = self
                        .qmp(query_migrate)
                        .ok()
                        .and_then(|v| {
                            v.get("error-desc")
                                .and_then(Value::as_str)
                                .map(String::from)
                        })
                        .unwrap_or_default();
                    return Err(format!("migration {s}: {desc}"));
                }
                if s == "completed" {
                    return Err(format!("migration completed while waiting for {want:?}"));
                }
            }
            if Instant::now() >= end {
                return Err(format!(
                    "migration did not reach {want:?} within {} ms",
                    self.opts.timeout.as_millis()
                ));
            }
            tick(self)?;
        }
    }

    fn capture(&mut self, generation: Generation, epoch: Epoch, states: Vec<TransactionState>) {
        let r = self.capture_inner(generation, epoch, states);
        if let Err(error) = r {
            let error = self.abandon(error);
            self.failed(&format!("epoch {epoch}: {error}"), false);
            (self.sink)(Input::CheckpointFailed { epoch, error });
        }
    }

    fn capture_inner(
        &mut self,
        generation: Generation,
        epoch: Epoch,
        states: Vec<TransactionState>,
    ) -> Result<(), String> {
        let Some(cut) = self.cut.as_ref() else {
            return Err("no cut in progress (the VM was not brought to a cut)".into());
        };
        if cut.generation != generation {
            return Err(format!(
                "cut began under generation {} but seals under {generation}",
                cut.generation
            ));
        }
        let started = match (self.opts.mode, cut.migrate_at) {
            (CaptureMode::Live, Some(t)) => {
                self.qmp(|c| {
                    c.execute_with("migrate-continue", json!({"state": "pre-switchover"}))
                })?;
                t
            }
            _ => {
                let uri = self.opts.standby.to_string();
                let t = Instant::now();
                self.qmp(|c| {
                    c.clear_events();
                    c.execute_with("migrate", json!({"uri": uri}))
                })?;
                t
            }
        };
        self.wait_status(&["completed"], |_| Ok(()))?;
        let completed = Instant::now();
        let capture = completed.saturating_duration_since(started);
        let devices: Result<Vec<Value>, _> = states.iter().map(serde_json::to_value).collect();
        let devices = devices.map_err(|e| format!("encoding the SEALED records: {e}"))?;
        let paused_us = self
            .shared
            .stats
            .lock()
            .ok()
            .and_then(|s| s.paused_at)
            .map(|t| t.elapsed().as_micros() as u64);
        let meta = self
            .opts
            .meta
            .as_deref()
            .and_then(|m| serde_json::from_str::<Value>(m).ok());
        self.standby.send(&StandbyRequest::End {
            generation,
            epoch,
            devices,
            mode: Some(self.opts.mode.as_str().into()),
            vm_paused_us: paused_us,
            meta,
        })?;
        self.cut = None;
        if let Ok(mut s) = self.shared.stats.lock() {
            s.capture.record(capture);
        }
        // The copy is complete: the VM may run again while the standby makes it durable.
        (self.sink)(Input::Captured { epoch });
        let reply = self.standby.recv(self.opts.timeout);
        match reply {
            Ok(StandbyReply::Durable {
                epoch: e,
                vmstate_len,
                fsync_us,
                ..
            }) if e == epoch => {
                let ack = completed.elapsed();
                if let Ok(mut s) = self.shared.stats.lock() {
                    s.fsync.record_us(fsync_us);
                    s.ack.record(ack);
                    s.bytes_total += vmstate_len;
                    s.durable += 1;
                    s.newest_durable = Some(epoch);
                    let vm_pause_us = s.pause_of_pending.take();
                    s.last = Some(LastCheckpoint {
                        epoch,
                        vm_pause_us,
                        capture_us: capture.as_micros() as u64,
                        bytes: vmstate_len,
                        standby_fsync_us: fsync_us,
                        ack_after_capture_us: ack.as_micros() as u64,
                    });
                }
                self.last_failure = None;
                (self.sink)(Input::Acked { epoch });
                Ok(())
            }
            Ok(StandbyReply::Refused { reason }) => Err(format!("standby refused: {reason}")),
            Ok(other) => {
                self.standby.disconnect();
                Err(format!("standby: unexpected reply {other:?}"))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let o = MigrateOptions::parse("/run/q.sock,standby=tcp:10.0.0.2:7000").unwrap();
        assert_eq!(o.qmp, PathBuf::from("/run/q.sock"));
        assert_eq!(o.standby, StandbyAddr::Tcp("10.0.0.2:7000".into()));
        assert_eq!(o.mode, CaptureMode::Live);
        let o = MigrateOptions::parse(
            "q,standby=unix:/s,mode=paused,max-bandwidth=1000,downtime-ms=50,converge-ms=9,timeout-ms=7",
        )
        .unwrap();
        assert_eq!(o.mode, CaptureMode::Paused);
        assert_eq!(o.max_bandwidth, 1000);
        assert_eq!(o.downtime_ms, Some(50));
        assert_eq!(o.converge_after, Duration::from_millis(9));
        assert_eq!(o.timeout, Duration::from_millis(7));
        for bad in [
            "",
            "q",
            "q,standby=",
            "q,standby=unix:/s,mode=fast",
            "q,standby=unix:/s,bogus=1",
            "q,standby=unix:/s,max-bandwidth=x",
            "q,standby=unix:/s,meta=/nonexistent/file",
        ] {
            assert!(MigrateOptions::parse(bad).is_err(), "{bad}");
        }
    }
}
