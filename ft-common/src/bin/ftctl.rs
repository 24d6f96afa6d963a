//! `ftctl`: operator CLI for a running `ft-coordinator` (talks to its `--api` socket).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(version, about = "Control a running ft-coordinator")]
struct Args {
    /// The coordinator's --api socket.
    #[arg(long)]
    api: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Epochs sealed/committed, held output per device, latencies, checkpointer state.
    Status,
    /// Stop cutting epochs (acknowledged epochs still commit).
    Pause,
    /// Cut epochs again (also clears a halt after a device failure once all are connected).
    Resume,
    /// Cut an epoch now.
    Checkpoint,
    /// Depose this primary: ABORT to every device under a new, persisted generation.
    Abort,
    /// Gratuitous RARP from the net devices (after failover).
    Announce,
    /// The Prometheus text the metrics endpoint serves.
    Metrics,
}

fn main() {
    let a = Args::parse();
    let cmd = match a.cmd {
        Cmd::Status => "status",
        Cmd::Pause => "pause",
        Cmd::Resume => "resume",
        Cmd::Checkpoint => "checkpoint",
        Cmd::Abort => "abort",
        Cmd::Announce => "announce",
        Cmd::Metrics => "metrics",
    };
    match ft_common::coordinator::api::request(&a.api, cmd) {
        Ok(serde_json::Value::String(s)) => print!("{s}"),
        Ok(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        ),
        Err(e) => {
            eprintln!("ftctl {cmd}: {e}");
            std::process::exit(1);
        }
    }
}
