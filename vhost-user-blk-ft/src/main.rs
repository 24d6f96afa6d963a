// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-blk-ft`: CLI, daemon setup and signal handling.
//!
//! Opens the image, builds the virtio-blk device and serves it on a vhost-user socket until
//! SIGINT/SIGTERM; frontends may disconnect and reconnect in between (the device and its queue
//! threads outlive connections). With `--ft hold` it also serves the coordinator's control
//! socket (`--control`, required then) and holds output until commit (see `gate`).

use clap::{Parser, ValueEnum};
use ft_common::control::ControlServer;
use ft_common::control::{DeviceKind, TransactionState};
use ft_common::replica::dirty::{DirtyLog, Geometry};
use ft_common::replica::ReplicaLink;
use ft_common::txqueue::Limits;
use ft_common::vhost_user::VhostUserServer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vhost_user_blk_ft::config::{BlkConfig, BlkParams};
use vhost_user_blk_ft::device::BlkDevice;
use vhost_user_blk_ft::gate::commit::CommitEngine;
use vhost_user_blk_ft::gate::control::{BlkControl, OnCommitError};
use vhost_user_blk_ft::gate::hold::Hold;
use vhost_user_blk_ft::gate::replicate::Replication;
use vhost_user_blk_ft::image::{Image, OpenOpts};

/// Output-commit gating mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FtMode {
    /// Plain backend: every request is executed at once.
    Off,
    /// Output commit: writes, flushes, discards and write-zeroes wait for COMMIT of their
    /// epoch (needs --control).
    Hold,
}

/// `--replica-resync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ResyncMode {
    /// Copy the whole image.
    Full,
    /// Copy only the dirty blocks of both sides (failback).
    Dirty,
}

/// `--on-commit-error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnError {
    /// Refuse further commits after a failed one.
    Stop,
    /// Report the failure and keep committing later epochs.
    Report,
}

