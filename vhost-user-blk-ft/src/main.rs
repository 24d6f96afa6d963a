//! `vhost-user-blk-ft`: CLI, daemon setup and signal handling.
//!
//! Opens the image, builds the virtio-blk device and serves it on a vhost-user socket until
//! SIGINT/SIGTERM; frontends may disconnect and reconnect in between (the device and its queue
//! threads outlive connections).

use clap::{Parser, ValueEnum};
use ft_common::vhost_user::VhostUserServer;
use std::path::PathBuf;
use std::sync::Arc;
use vhost_user_blk_ft::config::{BlkConfig, BlkParams};
use vhost_user_blk_ft::device::BlkDevice;
use vhost_user_blk_ft::image::{Image, OpenOpts};

/// Output-commit gating mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FtMode {
    /// Plain backend: every request is executed at once.
    Off,
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
    /// Largest virtqueue size accepted.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=1024))]
    queue_size: u16,
    /// Serial number reported by GET_ID (at most 20 bytes are used).
    #[arg(long, default_value = "vhost-user-blk-ft")]
    serial: String,
    /// Output-commit gating mode.
    #[arg(long, value_enum, default_value_t = FtMode::Off)]
    ft: FtMode,
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
        "image {} ({:?}): {} sectors, block size {}, {}{}; {} queue(s) of up to {}, ft {:?}",
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
        args.ft,
    );
    let image = Arc::new(image);
    let config = Arc::new(BlkConfig::new(params));
    let device = Arc::new(BlkDevice::new(image, config, args.queue_size));
    let counters = device.counters().clone();
    let server = VhostUserServer::new(device, &args.socket)?;
    server
        .stop_handle()
        .on_signals(&[libc::SIGINT, libc::SIGTERM])?;
    log::info!("listening on {}", args.socket.display());
    server.run()?;
    log::info!("stopped; {}", counters.summary());
    Ok(())
}
