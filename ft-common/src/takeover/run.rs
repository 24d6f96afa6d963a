// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The takeover itself, step by step (ARCHITECTURE.md section 5):
//!
//! 1. read the newest valid checkpoint and `vm.json` from the store (nothing changes yet);
//! 2. with `--etcd`: acquire the VM's primary key (wait until the old primary's lease expired
//!    or was revoked); take generation G+1 (above the state file's, the checkpoint's and, with
//!    etcd, every generation ever written there), persist it (and write it to etcd under the
//!    key), and fence the store with it (the deposed primary's checkpoints are refused from
//!    then on);
//! 3. fence the old primary where reachable: `ABORT` with G+1 on every control socket given
//!    (by default those recorded in `vm.json`); an unreachable daemon is reported, not an error;
//!    With disk replication (`DIR/replica.json`), also wait until the replica service applies
//!    nothing more ([`crate::replica::server::fence`]) and read the newest checkpoint again;
//! 4. write each block device's SEALED record to a replay file and start the standby's daemons
//!    with the recorded arguments plus `--replay FILE` (a block daemon on the replica's image,
//!    without `--replicate-to`, when there is a replica); wait for their sockets;
//! 5. start QEMU with the recorded command line (same devices), `-S -incoming defer` and a QMP
//!    socket of its own; `migrate-incoming` from the checkpoint's stream; wait for `completed`;
//! 6. `cont`: the guest runs (this instant is the end of the downtime);
//! 7. `ANNOUNCE` with G+1 on each net daemon (QEMU also sends its own SEND_RARP).
//!
//! Invariants: with etcd, nothing changes anywhere before the key is held (so a partitioned old
//! primary can no longer start a commit: its lease is gone); the generation is durable before
//! any command is sent (a crash after step 2 just
//! makes the next takeover take G+2); the guest never runs before its state is completely
//! loaded (`-S`, `cont` only after `completed`); the daemons have their replay records before
//! QEMU connects, so the outstanding requests run before any new one. The daemons keep gating
//! (`--ft hold` from the record): output of the new primary waits for a coordinator.
//!
//! The processes started here are detached (own session, logs in the run directory) and
//! outlive the takeover command; their pids are in the outcome.

use super::checkpoint::{self, Checkpoint};
use super::qemu_args::{flag_value, restore_args, without_flag};
use super::vm_record::{DaemonRecord, VmRecord};
use crate::arbiter::{ArbiterConfig, Claim};
use crate::control::deadline::MonotonicTime;
use crate::control::{ControlClient, DeviceKind, Reply, Request};
use crate::coordinator::qmp::QmpClient;
use crate::epoch::Generation;
use crate::fence::GenerationStore;
use crate::replica;
use crate::standby::store::CheckpointStore;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a takeover needs.
#[derive(Clone, Debug)]
pub struct TakeoverConfig {
    /// The standby's store (checkpoints and `vm.json`).
    pub store: PathBuf,
    /// The new primary's generation file (give the same one to its coordinator later).
    pub state_file: PathBuf,
    /// Logs, replay files, the new QMP socket and the serial log go here.
    pub run_dir: PathBuf,
    /// Control sockets of the old primary to fence; `None`: those recorded in `vm.json`.
    pub fence: Option<Vec<(String, PathBuf)>>,
    /// QEMU binary; `None`: the recorded one.
    pub qemu: Option<PathBuf>,
    /// Serial log of the restored guest; `None`: `RUN_DIR/serial.log`.
    pub serial_log: Option<PathBuf>,
    /// Bound on each wait (a socket to appear, the migration to complete, a control call).
    pub timeout: Duration,
    /// When the primary was lost, to report the downtime (kill to running).
    pub lost_at: Option<SystemTime>,
    /// `--etcd`: take over only once the VM's key is acquired, and take the generation above
    /// every one written to etcd. The key is released (lease revoked) when the takeover ends,
    /// for the new primary's coordinator to acquire.
    pub arbiter: Option<ArbiterConfig>,
    /// How long to wait for the key (the old lease's TTL plus etcd's expiry round suffices).
    pub arbiter_wait: Duration,
}

