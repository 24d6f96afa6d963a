// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `ftctl`: operator CLI for a running `ft-coordinator` (talks to its `--api` socket), and the
//! failover commands that work without one: `record-vm` (on the primary, once) and `takeover`
//! (on the standby, when the primary is lost).

use clap::{Parser, Subcommand};
use ft_common::arbiter::{self, ArbiterConfig};
use ft_common::coordinator::{DeviceSpec, Op};
use ft_common::takeover::{takeover, TakeoverConfig, VmRecord};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Control a running ft-coordinator; record a VM and take it over"
)]
struct Args {
    /// The coordinator's --api socket (needed by the coordinator commands).
    #[arg(long)]
    api: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The coordinator's operator requests (need --api).
    #[command(flatten)]
    Coordinator(Op),
    /// Record the running primary's QEMU and daemon command lines in STORE/vm.json (read from
    /// the processes behind the sockets), so `takeover` can rebuild the same VM.
    RecordVm {
        /// The standby's store directory (or a copy shipped to it).
        #[arg(long)]
        store: PathBuf,
        /// QEMU's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
        /// Each daemon as the coordinator knows it, NAME=CONTROL_SOCKET (repeatable).
        #[arg(long = "device", required = true)]
        devices: Vec<DeviceSpec>,
    },
    /// Make this standby the primary: generation G+1 persisted, old primary fenced where
    /// reachable, daemons started with replay records, QEMU restored from the newest valid
    /// checkpoint in STORE and continued, ANNOUNCE sent. Prints what it did as JSON.
    Takeover {
        /// The standby's store (checkpoints and vm.json).
        #[arg(long)]
        store: PathBuf,
        /// Generation file of the new primary (give it to its coordinator afterwards).
        #[arg(long)]
        state_file: PathBuf,
        /// Logs, replay files, QMP socket and serial log of the new primary.
        #[arg(long)]
        run_dir: PathBuf,
        /// Old primary's control sockets to fence, NAME=CONTROL_SOCKET (repeatable; default:
        /// those in vm.json).
        #[arg(long = "fence")]
        fence: Vec<DeviceSpec>,
        /// QEMU binary (default: the recorded one).
        #[arg(long)]
        qemu: Option<PathBuf>,
        /// Serial log of the restored guest (default: RUN_DIR/serial.log).
        #[arg(long)]
        serial_log: Option<PathBuf>,
        /// Bound on each wait (daemon sockets, QEMU start, migration), ms.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        /// When the primary was lost, ms since the Unix epoch: the downtime is reported.
        #[arg(long)]
        lost_at_unix_ms: Option<u64>,
        /// etcd endpoints HOST:PORT[,...]: take over only once the VM's key is acquired (the
        /// old primary's lease expired or was revoked by `ftctl abort`), with a generation
        /// above every one written there.
        #[arg(long, requires = "vm_key")]
        etcd: Option<String>,
        /// The VM's name, as given to its coordinator's --vm-key.
        #[arg(long, requires = "etcd")]
        vm_key: Option<String>,
        /// Lease TTL of the takeover's own claim on the key.
        #[arg(long, default_value = "2s", value_parser = ft_common::arbiter::parse_duration)]
        lease_ttl: Duration,
        /// How long to wait for the key, ms.
        #[arg(long, default_value_t = 30_000)]
        etcd_wait_ms: u64,
    },
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("ftctl {what}: {e}");
    std::process::exit(1);
}

fn main() {
    let a = Args::parse();
    let cmd = match a.cmd {
        Cmd::Coordinator(op) => op.name(),
        Cmd::RecordVm {
            store,
            qmp,
            devices,
        } => {
            let devices: Vec<_> = devices.into_iter().map(|d| (d.name, d.socket)).collect();
            let r = VmRecord::from_running(&qmp, &devices, Duration::from_secs(5))
                .unwrap_or_else(|e| fail("record-vm", e));
            r.save(&store).unwrap_or_else(|e| fail("record-vm", e));
            println!(
                "{}",
                serde_json::to_string_pretty(&r).unwrap_or_else(|e| fail("record-vm", e))
            );
            return;
        }
        Cmd::Takeover {
            store,
            state_file,
            run_dir,
            fence,
            qemu,
            serial_log,
            timeout_ms,
            lost_at_unix_ms,
            etcd,
            vm_key,
            lease_ttl,
            etcd_wait_ms,
        } => {
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
                .init();
            let cfg = TakeoverConfig {
                store,
                state_file,
                run_dir,
                fence: (!fence.is_empty())
                    .then(|| fence.into_iter().map(|d| (d.name, d.socket)).collect()),
                qemu,
                serial_log,
                timeout: Duration::from_millis(timeout_ms.max(1)),
                lost_at: lost_at_unix_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                arbiter: etcd.zip(vm_key).map(|(e, vm)| {
                    let eps = arbiter::parse_endpoints(&e).unwrap_or_else(|e| fail("takeover", e));
                    let mut c = ArbiterConfig::new(eps, vm, arbiter::holder_name("ftctl takeover"));
                    c.ttl = lease_ttl;
                    c.margin = lease_ttl / 4;
                    c
                }),
                arbiter_wait: Duration::from_millis(etcd_wait_ms),
            };
            let started = SystemTime::now();
            let out = takeover(&cfg).unwrap_or_else(|e| fail("takeover", e));
            log::info!(
                "takeover done in {:.0} ms",
                started.elapsed().unwrap_or_default().as_secs_f64() * 1e3
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&out).unwrap_or_else(|e| fail("takeover", e))
            );
            return;
        }
    };
    let Some(api) = a.api else {
        fail(cmd, "--api is required for this command");
    };
    match ft_common::coordinator::api::request(&api, cmd) {
        Ok(serde_json::Value::String(s)) => print!("{s}"),
        Ok(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        ),
        Err(e) => fail(cmd, e),
    }
}
