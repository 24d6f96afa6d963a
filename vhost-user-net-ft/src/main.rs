// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-net-ft`: command line, logging, signals; wires tap, device, vhost-user server and
//! control socket together. See the library docs for the data path and gating.

use clap::{Parser, ValueEnum};
use ft_common::control::{ControlServer, Notifier};
use ft_common::fence::Fence;
use ft_common::vhost_user::server::VhostUserServer;
use log::{error, info};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use vhost_user_net_ft::config::device_features;
use vhost_user_net_ft::device::{FtMode, HoldLimits, NetDevice};
use vhost_user_net_ft::gate::NetGate;
use vhost_user_net_ft::mac::MacAddr;
use vhost_user_net_ft::open_tap::{configure_ip, open_tap, probe_offloads, Ipv4Prefix};
use vhost_user_net_ft::stats::NetCounters;
use vhost_user_net_ft::vnet_hdr::{MAX_FRAME_LEN, VNET_HDR_LEN};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Ft {
    /// Plain backend: TX frames go to the tap at once.
    Off,
    /// Output commit: TX frames are held per epoch until COMMIT (needs --control).
    Hold,
}

/// vhost-user virtio-net backend on a tap device, with per-epoch TX output commit for
/// checkpointing fault tolerance.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// vhost-user socket to listen on (the VMM connects to it).
    #[arg(long)]
    socket: PathBuf,
    /// Tap interface: opened if it exists, created otherwise.
    #[arg(long)]
    tap: String,
    /// Give the host side of the tap this IPv4 address and bring it up (ADDR/PREFIX).
    #[arg(long, value_name = "ADDR/PREFIX")]
    ip: Option<Ipv4Prefix>,
    /// Guest MAC address (default: random, locally administered).
    #[arg(long)]
    mac: Option<MacAddr>,
    /// Queue pairs (one tap queue each; more than one needs a multi-queue tap).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=128))]
    queues: u16,
    /// Largest virtqueue size accepted (QEMU 10 uses 1024 for every ring, whatever the device's
    /// queue-size says).
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// Output gating mode (default: hold with --control, off without; --ft off with --control
    /// is refused).
    #[arg(long, value_enum)]
    ft: Option<Ft>,
    /// Control socket for the checkpoint coordinator (mode 0600).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Directory for state that must survive a restart: the fence (the newest coordinator
    /// generation seen, in fence.json, written atomically and fsynced before a newer generation
    /// is admitted). Without it a restarted daemon admits a deposed coordinator again.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Hold buffer size per queue pair, bytes (virtio-net headers included).
    #[arg(long, default_value_t = 4 << 20)]
    tx_buffer_bytes: usize,
    /// Hold buffer size per queue pair, frames.
    // 16384: a 5 ms epoch of 64 B frames at 3 Mpps. 4096 capped a 5 ms epoch at 0.82 Mpps,
    // below what one queue pair writes with gating off (docs/benchmarks.md, packet rate).
    #[arg(long, default_value_t = 16384)]
    tx_buffer_packets: usize,
}