/// What the etcd arbitration did.
#[derive(Clone, Debug, Serialize)]
pub struct ArbitrationOutcome {
    pub key: String,
    /// Waiting for the key (the old primary's lease to expire or be revoked).
    pub waited_ms: f64,
    /// When the key was acquired, `CLOCK_MONOTONIC` microseconds (to compare with the old
    /// primary's commit deadline on the same host in tests).
    pub acquired_at_monotonic_us: u64,
    /// The VM's generation in etcd before this takeover.
    pub previous_generation: Generation,
    pub previous_writer: String,
}

/// Result of fencing one old daemon.
#[derive(Clone, Debug, Serialize)]
pub struct Fenced {
    pub name: String,
    pub control: PathBuf,
    /// `aborted N requests`, or why it could not be reached.
    pub result: String,
    pub reached: bool,
}

/// Milliseconds spent per step.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepTimes {
    pub read_store_ms: f64,
    /// Waiting for and acquiring the etcd key (with `--etcd`).
    pub arbitrate_ms: f64,
    pub generation_ms: f64,
    pub fence_ms: f64,
    pub daemons_ms: f64,
    pub qemu_start_ms: f64,
    pub migrate_incoming_ms: f64,
    pub cont_ms: f64,
    pub announce_ms: f64,
    /// From the start of the command to the guest running.
    pub to_running_ms: f64,
    pub total_ms: f64,
}

/// What the takeover did; printed as JSON by `ftctl takeover`.
#[derive(Clone, Debug, Serialize)]
pub struct TakeoverOutcome {
    pub generation: Generation,
    pub checkpoint_dir: PathBuf,
    pub checkpoint_epoch: u64,
    pub checkpoint_generation: Generation,
    pub vmstate_bytes: u64,
    /// Requests the block daemons were told to replay (outstanding at the checkpoint's seal).
    pub requests_replayed: u64,
    /// The replica's image the block daemon runs on (shared-nothing replication), if any.
    pub replica_image: Option<PathBuf>,
    pub fenced: Vec<Fenced>,
    pub qemu_pid: u32,
    pub daemon_pids: BTreeMap<String, u32>,
    pub qmp: PathBuf,
    pub serial_log: PathBuf,
    pub announced_packets: u32,
    /// With `--etcd`.
    pub arbitration: Option<ArbitrationOutcome>,
    /// Wall clock when `cont` returned, ms since the Unix epoch.
    pub running_at_unix_ms: u128,
    /// From `lost_at` to the guest running, when `lost_at` was given.
    pub downtime_ms: Option<f64>,
    pub times: StepTimes,
}

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("store: {0}")]
    Store(String),
    #[error("generation: {0}")]
    Generation(std::io::Error),
    #[error("{0}")]
    Start(String),
    #[error("restore: {0}")]
    Restore(String),
    #[error("etcd: {0}")]
    Arbiter(String),
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the takeover (see the module doc).
pub fn takeover(cfg: &TakeoverConfig) -> Result<TakeoverOutcome, TakeoverError> {
    let t0 = Instant::now();
    let mut times = StepTimes::default();
    let ckpt = checkpoint::newest_valid(&cfg.store).map_err(TakeoverError::Store)?;
    let record = VmRecord::load(&cfg.store).map_err(|e| TakeoverError::Store(e.to_string()))?;
    times.read_store_ms = ms(t0.elapsed());
    log::info!(
        "taking over from checkpoint epoch {} (generation {}) in {}",
        ckpt.epoch,
        ckpt.generation,
        ckpt.dir.display()
    );

    let t = Instant::now();
    let claim = match &cfg.arbiter {
        Some(a) => {
            log::info!("waiting for etcd key {}", a.primary_key());
            let c = Claim::acquire(a, Some(cfg.arbiter_wait))
                .map_err(|e| TakeoverError::Arbiter(e.to_string()))?;
            let at = c.acquired_at();
            log::info!(
                "etcd: {} acquired after {:.0} ms (acquired_at_us={})",
                a.primary_key(),
                ms(t.elapsed()),
                at.0
            );
            Some((c, at))
        }
        None => None,
    };
    times.arbitrate_ms = ms(t.elapsed());
    let r = generation_and_rest(cfg, ckpt, &record, claim.as_ref(), t0, times);
    if let Some((c, _)) = &claim {
        // Released for the new primary's coordinator (which refuses to start on any other
        // host now: etcd's generation is above theirs).
        if let Err(e) = c.revoke() {
            log::warn!("etcd: revoking the takeover's lease: {e} (it expires by itself)");
        }
    }
    r
}

