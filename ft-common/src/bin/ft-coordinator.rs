// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `ft-coordinator`: drives the ft-vhost device daemons through the epoch cycle (SEAL,
//! checkpoint, COMMIT) so no output leaves the primary before its checkpoint is acknowledged.

use clap::{Parser, ValueEnum};
use ft_common::arbiter::{self, ArbiterConfig, Claim};
use ft_common::coordinator::{
    CheckpointerSpec, Coordinator, CoordinatorConfig, CycleConfig, DeviceSpec, FailurePolicy,
    LinkConfig,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnFailure {
    StopVm,
    Continue,
}

#[derive(Parser, Debug)]
#[command(version, about = "ft-vhost coordinator: epoch cycle and output commit")]
struct Args {
    /// A device daemon's control socket, NAME=CONTROL_SOCKET (repeatable; block and net alike).
    #[arg(long = "device", required = true)]
    devices: Vec<DeviceSpec>,
    // The help text is an attribute, not a doc comment: rustdoc would read `[...]` as a link.
    // No default: forgetting the flag must not silently give a coordinator without checkpoints.
    #[arg(
        long,
        help = "migrate:QMP_SOCKET,standby=tcp:HOST:PORT|unix:PATH[,mode=live|paused][,max-bandwidth=B][,downtime-ms=N][,converge-ms=N][,timeout-ms=N][,meta=FILE] (real checkpoints to ft-standby) | exec:CMD | qmp:QMP_SOCKET | sim[:ACK_DELAY_MS] (sim needs --unsafe-no-checkpoint)"
    )]
    checkpointer: CheckpointerSpec,
    /// Allow --checkpointer sim, which acknowledges every checkpoint without taking one: output
    /// is gated but survives nothing (tests, demos, benchmarks of the gating cost).
    #[arg(long)]
    unsafe_no_checkpoint: bool,
    /// Periodic cut every N ms (0: no periodic cut).
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Event-driven cut on OUTPUT_PENDING, no sooner than N ms after the previous cut
    /// (Kemari: checkpoint as soon as output is waiting). Off when not given.
    #[arg(long)]
    min_interval_ms: Option<u64>,
    /// A checkpoint not captured and acknowledged within N ms fails (its output stays held).
    #[arg(long, default_value_t = 10_000)]
    checkpoint_timeout_ms: u64,
    /// When a device fails (disconnects, or refuses commits after a failure under its --on-commit-error stop): stop-vm stops the VM and the cycle until `ftctl resume`; continue leaves the VM running and carries on by itself once every device is connected again. A COMMIT_FAILED the daemon survives (--on-commit-error report) is counted and reported, not a failure.
    #[arg(long, value_enum, default_value = "stop-vm")]
    on_device_failure: OnFailure,
    /// Bound on one control call to a daemon.
    #[arg(long, default_value_t = 5_000)]
    call_timeout_ms: u64,
    /// Captured epochs allowed to wait for acknowledgement before cutting pauses.
    #[arg(long, default_value_t = 64)]
    max_pending: usize,
    /// The persisted generation (fencing); created if missing.
    #[arg(long)]
    state_file: PathBuf,
    /// Unix socket for ftctl.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Prometheus endpoint, a loopback address such as 127.0.0.1:9464.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// etcd endpoints HOST:PORT[,...]: hold the VM's key under a lease before protecting it,
    /// send every COMMIT with the lease's deadline, keep the generation in etcd too.
    #[arg(long, requires = "vm_key")]
    etcd: Option<String>,
    /// The protected VM's name: the etcd key /ft-vhost/vm/NAME/primary.
    #[arg(long, requires = "etcd")]
    vm_key: Option<String>,
    /// Lease TTL (whole seconds; etcd may grant more).
    #[arg(long, default_value = "2s", value_parser = ft_common::arbiter::parse_duration)]
    lease_ttl: Duration,
    /// Commit deadline = lease renewal + TTL - margin; the margin must exceed the longest
    /// commit plus the clock-rate error over one TTL. Default: a quarter of the TTL.
    #[arg(long, value_parser = ft_common::arbiter::parse_duration)]
    lease_margin: Option<Duration>,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let a = Args::parse();
    // The key is acquired before the signals are blocked: while waiting for it, SIGTERM ends
    // the process (its etcd thread blocks them for itself).
    let claim = match (&a.etcd, &a.vm_key) {
        (Some(etcd), Some(vm)) => Some(Arc::new(acquire(etcd, vm, a.lease_ttl, a.lease_margin))),
        _ => None,
    };
    // Block SIGINT/SIGTERM before any thread starts so only sigwait below sees them.
    // SAFETY: plain libc signal-mask calls on a zeroed, initialised sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    if matches!(a.checkpointer, CheckpointerSpec::Sim { .. }) && !a.unsafe_no_checkpoint {
        eprintln!(
            "ft-coordinator: --checkpointer sim acknowledges checkpoints that were never taken, \
             so nothing is fault tolerant; pass --unsafe-no-checkpoint to run it anyway"
        );
        std::process::exit(2);
    }
    let cfg = CoordinatorConfig {
        devices: a.devices,
        checkpointer: a.checkpointer,
        cycle: CycleConfig {
            interval: (a.interval_ms > 0).then(|| Duration::from_millis(a.interval_ms)),
            min_interval: a.min_interval_ms.map(Duration::from_millis),
            checkpoint_timeout: Duration::from_millis(a.checkpoint_timeout_ms),
            on_device_failure: match a.on_device_failure {
                OnFailure::StopVm => FailurePolicy::StopVm,
                OnFailure::Continue => FailurePolicy::Continue,
            },
            max_pending: a.max_pending.max(1),
        },
        link: LinkConfig {
            call_timeout: Duration::from_millis(a.call_timeout_ms.max(1)),
            ..LinkConfig::default()
        },
        state_file: a.state_file,
        api: a.api,
        metrics: a.metrics,
        claim,
    };
    let c = match Coordinator::start(cfg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ft-coordinator: {e}");
            std::process::exit(1);
        }
    };
    if let Some(m) = c.metrics_addr() {
        log::info!("metrics on http://{m}/metrics");
    }
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    log::info!("signal {sig}: shutting down");
    c.shutdown();
}

/// Connects to etcd and waits until this coordinator holds the VM's key; exits on bad flags or
/// an unreachable etcd.
fn acquire(etcd: &str, vm: &str, ttl: Duration, margin: Option<Duration>) -> Claim {
    let fail = |e: String| -> ! {
        eprintln!("ft-coordinator: {e}");
        std::process::exit(1)
    };
    let endpoints = arbiter::parse_endpoints(etcd).unwrap_or_else(|e| fail(e));
    let mut cfg = ArbiterConfig::new(
        endpoints,
        vm.to_string(),
        arbiter::holder_name("ft-coordinator"),
    );
    cfg.ttl = ttl;
    cfg.margin = margin.unwrap_or(ttl / 4);
    Claim::acquire(&cfg, None).unwrap_or_else(|e| fail(e.to_string()))
}
