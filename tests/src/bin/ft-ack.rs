// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `ft-ack`: acknowledges a checkpoint every `--interval-ms` on one or more daemon control
//! sockets (SEAL E then COMMIT E, E growing), until SIGINT/SIGTERM or `--duration-secs`; then a
//! last round releases everything still held, and one `key=value` summary line is printed.
//! A stand-in for the coordinator in benchmarks (see ft_tests::acknowledger); exits non-zero
//! if any daemon refused or failed a request.

use clap::Parser;
use ft_common::epoch::Generation;
use ft_tests::acknowledger::Acknowledger;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Seal and commit an epoch every interval on daemon control sockets")]
struct Cli {
    /// Control socket of a daemon (repeat for several daemons).
    #[arg(long, required = true)]
    control: Vec<PathBuf>,
    /// Milliseconds between checkpoints (fractions allowed).
    #[arg(long, default_value_t = 5.0)]
    interval_ms: f64,
    /// Coordinator generation carried by every command.
    #[arg(long, default_value_t = 1)]
    generation: u64,
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long)]
    duration_secs: Option<f64>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Release);
}

fn install_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only touches an atomic.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    if !(cli.interval_ms.is_finite() && cli.interval_ms > 0.0 && cli.interval_ms <= 60_000.0) {
        eprintln!("ft-ack: --interval-ms must be in (0, 60000]");
        return ExitCode::FAILURE;
    }
    let limit = match cli
        .duration_secs
        .map(Duration::try_from_secs_f64)
        .transpose()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("ft-ack: --duration-secs: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = install_handlers() {
        eprintln!("ft-ack: sigaction: {e}");
        return ExitCode::FAILURE;
    }
    let interval = Duration::from_secs_f64(cli.interval_ms / 1000.0);
    let ack = match Acknowledger::start(&cli.control, interval, Generation(cli.generation)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ft-ack: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    while !STOP.load(Ordering::Acquire)
        && ack.is_running()
        && limit.is_none_or(|l| started.elapsed() < l)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (stats, result) = ack.stop();
    println!(
        "ft-ack: rounds={} first_epoch={} last_epoch={} committed_frames={} committed_bytes={} \
         nonempty_commits={} max_round_us={} secs={:.1}",
        stats.rounds,
        stats.first_epoch.map_or(0, |e| e.0),
        stats.last_epoch.map_or(0, |e| e.0),
        stats.committed_requests,
        stats.committed_bytes,
        stats.nonempty_commits,
        stats.max_round_us,
        started.elapsed().as_secs_f64(),
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ft-ack: {e}");
            ExitCode::FAILURE
        }
    }
}