/// vhost-user virtio-blk backend with fault-tolerance (output commit) support.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// vhost-user socket to listen on (an existing socket file is replaced).
    #[arg(long)]
    socket: PathBuf,
    /// Raw image file or block device.
    #[arg(long)]
    image: PathBuf,
    /// Expose the disk read-only (the image is opened O_RDONLY).
    #[arg(long)]
    readonly: bool,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,
    /// Number of virtqueues (one I/O thread and io_uring each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Largest virtqueue size accepted (QEMU 10 uses 1024 for every ring, whatever the device's
    /// queue-size says).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..=1024))]
    queue_size: u16,
    /// Serial number reported by GET_ID (at most 20 bytes are used).
    #[arg(long, default_value = "vhost-user-blk-ft")]
    serial: String,
    /// Longest busy-polling window of a queue thread, in ns (adaptive, as QEMU's IOThread
    /// poll-max-ns, whose 32768 is too short for a QD1 round trip here: docs/benchmarks.md,
    /// round 5): after a batch the thread spins on its ring
    /// and io_uring instead of sleeping, so the next request costs no wakeup. The window grows
    /// while polling finds requests in time and drops to 0 when they come further apart, and
    /// polling pauses while the host has no idle CPU (tasks wait for a CPU while none stands
    /// idle, or the thread itself waits; see docs/benchmarks.md), so the default needs no
    /// tuning. 0 disables polling.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    poll_max_ns: u64,
    /// Keep polling even while the host has no idle CPU (for CPUs reserved for the daemon).
    #[arg(long)]
    poll_on_busy_host: bool,
    /// Output-commit gating mode (default: hold with --control, off without; --ft off with
    /// --control is refused).
    #[arg(long, value_enum)]
    ft: Option<FtMode>,
    /// Coordinator control socket (created with mode 0600); required with --ft hold.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Directory for state that must survive a restart: the fence (the newest coordinator
    /// generation seen, in fence.json, written atomically and fsynced before a newer generation
    /// is admitted). Without it a restarted daemon admits a deposed coordinator again.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// What a failed commit does to later commits.
    #[arg(long, value_enum, default_value_t = OnError::Stop)]
    on_commit_error: OnError,
    /// Most output requests held at once (over all queues); when full, the rings wait.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_held_requests: u32,
    /// Most bytes of writes held at once.
    #[arg(long, default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    max_held_bytes: u64,
    /// Replay record of a VM restored from a checkpoint: this device's SEALED transaction
    /// state (JSON, as the control protocol serializes it) of the checkpoint the VM is
    /// restored from. Each ring checks it at its first start and re-executes the requests it
    /// lists before any new one (see docs/operations.md, "Replay on the standby").
    #[arg(long, value_name = "FILE")]
    replay: Option<PathBuf>,
    /// Replicate the disk to a replica service on the standby (`ft-standby --replica-listen`),
    /// tcp:HOST:PORT or unix:PATH: every committed epoch is shipped there, and its requests
    /// complete towards the guest only after the replica applied and synced it. Needs --ft hold.
    #[arg(long, value_name = "ADDR")]
    replicate_to: Option<ft_common::standby::StandbyAddr>,
    /// Longest wait of one commit for the replica's acknowledgement; after it the commit
    /// answers COMMIT_FAILED, the epoch's output stays held and the next commit retries. Keep it
    /// below the coordinator's call timeout (5 s).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
    replica_timeout_ms: u64,
    /// The replica's image is not a copy of this one yet (protection starts on a running VM):
    /// copy the whole image to it, one chunk per commit while the guest runs; it counts as in
    /// sync (STATUS `replica.in_sync`, and a takeover accepts it) once the last chunk is
    /// acknowledged.
    #[arg(long, requires = "replicate_to")]
    replica_initial_sync: bool,
    /// Resync the replica before it counts as in sync: `full` copies the whole image (as
    /// --replica-initial-sync); `dirty` (failback to the old primary after a takeover) copies
    /// only the blocks that may differ: this daemon's --dirty-log (every block written since the
    /// split, which must have been tracked from the takeover on) united with the replica's own
    /// dirty set (`ft-standby --replica-dirty-log`: what the old primary wrote that this side
    /// may never have received). STATUS reports blocks copied against the image's blocks.
    #[arg(
        long,
        value_enum,
        requires = "replicate_to",
        conflicts_with = "replica_initial_sync"
    )]
    replica_resync: Option<ResyncMode>,
    /// Track every block a commit changes in this dirty log (created if missing), on stable
    /// storage before the write (a bitmap plus an activity log of hot extents, synced only when
    /// a commit touches an extent not in it): the blocks that may differ from the peer's image,
    /// which a later failback (--replica-resync dirty) copies. Needs --ft hold. Give it from the
    /// first start after a takeover, and on the primary too (its unacknowledged epochs).
    #[arg(long, value_name = "PATH")]
    dirty_log: Option<PathBuf>,
    /// Activity-log extent of a new dirty log, KiB: after a crash every block of a recently
    /// written extent counts as dirty (bigger: fewer log syncs, more copied after a crash).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(4..=1048576))]
    dirty_log_extent_kib: u32,
    /// Extents the activity log of a new dirty log holds (at most 1020).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1020))]
    dirty_log_al_extents: u32,
    /// Initial sync chunk per commit, MiB (also the most it adds to one commit's latency).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    replica_sync_chunk_mib: u64,
}

/// The device name in SEALED records: the image's file name.
fn device_name(args: &Args) -> String {
    args.image
        .file_name()
        .map_or_else(|| "blk".into(), |n| n.to_string_lossy().into_owned())
}