/// Steps 2 to 7, under the etcd key when there is one.
fn generation_and_rest(
    cfg: &TakeoverConfig,
    mut ckpt: Checkpoint,
    record: &VmRecord,
    claim: Option<&(Claim, MonotonicTime)>,
    t0: Instant,
    mut times: StepTimes,
) -> Result<TakeoverOutcome, TakeoverError> {
    let t = Instant::now();
    let states = GenerationStore::new(&cfg.state_file);
    let store = CheckpointStore::open(&cfg.store).map_err(TakeoverError::Generation)?;
    let fenced_at = store
        .fenced_generation()
        .map_err(TakeoverError::Generation)?;
    let floor = Generation(ckpt.generation.0.max(fenced_at.0));
    let (generation, arbitration) = match claim {
        Some((c, acquired_at)) => {
            let (previous_generation, previous_writer, _) = c
                .read_generation()
                .map_err(|e| TakeoverError::Arbiter(e.to_string()))?;
            let generation = c
                .advance_generation(&states, floor, false)
                .map_err(|e| TakeoverError::Arbiter(e.to_string()))?;
            let a = ArbitrationOutcome {
                key: c.key(),
                waited_ms: times.arbitrate_ms,
                acquired_at_monotonic_us: acquired_at.0,
                previous_generation,
                previous_writer,
            };
            (generation, Some(a))
        }
        None => {
            let known = states.load().map_err(TakeoverError::Generation)?;
            let newest = known.0.max(floor.0);
            let generation = Generation(newest.checked_add(1).ok_or_else(|| {
                TakeoverError::Generation(std::io::Error::other("generation numbers exhausted"))
            })?);
            states
                .store(generation)
                .map_err(TakeoverError::Generation)?;
            (generation, None)
        }
    };
    // The store refuses the deposed primary's checkpoints from now on.
    store.fence(generation).map_err(TakeoverError::Generation)?;
    // Disk replication: once the fence is written and the replica's apply lock taken, the
    // replica applies nothing more. Its image holds no epoch newer than the newest checkpoint
    // published by then (an epoch is committed, so shipped, only after its checkpoint is
    // durable), which is why the checkpoint is read again now.
    let replica = replica::server::replica_image(&cfg.store).map_err(TakeoverError::Generation)?;
    if replica.is_some() {
        replica::server::fence(&cfg.store).map_err(TakeoverError::Generation)?;
        // Read again: final now that nothing is applied any more.
        let r = replica::server::replica_image(&cfg.store).map_err(TakeoverError::Generation)?;
        if let Some(r) = r.filter(|r| !r.in_sync) {
            return Err(TakeoverError::Store(format!(
                "the replica's image {} is not a copy of the primary's (initial sync incomplete)",
                r.image.display()
            )));
        }
        let now = checkpoint::newest_valid(&cfg.store).map_err(TakeoverError::Store)?;
        if now.epoch != ckpt.epoch || now.generation != ckpt.generation {
            log::info!(
                "a newer checkpoint, epoch {}, was published meanwhile",
                now.epoch
            );
            ckpt = now;
        }
    }
    times.generation_ms = ms(t.elapsed());

    let t = Instant::now();
    let targets = cfg.fence.clone().unwrap_or_else(|| {
        record
            .daemons
            .iter()
            .map(|d| (d.name.clone(), d.control.clone()))
            .collect()
    });
    let fenced = targets
        .iter()
        .map(|(name, ctl)| fence(name, ctl, generation, cfg.timeout))
        .collect();
    times.fence_ms = ms(t.elapsed());

    fs::create_dir_all(&cfg.run_dir)
        .map_err(|e| TakeoverError::Start(format!("{}: {e}", cfg.run_dir.display())))?;
    let t = Instant::now();
    let mut daemon_pids = BTreeMap::new();
    for d in &record.daemons {
        let pid = start_daemon(d, &ckpt, replica.as_ref(), &cfg.run_dir, cfg.timeout)?;
        daemon_pids.insert(d.name.clone(), pid);
    }
    times.daemons_ms = ms(t.elapsed());

    let t = Instant::now();
    let qmp_path = cfg.run_dir.join("qmp.sock");
    let serial_log = cfg
        .serial_log
        .clone()
        .unwrap_or_else(|| cfg.run_dir.join("serial.log"));
    let program = cfg
        .qemu
        .clone()
        .unwrap_or_else(|| PathBuf::from(&record.qemu[0]));
    let args = restore_args(&record.qemu, &qmp_path, &serial_log);
    remove_stale_socket(&qmp_path)?;
    let mut qemu = spawn_detached(&program, &args, &cfg.run_dir.join("qemu.log"))?;
    let qemu_pid = qemu.id();
    wait_for_socket(&qmp_path, &mut qemu, "QEMU", cfg.timeout)?;
    let mut qmp = QmpClient::connect(&qmp_path, cfg.timeout)
        .map_err(|e| TakeoverError::Restore(format!("QMP {}: {e}", qmp_path.display())))?;
    times.qemu_start_ms = ms(t.elapsed());

    let t = Instant::now();
    restore(&mut qmp, &ckpt.incoming_uri, cfg.timeout)?;
    times.migrate_incoming_ms = ms(t.elapsed());

    let t = Instant::now();
    qmp.cont()
        .map_err(|e| TakeoverError::Restore(format!("cont: {e}")))?;
    let running_at = SystemTime::now();
    times.cont_ms = ms(t.elapsed());
    times.to_running_ms = ms(t0.elapsed());
    log::info!(
        "guest running {:.0} ms after the takeover started",
        times.to_running_ms
    );

    let t = Instant::now();
    let mut announced_packets = 0;
    for d in record.daemons.iter().filter(|d| d.kind == DeviceKind::Net) {
        match call(&d.control, &Request::Announce { generation }, cfg.timeout) {
            Ok(Reply::Announced { packets }) => announced_packets += packets,
            Ok(other) => log::warn!("{}: ANNOUNCE answered {other:?}", d.name),
            Err(e) => log::warn!("{}: ANNOUNCE failed: {e}", d.name),
        }
    }
    times.announce_ms = ms(t.elapsed());
    times.total_ms = ms(t0.elapsed());

    let downtime_ms = cfg.lost_at.and_then(|lost| {
        running_at
            .duration_since(lost)
            .ok()
            .map(|d| d.as_secs_f64() * 1e3)
    });
    Ok(TakeoverOutcome {
        generation,
        checkpoint_dir: ckpt.dir.clone(),
        checkpoint_epoch: ckpt.epoch.0,
        checkpoint_generation: ckpt.generation,
        vmstate_bytes: ckpt.vmstate_len,
        requests_replayed: ckpt.outstanding(),
        replica_image: replica.map(|r| r.image),
        fenced,
        qemu_pid,
        daemon_pids,
        qmp: qmp_path,
        serial_log,
        announced_packets,
        arbitration,
        running_at_unix_ms: running_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
        downtime_ms,
        times,
    })
}