fn run(cli: Cli) -> Result<(), String> {
    // One rule for both daemons: --control means hold; --ft hold needs --control; --ft off
    // with --control is a contradiction.
    let mode = match (cli.ft, &cli.control) {
        (Some(Ft::Off) | None, None) => FtMode::Off,
        (Some(Ft::Hold) | None, Some(_)) => FtMode::Hold,
        (Some(Ft::Hold), None) => {
            return Err(
                "--ft hold needs --control: without a coordinator nothing is ever \
                        committed"
                    .into(),
            )
        }
        (Some(Ft::Off), Some(_)) => {
            return Err(
                "--control with --ft off: a control socket is only served with \
                        --ft hold (the default with --control)"
                    .into(),
            )
        }
    };
    let min_bytes = VNET_HDR_LEN + MAX_FRAME_LEN;
    if cli.tx_buffer_bytes < min_bytes {
        return Err(format!(
            "--tx-buffer-bytes must hold the largest frame: at least {min_bytes}"
        ));
    }
    // Allocated up front per queue pair: keep a typo from becoming an allocation abort.
    const MAX_BUFFER_BYTES: usize = 1 << 30;
    if cli.tx_buffer_bytes > MAX_BUFFER_BYTES {
        return Err(format!(
            "--tx-buffer-bytes is per queue pair and allocated up front: at most {MAX_BUFFER_BYTES}"
        ));
    }
    if cli.tx_buffer_packets == 0 || cli.tx_buffer_packets > 1 << 20 {
        return Err("--tx-buffer-packets must be 1..=1048576".into());
    }
    if !cli.queue_size.is_power_of_two() || cli.queue_size > 32768 {
        return Err("--queue-size must be a power of two up to 32768".into());
    }
    let mac = match cli.mac {
        Some(m) => m,
        None => MacAddr::random().map_err(|e| e.to_string())?,
    };

    let taps = open_tap(&cli.tap, cli.queues as usize).map_err(|e| e.to_string())?;
    if let Some(ip) = cli.ip {
        configure_ip(&cli.tap, ip).map_err(|e| format!("--ip {}: {e}", cli.tap))?;
    }
    let offloads = probe_offloads(&taps[0]);
    let features = device_features(offloads, cli.queues);
    info!(
        "tap {} ({} queue(s)), guest MAC {mac}, offloads {offloads:?}, mode {mode:?}",
        cli.tap, cli.queues
    );

    let control = cli
        .control
        .as_ref()
        .map(|p| ControlServer::bind(p).map_err(|e| format!("control {}: {e}", p.display())))
        .transpose()?;
    let notifier = control
        .as_ref()
        .map(ControlServer::notifier)
        .unwrap_or_else(Notifier::disabled);
    let device = Arc::new(NetDevice::new(
        taps,
        mac,
        features,
        cli.queue_size,
        mode,
        HoldLimits {
            bytes: cli.tx_buffer_bytes,
            packets: cli.tx_buffer_packets,
        },
        Arc::new(NetCounters::default()),
        notifier,
    ));
    let server = VhostUserServer::new(device.clone(), &cli.socket)
        .map_err(|e| format!("vhost-user {}: {e}", cli.socket.display()))?;
    device.set_workers(server.worker_handles());
    let fence = match (&control, &cli.state_dir) {
        (Some(_), Some(dir)) => {
            let f = Fence::from_state_dir(dir)
                .map_err(|e| format!("--state-dir {}: {e}", dir.display()))?;
            info!(
                "fence at generation {} (persisted in {})",
                f.newest(),
                dir.display()
            );
            f
        }
        (Some(_), None) => {
            log::warn!(
                "no --state-dir: the fence is kept in memory only, so after a restart a \
                 deposed coordinator is admitted again"
            );
            Fence::default()
        }
        (None, _) => Fence::default(),
    };
    let control = control
        .map(|c| {
            c.spawn(
                NetGate::new(server.worker_handles(), cli.tap.clone(), mac, mode)
                    .into_handler(fence),
            )
        })
        .transpose()
        .map_err(|e| format!("control thread: {e}"))?;
    server
        .stop_handle()
        .on_signals(&[libc::SIGINT, libc::SIGTERM])
        .map_err(|e| e.to_string())?;
    info!("listening on {}", cli.socket.display());
    let res = server.run().map_err(|e| e.to_string());
    if let Some(c) = control {
        c.stop();
    }
    let c = device.counters();
    info!(
        "stopped: tx {} frames ({} dropped), rx {} frames ({} dropped), committed {}, aborted {}",
        c.tx.frames(),
        c.tx.dropped_total(),
        c.rx.frames(),
        c.rx.dropped_total(),
        c.committed_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        c.aborted_frames.load(std::sync::atomic::Ordering::Relaxed),
    );
    res
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