/// `--replay FILE`: hands the record to the server before any frontend connects.
fn load_replay(
    server: &VhostUserServer<BlkDevice>,
    path: &Path,
    device: &str,
) -> std::io::Result<()> {
    let err = |what: String| std::io::Error::other(format!("--replay {}: {what}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let state: TransactionState = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if state.kind != DeviceKind::Blk {
        return Err(err(format!(
            "a {:?} record, not a block device's",
            state.kind
        )));
    }
    if state.device != device {
        log::warn!(
            "--replay {}: record of device {:?}, this daemon serves {device:?}",
            path.display(),
            state.device
        );
    }
    let sum = server
        .replay_store()
        .install(&state)
        .map_err(|e| err(e.to_string()))?;
    log::info!(
        "replay record {}: {} request(s) on {} queue(s), replayed when their rings start",
        path.display(),
        sum.requests,
        sum.queues
    );
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        log::error!("{e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> std::io::Result<()> {
    // One rule for both daemons: --control means hold; --ft hold needs --control; --ft off
    // with --control is a contradiction.
    let ft = match (args.ft, &args.control) {
        (Some(FtMode::Hold) | None, Some(_)) => FtMode::Hold,
        (Some(FtMode::Off) | None, None) => FtMode::Off,
        (Some(FtMode::Hold), None) => {
            return Err(std::io::Error::other("--ft hold needs --control PATH"));
        }
        (Some(FtMode::Off), Some(_)) => {
            return Err(std::io::Error::other(
                "--control with --ft off: a control socket is only served with --ft hold \
                 (the default with --control)",
            ));
        }
    };
    if args.dirty_log.is_some() && ft != FtMode::Hold {
        return Err(std::io::Error::other(
            "--dirty-log needs --ft hold (blocks are tracked in the commit path)",
        ));
    }
    if args.replica_resync == Some(ResyncMode::Dirty) && args.dirty_log.is_none() {
        return Err(std::io::Error::other(
            "--replica-resync dirty needs --dirty-log (the blocks written since the split); \
             without it use --replica-resync full",
        ));
    }
    if args.replicate_to.is_some() && ft != FtMode::Hold {
        return Err(std::io::Error::other(
            "--replicate-to needs --ft hold (the replica is fed from the commit path)",
        ));
    }
    let control = match &args.control {
        Some(p) => Some(ControlServer::bind(p).map_err(|e| {
            std::io::Error::new(e.kind(), format!("control socket {}: {e}", p.display()))
        })?),
        None => None,
    };
    let opts = OpenOpts {
        readonly: args.readonly,
        direct: args.direct,
    };
    let image = Image::open(&args.image, opts).map_err(|e| {
        std::io::Error::new(e.kind(), format!("open {}: {e}", args.image.display()))
    })?;
    if args.serial.len() > 20 {
        log::warn!("serial longer than 20 bytes is truncated");
    }
    let params = BlkParams::new(&image, args.queues, &args.serial);
    log::info!(
        "image {} ({:?}): {} sectors, block size {}, {}{}; {} queue(s) of up to {}, poll-max-ns {}, ft {:?}",
        args.image.display(),
        image.kind(),
        params.capacity_sectors,
        params.logical_block_size,
        if image.readonly() {
            "read-only"
        } else {
            "read-write"
        },
        if image.direct() { ", O_DIRECT" } else { "" },
        args.queues,
        args.queue_size,
        args.poll_max_ns,
        ft,
    );
    // The replica checks its image has exactly this size (file or device size, as it reads its
    // own).
    let image_size = ft_common::replica::apply::file_size(image.file())?;
    let image = Arc::new(image);
    let config = Arc::new(BlkConfig::new(params));
    let mut device = BlkDevice::new(image.clone(), config, args.queue_size)
        .with_polling(std::time::Duration::from_nanos(args.poll_max_ns))
        .with_poll_cpu_guard(!args.poll_on_busy_host);
    let mut hold = None;
    if let Some(c) = &control {
        let limits = Limits {
            max_requests: args.max_held_requests as usize,
            max_bytes: args.max_held_bytes,
        };
        let h = Arc::new(Hold::new(limits, args.queues, c.notifier()));
        device = device.with_hold(h.clone());
        hold = Some(h);
    }
    let device = Arc::new(device);
    let counters = device.counters().clone();
    let server = VhostUserServer::new(device, &args.socket)?;
    if let Some(path) = &args.replay {
        load_replay(&server, path, &device_name(&args))?;
    }
    let mut commit_cancel = None;
    let mut commit_syncs = None;
    let control = match (control, hold) {
        (Some(c), Some(h)) => {
            let engine = CommitEngine::new(image, args.max_held_requests)
                .map_err(|e| std::io::Error::new(e.kind(), format!("commit engine: {e}")))?;
            commit_cancel = Some(engine.cancel_handle());
            commit_syncs = Some(engine.fdatasync_counter());
            let policy = match args.on_commit_error {
                OnError::Stop => OnCommitError::Stop,
                OnError::Report => OnCommitError::Report,
            };
            let name = device_name(&args);
            let ctl = BlkControl::new(h, server.worker_handles(), name, policy, engine)
                .with_fence(fence(args.state_dir.as_deref())?)
                .with_replay(server.replay_store());
            let dirty = match &args.dirty_log {
                Some(p) => Some(open_dirty_log(&args, p, image_size)?),
                None => None,
            };
            let own_dirty = dirty.as_ref().map(DirtyLog::bitmap);
            let lineage = dirty.as_ref().map_or(0, DirtyLog::lineage);
            let ctl = match dirty {
                Some(d) => ctl.with_dirty_log(d),
                None => ctl,
            };
            let ctl = match &args.replicate_to {
                Some(addr) => {
                    log::info!("replicating to {addr}");
                    let mut link = ReplicaLink::new(
                        addr.clone(),
                        image_size,
                        std::time::Duration::from_millis(args.replica_timeout_ms),
                    );
                    let dirty_resync = args.replica_resync == Some(ResyncMode::Dirty);
                    if dirty_resync {
                        link.want_dirty_set(lineage);
                    }
                    let mut r = Replication::new(link);
                    if dirty_resync {
                        let file = std::fs::File::open(&args.image).map_err(|e| {
                            std::io::Error::new(
                                e.kind(),
                                format!("resync: {}: {e}", args.image.display()),
                            )
                        })?;
                        r = r.with_dirty_resync(
                            file,
                            image_size,
                            (args.replica_sync_chunk_mib << 20) as usize,
                            own_dirty.unwrap_or_default(),
                        );
                    } else if args.replica_initial_sync
                        || args.replica_resync == Some(ResyncMode::Full)
                    {
                        let file = std::fs::File::open(&args.image).map_err(|e| {
                            std::io::Error::new(
                                e.kind(),
                                format!("initial sync: {}: {e}", args.image.display()),
                            )
                        })?;
                        r = r.with_initial_sync(
                            file,
                            image_size,
                            (args.replica_sync_chunk_mib << 20) as usize,
                        );
                    }
                    ctl.with_replication(r)
                }
                None => ctl,
            };
            log::info!("control socket {}", c.path().display());
            Some(c.spawn(ctl.into_handler())?)
        }
        _ => None,
    };
    server
        .stop_handle()
        .on_signals(&[libc::SIGINT, libc::SIGTERM])?;
    log::info!("listening on {}", args.socket.display());
    let res = server.run();
    // A commit still running is cancelled (ASYNC_CANCEL; queued requests never written) before
    // the control thread is joined.
    if let Some(c) = commit_cancel {
        c.cancel();
    }
    if let Some(c) = control {
        c.stop();
    }
    res?;
    log::info!("stopped; {}", counters.summary());
    if let Some(n) = commit_syncs {
        log::info!(
            "commit fdatasyncs {}",
            n.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    Ok(())
}

/// `--dirty-log`: an existing log must match the image; a dirty resync needs one that exists.
fn open_dirty_log(args: &Args, path: &Path, image_size: u64) -> std::io::Result<DirtyLog> {
    let log = if args.replica_resync == Some(ResyncMode::Dirty) {
        DirtyLog::open_existing(path, image_size)
    } else {
        DirtyLog::open(
            path,
            image_size,
            Geometry {
                extent_blocks: (args.dirty_log_extent_kib / 4).max(1),
                al_slots: args.dirty_log_al_extents,
            },
        )
    }
    .map_err(std::io::Error::other)?;
    log::info!(
        "dirty log {}: {} of {} blocks dirty (activity-log extent {} KiB)",
        path.display(),
        log.dirty_blocks(),
        log.image_blocks(),
        log.extent_blocks() * 4
    );
    Ok(log)
}

/// The fence of `--state-dir`, or an in-memory one (with a warning) without it.
fn fence(state_dir: Option<&std::path::Path>) -> std::io::Result<ft_common::fence::Fence> {
    match state_dir {
        Some(dir) => {
            let f = ft_common::fence::Fence::from_state_dir(dir).map_err(|e| {
                std::io::Error::new(e.kind(), format!("--state-dir {}: {e}", dir.display()))
            })?;
            log::info!(
                "fence at generation {} (persisted in {})",
                f.newest(),
                dir.display()
            );
            Ok(f)
        }
        None => {
            log::warn!(
                "no --state-dir: the fence is kept in memory only, so after a restart a \
                 deposed coordinator is admitted again"
            );
            Ok(ft_common::fence::Fence::default())
        }
    }
}
