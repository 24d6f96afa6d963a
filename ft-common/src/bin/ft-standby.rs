// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `ft-standby`: receives a checkpoint of the primary VM every epoch (QEMU's migration stream
//! and the devices' SEALED records) and keeps the newest one durable in a store directory.
//! The coordinator's `migrate:` checkpointer acknowledges an epoch only after this process
//! answered that its checkpoint is durable.

use clap::Parser;
use ft_common::replica::{ReplicaConfig, ReplicaServer};
use ft_common::standby::{StandbyAddr, StandbyConfig, StandbyServer};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about = "ft-vhost standby: durable checkpoint store")]
struct Args {
    /// Where checkpointers and QEMU connect: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    listen: StandbyAddr,
    /// The store directory (created if missing); see docs/operations.md for its layout.
    #[arg(long)]
    store: PathBuf,
    /// Bound on waiting for a migration stream and on each read of it.
    #[arg(long, default_value_t = 30_000)]
    stream_timeout_ms: u64,
    /// Test hook: sleep this long before the publish fsyncs (simulates a slow disk).
    #[arg(long, default_value_t = 0, hide = true)]
    fsync_delay_ms: u64,
    /// Also run the disk replica service here: apply the primary block daemon's committed
    /// epochs (`vhost-user-blk-ft --replicate-to`) to this image, the standby's own copy of the
    /// disk (same size as the primary's). Needs --replica-listen.
    #[arg(long, requires = "replica_listen")]
    replica_image: Option<PathBuf>,
    /// Where the primary's block daemon connects to replicate: tcp:HOST:PORT or unix:PATH.
    #[arg(long, requires = "replica_image")]
    replica_listen: Option<StandbyAddr>,
    /// Largest epoch accepted from the primary, in bytes (its --max-held-bytes plus 24 bytes
    /// per request is enough).
    #[arg(long, default_value_t = 256 << 20)]
    replica_max_epoch_bytes: u64,
    /// This image's dirty log (failback): the log this host's block daemon kept with
    /// `--dirty-log` while it was the primary. The image then counts as not in sync until a
    /// resync completes; a primary started with `--replica-resync dirty` gets the log's dirty
    /// blocks and copies them besides its own, and the log is emptied once the resync is done.
    /// A missing log is created (a takeover's block daemon tracks into it) but not sent.
    #[arg(long, requires = "replica_image", value_name = "PATH")]
    replica_dirty_log: Option<PathBuf>,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let a = Args::parse();
    // SAFETY: plain libc signal-mask calls on a zeroed, initialised sigset_t, before any
    // thread starts, so only sigwait below sees SIGINT/SIGTERM.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let store = a.store;
    let server = match StandbyServer::start(StandbyConfig {
        listen: a.listen,
        store: store.clone(),
        fsync_delay: Duration::from_millis(a.fsync_delay_ms),
        stream_timeout: Duration::from_millis(a.stream_timeout_ms.max(1)),
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ft-standby: {e}");
            std::process::exit(1);
        }
    };
    let replica = match (a.replica_image, a.replica_listen) {
        (Some(image), Some(listen)) => match ReplicaServer::start(ReplicaConfig {
            listen,
            image,
            store: store.clone(),
            max_epoch_bytes: a.replica_max_epoch_bytes,
            io_timeout: Duration::from_millis(a.stream_timeout_ms.max(1)),
            dirty_log: a.replica_dirty_log,
        }) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("ft-standby: replica: {e}");
                std::process::exit(1);
            }
        },
        _ => None,
    };
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    log::info!("signal {sig}: shutting down");
    drop(replica);
    drop(server);
}