fn call(control: &Path, req: &Request, timeout: Duration) -> Result<Reply, String> {
    let mut c = ControlClient::connect(control, timeout).map_err(|e| e.to_string())?;
    c.call(req).map_err(|e| e.to_string())
}

/// `ABORT` with the new generation on one old daemon, if it can be reached.
fn fence(name: &str, control: &Path, generation: Generation, timeout: Duration) -> Fenced {
    let (reached, result) = match call(control, &Request::Abort { generation }, timeout) {
        Ok(Reply::Aborted {
            cancelled_requests,
            cancelled_bytes,
            ..
        }) => (
            true,
            format!(
                "aborted: {cancelled_requests} held requests ({cancelled_bytes} bytes) cancelled"
            ),
        ),
        Ok(other) => (true, format!("refused: {other:?}")),
        Err(e) => (false, format!("not reachable: {e}")),
    };
    log::info!("fence {name} ({}): {result}", control.display());
    Fenced {
        name: name.to_owned(),
        control: control.to_path_buf(),
        result,
        reached,
    }
}

/// Starts one of the standby's daemons with its recorded arguments (plus the replay record for
/// a block device) and waits for its vhost-user and control sockets. With a replica
/// (`replica`), a block daemon runs on the replica's image and replicates to nobody (until
/// protection of the new primary is set up again); it tracks its writes in the replica's dirty
/// log if the replica service has one (for a later failback), never in the old primary's.
fn start_daemon(
    d: &DaemonRecord,
    ckpt: &Checkpoint,
    replica: Option<&replica::server::ReplicaRecord>,
    run_dir: &Path,
    timeout: Duration,
) -> Result<u32, TakeoverError> {
    let mut argv = without_flag(&d.argv, "replay");
    if let (DeviceKind::Blk, Some(r)) = (d.kind, replica) {
        argv = without_flag(&without_flag(&argv, "replicate-to"), "image");
        for f in ["dirty-log", "replica-resync"] {
            argv = without_flag(&argv, f);
        }
        // (A flag without a value.)
        argv.retain(|w| w != "--replica-initial-sync");
        argv.push("--image".into());
        argv.push(r.image.to_string_lossy().into_owned());
        if let Some(log) = &r.dirty_log {
            argv.push("--dirty-log".into());
            argv.push(log.to_string_lossy().into_owned());
        }
        log::info!("{}: on the replica's image {}", d.name, r.image.display());
    }
    if d.kind == DeviceKind::Blk {
        let rec = ckpt
            .devices
            .iter()
            .find(|r| r.kind == DeviceKind::Blk && r.device == d.device)
            .ok_or_else(|| {
                TakeoverError::Store(format!(
                    "checkpoint epoch {} has no record for block device {} ({})",
                    ckpt.epoch, d.name, d.device
                ))
            })?;
        let file = run_dir.join(format!("replay-{}.json", d.name));
        let body = serde_json::to_vec_pretty(&rec.json)
            .map_err(|e| TakeoverError::Start(format!("replay record of {}: {e}", d.name)))?;
        fs::write(&file, body)
            .map_err(|e| TakeoverError::Start(format!("{}: {e}", file.display())))?;
        // Always, also with nothing outstanding: the daemon then still checks the restored
        // ring's base against the record instead of trusting it.
        argv.push("--replay".into());
        argv.push(file.to_string_lossy().into_owned());
    }
    let sockets: Vec<PathBuf> = ["socket", "control"]
        .iter()
        .filter_map(|f| flag_value(&argv, f).map(PathBuf::from))
        .collect();
    for s in &sockets {
        remove_stale_socket(s)?;
    }
    let mut child = spawn_detached(
        Path::new(&argv[0]),
        &argv[1..],
        &run_dir.join(format!("{}.log", d.name)),
    )?;
    for s in &sockets {
        wait_for_socket(s, &mut child, &d.name, timeout)?;
    }
    log::info!("{} started (pid {})", d.name, child.id());
    Ok(child.id())
}

fn remove_stale_socket(path: &Path) -> Result<(), TakeoverError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => fs::remove_file(path)
            .map_err(|e| TakeoverError::Start(format!("removing {}: {e}", path.display()))),
        Ok(_) => Err(TakeoverError::Start(format!(
            "{} exists and is not a socket",
            path.display()
        ))),
        Err(_) => Ok(()),
    }
}

/// Starts `program` in a session of its own (it outlives this command and the signals of its
/// terminal), output appended to `log`.
fn spawn_detached(program: &Path, args: &[String], log: &Path) -> Result<Child, TakeoverError> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| TakeoverError::Start(format!("{}: {e}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| TakeoverError::Start(format!("{}: {e}", log.display())))?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| TakeoverError::Start(format!("starting {}: {e}", program.display())))
}

fn wait_for_socket(
    path: &Path,
    child: &mut Child,
    what: &str,
    timeout: Duration,
) -> Result<(), TakeoverError> {
    let deadline = Instant::now() + timeout;
    loop {
        if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(TakeoverError::Start(format!(
                "{what} exited ({status}) before creating {}",
                path.display()
            )));
        }
        if Instant::now() >= deadline {
            return Err(TakeoverError::Start(format!(
                "{what} did not create {} within {timeout:?}",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `migrate-incoming` from the stream file; waits for `completed`.
fn restore(qmp: &mut QmpClient, uri: &str, timeout: Duration) -> Result<(), TakeoverError> {
    qmp.execute_with("migrate-incoming", serde_json::json!({ "uri": uri }))
        .map_err(|e| TakeoverError::Restore(format!("migrate-incoming: {e}")))?;
    let deadline = Instant::now() + timeout;
    loop {
        let r = qmp
            .execute("query-migrate")
            .map_err(|e| TakeoverError::Restore(format!("query-migrate: {e}")))?;
        match r.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(TakeoverError::Restore(format!(
                    "incoming migration {}: {}",
                    r["status"],
                    r.get("error-desc").and_then(|s| s.as_str()).unwrap_or("")
                )))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(TakeoverError::Restore(format!(
                "incoming migration not completed within {timeout:?}: {r}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
