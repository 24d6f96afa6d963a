// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end failover (issue "Takeover"): a Linux guest under QEMU (TCG) with vhost-user-blk-ft
//! and vhost-user-net-ft in hold mode is checkpointed into a standby store every epoch; the
//! primary (QEMU, both daemons, the checkpointing side) is SIGKILLed at a chosen kill point and
//! `ftctl takeover` restores the guest from the store's newest checkpoint on a fresh set of
//! daemons. The guest (tests/guest/tests/failover.sh) runs fio rounds (mixed random reads and
//! writes at QD 16, crc32c verify) and a TCP echo server the whole time.
//!
//! Checked after every takeover: the numbered TCP stream through the guest's echo server goes on
//! (every byte back once, in order, no reset); fio's verify of every round passes; the guest
//! logs no I/O or virtio error; and, in the window between the kill point and the kill, nothing
//! reached the image or the tap (image hash, the tap's RX counter and a packet socket on the
//! tap, as in tests/tests/e2e_gating.rs): output of unacknowledged epochs never left.
//!
//! With local images (`two_kill_points_on_local_images`, issue "Shared-nothing"): the
//! standby's image is its own file, fed only by disk replication (`--replicate-to` to the
//! replica service in `ft-standby`). At the kill the replica's image must equal the primary's;
//! the primary's image is then moved away, and the takeover runs on the replica's image.
//!
//! Under etcd (`every_kill_point_once_in_a_chain_of_takeovers` and the demo, issue
//! "Shared-nothing", arbitration): an etcd on the namespace's loopback; every coordinator holds
//! the VM's key under a lease (`--etcd`, each COMMIT with the lease's deadline) and every
//! takeover is `ftctl takeover --etcd`: it restores the guest only once it acquired the key
//! (the killed primary's lease expired), after that primary's deadlines, with the generation
//! above the killed coordinator's; the next coordinator then acquires the key in turn.
//!
//! One network namespace per test; the tap is persistent (`ip tuntap add ... vnet_hdr`), so it
//! survives the primary's net daemon and the standby's daemon attaches to the same one.

use std::collections::hash_map::DefaultHasher;
use std::ffi::OsString;
use std::hash::Hasher;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ft_common::control::deadline::MonotonicTime;
use ft_common::control::{ControlClient, Reply, Request};
use ft_tests::etcd::{self, EtcdServer};
use ft_tests::guest::image::workspace_binary;
use ft_tests::guest::serial_file::guest_errors;
use ft_tests::guest::{
    Backend, BackendCommand, Guest, GuestConfig, GuestImage, GuestResult, ScratchDir, SerialFile,
};
use ft_tests::netns::in_netns;
use ft_tests::stream::{EchoStream, StreamStats};

const DISK_SIZE: u64 = 64 << 20;
const TAP: &str = "ftfo0";
const HOST_IP: &str = "10.97.0.1";
const GUEST_IP: &str = "10.97.0.2";
const ECHO_PORT: u16 = 7000;
const STOP_PORT: u16 = 7001;
const GUEST_MEM_MB: u32 = 320;
/// The replica service's address (inside the test's own network namespace).
const REPLICA_ADDR: &str = "tcp:127.0.0.1:27201";
/// The protected VM's name in etcd (`--vm-key`).
const VM_KEY: &str = "fo-guest";

static SERIAL: Mutex<()> = Mutex::new(());

fn binary(package: &str, name: &str) -> PathBuf {
    workspace_binary(package, name).unwrap_or_else(|e| panic!("{name} binary: {e}"))
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().expect("sh");
    assert!(st.success(), "{cmd}: {st}");
}

fn image_hash(path: &Path) -> u64 {
    let mut file = std::fs::File::open(path).expect("open image");
    let mut buf = vec![0u8; 1 << 20];
    let mut h = DefaultHasher::new();
    loop {
        let n = file.read(&mut buf).expect("read image");
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

/// Frames the daemons have written to the tap (its RX counter in this thread's netns).
fn tap_frames() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").expect("read net/dev");
    text.lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == TAP).then(|| rest.split_whitespace().nth(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("{TAP} not in net/dev:\n{text}"))
}

fn sigkill(pid: u32) {
    // SAFETY: kill(2); the pids are processes this test started (directly or via ftctl).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// Processes started by `ftctl takeover` (not our children): killed when the test ends.
#[derive(Default)]
struct Detached(Vec<u32>);

impl Drop for Detached {
    fn drop(&mut self) {
        for p in &self.0 {
            sigkill(*p);
        }
    }
}

/// Output as the observers see it.
#[derive(Debug, PartialEq, Eq)]
struct Output {
    image: u64,
    frames: u64,
}

/// The running primary: what to kill, and where its pieces listen.
struct Primary {
    qemu: u32,
    blk: u32,
    net: u32,
    qmp: PathBuf,
    serial: Option<SerialFile>,
}

/// How a chain is set up.
#[derive(Clone, Copy, Debug, Default)]
struct Setup {
    /// The primary's block daemon replicates to a replica image of its own (the first
    /// protection's standby runs the replica service).
    replicate: bool,
    /// Arbitration: an etcd on the namespace's loopback, coordinators with `--etcd`,
    /// takeovers with `ftctl takeover --etcd`.
    etcd: bool,
}

struct Rig {
    scratch: ScratchDir,
    /// The etcd every coordinator and takeover talks to (with [`Setup::etcd`]).
    etcd: Option<EtcdServer>,
    disk: PathBuf,
    /// The standby's own image, fed by replication (None: shared storage).
    replica: Option<PathBuf>,
    detached: Detached,
    /// The first primary's daemons (owned: killed by pid, reaped on drop).
    _first: Vec<Backend>,
    first_guest: Option<Guest>,
}

impl Rig {
    /// `rounds`: most fio rounds the guest runs (0: network only). Runs in the test's network
    /// namespace (etcd listens on its loopback).
    fn start(name: &str, image: &GuestImage, rounds: u32, setup: Setup) -> (Rig, Primary) {
        let scratch = ScratchDir::new(name).expect("scratch dir");
        let replicate = setup.replicate;
        let disk = scratch.raw_image("disk.raw", DISK_SIZE).expect("image");
        // Same file name: the device name in SEALED records is the image's file name.
        let replica = replicate.then(|| {
            std::fs::create_dir(scratch.join("standby-host")).expect("standby dir");
            scratch
                .raw_image("standby-host/disk.raw", DISK_SIZE)
                .expect("replica image")
        });
        sh(&format!(
            "ip link set lo up && ip tuntap add dev {TAP} mode tap vnet_hdr && \
             ip addr add {HOST_IP}/24 dev {TAP} && ip link set {TAP} up"
        ));
        // On the loopback just brought up.
        let etcd = setup.etcd.then(|| {
            assert!(
                etcd::available(),
                "etcd is not installed: run scripts/setup.sh (Debian's etcd-server)"
            );
            EtcdServer::start_loopback(&scratch.join("etcd.log")).expect("start etcd")
        });
        let s = |n: &str| scratch.join(n);
        let mut blk_cmd = BackendCommand::new(
            binary("vhost-user-blk-ft", "vhost-user-blk-ft"),
            [
                OsString::from("--socket"),
                s("blk.sock").into(),
                "--image".into(),
                disk.clone().into(),
                "--ft".into(),
                "hold".into(),
                "--control".into(),
                s("blk.ctl").into(),
                "--state-dir".into(),
                s("blk-state").into(),
            ],
            s("blk.sock"),
        );
        if replica.is_some() {
            blk_cmd
                .args
                .extend(["--replicate-to".into(), REPLICA_ADDR.into()]);
        }
        // The block daemon may stop mid-commit (kill point c) when the test arms it.
        blk_cmd.program = wrap_env(&mut blk_cmd.args, &blk_cmd.program, &blk_stop_env(&scratch));
        let blk = Backend::start(&blk_cmd, &s("blk.log"), Duration::from_secs(10))
            .expect("start vhost-user-blk-ft");
        let net = Backend::start(
            &BackendCommand::new(
                binary("vhost-user-net-ft", "vhost-user-net-ft"),
                [
                    OsString::from("--socket"),
                    s("net.sock").into(),
                    "--tap".into(),
                    TAP.into(),
                    "--mac".into(),
                    "52:54:00:12:34:56".into(),
                    "--ft".into(),
                    "hold".into(),
                    "--control".into(),
                    s("net.ctl").into(),
                    "--state-dir".into(),
                    s("net-state").into(),
                ],
                s("net.sock"),
            ),
            &s("net.log"),
            Duration::from_secs(10),
        )
        .expect("start vhost-user-net-ft");
        let mut config =
            GuestConfig::new(image, "failover", scratch.path()).with_qmp(&s("qmp.sock"));
        config.mem_mb = GUEST_MEM_MB;
        config.disks.push(s("blk.sock"));
        config.net = Some(s("net.sock"));
        config.timeout = Duration::from_secs(900);
        config.cmdline_extra = vec![
            format!("ft.ip={GUEST_IP}/24"),
            format!("ft.peer={HOST_IP}"),
            "ft.size=4M".into(),
            "ft.bs=16k".into(),
            "ft.iodepth=16".into(),
            format!("ft.echo_port={ECHO_PORT}"),
            format!("ft.stop_port={STOP_PORT}"),
            format!("ft.rounds={rounds}"),
        ];
        let guest = Guest::start(&config).expect("start QEMU");
        let primary = Primary {
            qemu: guest.pid().expect("QEMU pid"),
            blk: blk.pid().expect("blk pid"),
            net: net.pid().expect("net pid"),
            qmp: s("qmp.sock"),
            serial: None,
        };
        let rig = Rig {
            scratch,
            etcd,
            disk,
            replica,
            detached: Detached::default(),
            _first: vec![blk, net],
            first_guest: Some(guest),
        };
        // QMP appears once QEMU is up.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !primary.qmp.exists() {
            assert!(
                Instant::now() < deadline,
                "QEMU never created its QMP socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (rig, primary)
    }

    fn ftctl(&self, args: &[&std::ffi::OsStr]) -> serde_json::Value {
        self.ftctl_env(&[], args)
    }

    /// ftctl with extra environment (inherited by the daemons a takeover starts).
    fn ftctl_env(&self, env: &[(&str, OsString)], args: &[&std::ffi::OsStr]) -> serde_json::Value {
        let out = Command::new(binary("ft-common", "ftctl"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("ftctl");
        assert!(
            out.status.success(),
            "ftctl {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ftctl {args:?} printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn record_vm(&self, store: &Path, primary: &Primary) {
        let blk = format!("blk={}", self.scratch.join("blk.ctl").display());
        let net = format!("net={}", self.scratch.join("net.ctl").display());
        self.ftctl(&[
            "record-vm".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            "--qmp".as_ref(),
            primary.qmp.as_os_str(),
            "--device".as_ref(),
            blk.as_ref(),
            "--device".as_ref(),
            net.as_ref(),
        ]);
    }

    fn output(&self) -> Output {
        Output {
            image: image_hash(&self.disk),
            frames: tap_frames(),
        }
    }

    /// SIGKILL of everything the primary runs; returns the wall-clock time of the kill.
    fn kill(&mut self, p: &Primary) -> SystemTime {
        let at = SystemTime::now();
        for pid in [p.qemu, p.blk, p.net] {
            sigkill(pid);
        }
        at
    }

    /// `ftctl takeover` from `store`; the new primary's pieces and the takeover's report.
    fn takeover(
        &mut self,
        store: &Path,
        n: usize,
        lost_at: SystemTime,
    ) -> (Primary, serde_json::Value) {
        let run = self.scratch.join(&format!("takeover-{n}"));
        let lost_ms = lost_at
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis()
            .to_string();
        let state = self.scratch.join("standby.state");
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "takeover".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            "--state-file".as_ref(),
            state.as_os_str(),
            "--run-dir".as_ref(),
            run.as_os_str(),
            "--lost-at-unix-ms".as_ref(),
            lost_ms.as_ref(),
        ];
        if let Some(e) = &self.etcd {
            args.extend::<[&std::ffi::OsStr; 4]>([
                "--etcd".as_ref(),
                e.host_port().as_ref(),
                "--vm-key".as_ref(),
                VM_KEY.as_ref(),
            ]);
        }
        let report = self.ftctl_env(&blk_stop_env(&self.scratch), &args);
        let pid = |v: &serde_json::Value| v.as_u64().expect("pid in report") as u32;
        let p = Primary {
            qemu: pid(&report["qemu_pid"]),
            blk: pid(&report["daemon_pids"]["blk"]),
            net: pid(&report["daemon_pids"]["net"]),
            qmp: PathBuf::from(report["qmp"].as_str().expect("qmp path")),
            serial: Some(SerialFile::new(
                report["serial_log"].as_str().expect("serial path"),
            )),
        };
        self.detached.0.extend([p.qemu, p.blk, p.net]);
        (p, report)
    }
}

/// Environment that lets a block daemon stop at `before-fdatasync` once `arm-blk` exists.
fn blk_stop_env(scratch: &ScratchDir) -> Vec<(&'static str, OsString)> {
    vec![
        ("FT_STOP_AT", "before-fdatasync".into()),
        ("FT_STOP_ARM", scratch.join("arm-blk").into_os_string()),
    ]
}

fn guest_addr(port: u16) -> SocketAddr {
    format!("{GUEST_IP}:{port}").parse().expect("address")
}

/// Tells the guest to end its fio rounds.
fn stop_guest() {
    // Each SYN-ACK waits for a commit, and a busy TCG guest is slow: retry for a while.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut s = loop {
        match TcpStream::connect_timeout(&guest_addr(STOP_PORT), Duration::from_secs(20)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => println!("stop port: {e}; retrying"),
            Err(e) => panic!("connect to the guest's stop port: {e}"),
        }
    };
    s.write_all(b"stop\n").expect("send stop");
}

/// The checked stream through the guest's echo server (retried while nc starts listening).
fn start_stream() -> EchoStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match EchoStream::start(
            guest_addr(ECHO_PORT),
            Duration::from_secs(10),
            64 << 10,
            1024,
            256 << 10,
        ) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                println!("echo server not up yet: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("connect to the guest's echo server: {e}"),
        }
    }
}

fn wait_stream(stream: &EchoStream, more: u64, what: &str) -> StreamStats {
    let now = stream.stats();
    let s = stream.wait_verified(now.verified + more, Duration::from_secs(120));
    assert!(s.error.is_none(), "{what}: TCP stream broke: {s:?}");
    assert!(
        s.verified >= now.verified + more,
        "{what}: TCP stream stalled at {} bytes: {s:?}",
        s.verified
    );
    s
}

fn guest_image() -> GuestImage {
    GuestImage::ensure().unwrap_or_else(|e| panic!("guest prerequisites: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Kill points with the real checkpointing side: ft-coordinator --checkpointer migrate: and
// ft-standby, fio mixed read/write with verify in the guest, a chain of takeovers.
// ---------------------------------------------------------------------------------------------

/// Where the primary is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KillPoint {
    /// (a) The standby frozen while a checkpoint's stream is half written: the capture of the
    /// open epoch never completes.
    MidCapture,
    /// (b) The coordinator stopped at `before-commit`: checkpoint E durable and acknowledged,
    /// `COMMIT E` not sent.
    BeforeCommit,
    /// (c) The block daemon stopped at `before-fdatasync`: the commit of E drained its writes,
    /// nothing of it durable or completed towards the guest yet.
    MidCommit,
    /// (d) Cutting paused, every acknowledged epoch committed, nothing being captured.
    Idle,
}

impl KillPoint {
    const ALL: [KillPoint; 4] = [
        KillPoint::MidCapture,
        KillPoint::BeforeCommit,
        KillPoint::MidCommit,
        KillPoint::Idle,
    ];

    fn name(self) -> &'static str {
        match self {
            KillPoint::MidCapture => "a mid-capture",
            KillPoint::BeforeCommit => "b ack-before-commit",
            KillPoint::MidCommit => "c mid-commit",
            KillPoint::Idle => "d idle",
        }
    }
}

/// The checkpointing side of one primary: a standby with its store and a coordinator.
struct Protection {
    standby: Backend,
    coordinator: Backend,
    store: PathBuf,
    api: PathBuf,
}

/// Capture mode of the chain (`FT_FAILOVER_MODE=live|paused`, default paused: deterministic
/// pauses on a loaded 2-core machine).
fn capture_mode() -> String {
    std::env::var("FT_FAILOVER_MODE").unwrap_or_else(|_| "paused".into())
}

impl Rig {
    /// ft-standby on store `n` and ft-coordinator with the migrate checkpointer on `qmp`; the
    /// VM is recorded into the store. The coordinator may stop at `before-commit`.
    fn protect(&self, n: usize, qmp: &Path) -> Protection {
        let s = |x: &str| self.scratch.join(x);
        let store = s(&format!("store-{n}"));
        let standby_sock = s(&format!("standby-{n}.sock"));
        let mut standby_cmd = BackendCommand::new(
            binary("ft-common", "ft-standby"),
            [
                OsString::from("--listen"),
                format!("unix:{}", standby_sock.display()).into(),
                "--store".into(),
                store.clone().into(),
            ],
            &standby_sock,
        );
        // Only the first primary replicates (a new primary would need an initial sync).
        if let (0, Some(replica)) = (n, &self.replica) {
            standby_cmd.args.extend([
                "--replica-image".into(),
                replica.clone().into(),
                "--replica-listen".into(),
                REPLICA_ADDR.into(),
            ]);
        }
        let standby = Backend::start(
            &standby_cmd,
            &s(&format!("standby-{n}.log")),
            Duration::from_secs(10),
        )
        .expect("start ft-standby");
        let api = s(&format!("api-{n}.sock"));
        let checkpointer = format!(
            "migrate:{},standby=unix:{},mode={}",
            qmp.display(),
            standby_sock.display(),
            capture_mode()
        );
        let mut cmd = BackendCommand::new(
            binary("ft-common", "ft-coordinator"),
            [
                OsString::from("--device"),
                format!("blk={}", s("blk.ctl").display()).into(),
                "--device".into(),
                format!("net={}", s("net.ctl").display()).into(),
                "--checkpointer".into(),
                checkpointer.into(),
                "--interval-ms".into(),
                "300".into(),
                "--min-interval-ms".into(),
                "50".into(),
                "--checkpoint-timeout-ms".into(),
                "120000".into(),
                "--state-file".into(),
                s("standby.state").into(),
                "--api".into(),
                api.clone().into(),
            ],
            &api,
        );
        if let Some(e) = &self.etcd {
            // Holds the VM's key before it talks to the daemons (the takeover that made this
            // primary released it).
            cmd.args.extend([
                "--etcd".into(),
                e.host_port().into(),
                "--vm-key".into(),
                VM_KEY.into(),
            ]);
        }
        cmd.program = wrap_env(
            &mut cmd.args,
            &cmd.program,
            &[
                ("FT_STOP_AT", "before-commit".into()),
                ("FT_STOP_ARM", s("arm-coordinator").into_os_string()),
            ],
        );
        let coordinator = Backend::start(
            &cmd,
            &s(&format!("coordinator-{n}.log")),
            Duration::from_secs(10),
        )
        .expect("start ft-coordinator");
        Protection {
            standby,
            coordinator,
            store,
            api,
        }
    }

    fn status(&self, p: &Protection) -> serde_json::Value {
        self.ftctl(&["--api".as_ref(), p.api.as_os_str(), "status".as_ref()])
    }

    /// Waits until `n` more epochs are committed under protection `p`.
    fn wait_commits(&self, p: &Protection, n: u64, what: &str) {
        let committed = |r: &Rig| {
            r.status(p)["cycle"]["epochs_committed"]
                .as_u64()
                .unwrap_or(0)
        };
        let start = committed(self);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let now = committed(self);
            if now >= start + n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: only {} epochs committed in 180 s: {:#}",
                now - start,
                self.status(p)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (up to 2 minutes) until the block daemon holds writes, so that the checkpoints
    /// around the kill have requests outstanding to replay; false if it never did.
    fn wait_held_writes(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let held = ControlClient::connect(self.scratch.join("blk.ctl"), Duration::from_secs(5))
                .ok()
                .and_then(|mut c| match c.call(&Request::Status) {
                    Ok(Reply::Status(s)) => Some(s.held_requests),
                    _ => None,
                });
            if held.unwrap_or(0) > 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Brings the primary to `point` and leaves it frozen there (or idle).
    fn reach(&self, point: KillPoint, p: &Protection, blk_pid: u32) {
        if !self.wait_held_writes() {
            println!("{}: no held writes seen; killing anyway", point.name());
        }
        let arm_and_wait = |arm: &str, pid: u32| {
            std::fs::write(self.scratch.join(arm), b"").expect("arm kill point");
            let deadline = Instant::now() + Duration::from_secs(180);
            while !ft_common::killpoint::is_stopped(pid) {
                assert!(Instant::now() < deadline, "{}: never reached", point.name());
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        match point {
            KillPoint::BeforeCommit => {
                arm_and_wait("arm-coordinator", p.coordinator.pid().expect("pid"))
            }
            KillPoint::MidCommit => arm_and_wait("arm-blk", blk_pid),
            KillPoint::Idle => {
                self.ftctl(&["--api".as_ref(), p.api.as_os_str(), "pause".as_ref()]);
                let deadline = Instant::now() + Duration::from_secs(180);
                loop {
                    let c = &self.status(p)["cycle"];
                    if c["phase"] == "idle"
                        && c["awaiting_ack"] == 0
                        && c["commit_in_flight"].is_null()
                    {
                        break;
                    }
                    assert!(Instant::now() < deadline, "never idle: {c:#}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            KillPoint::MidCapture => {
                // Freeze the standby, then look: a half-written stream means QEMU is blocked
                // mid-capture. Otherwise let it go on and look again.
                let pid = p.standby.pid().expect("pid") as libc::pid_t;
                let deadline = Instant::now() + Duration::from_secs(180);
                loop {
                    // SAFETY: signals to our own child.
                    unsafe { libc::kill(pid, libc::SIGSTOP) };
                    while !ft_common::killpoint::is_stopped(pid as u32) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    if half_written(&p.store) {
                        return;
                    }
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGCONT) };
                    assert!(Instant::now() < deadline, "no capture caught mid-stream");
                    std::thread::sleep(Duration::from_millis(fastrand::u64(1..40)));
                }
            }
        }
    }
}

/// Whether the store holds a checkpoint being written with part of its stream.
fn half_written(store: &Path) -> bool {
    std::fs::read_dir(store)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".incoming-"))
        .any(|e| {
            std::fs::metadata(e.path().join("vmstate")).is_ok_and(|m| m.len() > 0)
                && !e.path().join("manifest.json").exists()
        })
}

/// `program args` as `env K=V... program args` (BackendCommand has no environment).
fn wrap_env(args: &mut Vec<OsString>, program: &OsString, vars: &[(&str, OsString)]) -> OsString {
    let mut new_args: Vec<OsString> = vars
        .iter()
        .map(|(k, v)| {
            let mut kv = OsString::from(format!("{k}="));
            kv.push(v);
            kv
        })
        .collect();
    new_args.push(program.clone());
    new_args.append(args);
    *args = new_args;
    OsString::from("env")
}

/// One row of the kill-point table.
struct Row {
    point: KillPoint,
    downtime_ms: f64,
    to_running_ms: f64,
    replayed: u64,
    stream_bytes: u64,
    stream_gap_s: f64,
    fio: &'static str,
    /// Waiting for and acquiring the etcd key in the takeover (0 without etcd).
    arbitrate_ms: f64,
    /// The takeover's generation.
    generation: u64,
    /// `ftctl status` of the killed primary's coordinator, just before the kill.
    status: serde_json::Value,
}

/// Runs the chain: primary 0, then for each kill point: reach it, check nothing leaves while
/// frozen, SIGKILL the primary, `ftctl takeover`, protect the new primary, check the stream and
/// a fio round go on. Ends with the guest's verdict. Returns the table.
fn run_chain(name: &str, points: &[KillPoint], rounds: u32, setup: Setup) -> Vec<Row> {
    let image = guest_image();
    let points = points.to_vec();
    let name = name.to_owned();
    in_netns(move || {
        let started = Instant::now();
        let (mut rig, mut primary) = Rig::start(&name, &image, rounds, setup);
        let mut guest = rig.first_guest.take();
        let mut protection = rig.protect(0, &primary.qmp);
        rig.record_vm(&protection.store, &primary);
        assert!(
            guest.as_ref().expect("guest").wait_for_stage("echo-up"),
            "guest never started its echo server"
        );
        let stream = start_stream();
        if rounds > 0 {
            // Kill only once the disk workload runs: a checkpoint then has requests outstanding.
            assert!(
                guest.as_ref().expect("guest").wait_for_stage("round-1"),
                "the first fio round did not finish"
            );
        }
        let mut first_console = String::new();
        let mut rows = Vec::new();
        for (i, point) in points.iter().copied().enumerate() {
            rig.wait_commits(&protection, 3, point.name());
            wait_stream(&stream, 16 << 10, &format!("before kill {}", point.name()));
            let status = rig.status(&protection);
            if let (0, true) = (i, rig.replica.is_some()) {
                // `ftctl status` shows the block daemon's replication: acknowledged, in sync.
                let blk = status["devices"]
                    .as_array()
                    .and_then(|d| d.iter().find(|d| d["name"] == "blk"))
                    .unwrap_or_else(|| panic!("no blk device in {status:#}"));
                let r = &blk["replica"];
                assert!(
                    r["last_acked"].as_u64().is_some() && r["in_sync"] == true,
                    "replication in ftctl status: {r:#}"
                );
            }
            rig.reach(point, &protection, primary.blk);
            std::thread::sleep(Duration::from_millis(500));
            let frozen = rig.output();
            std::thread::sleep(Duration::from_secs(1));
            assert_eq!(
                frozen,
                rig.output(),
                "{}: output reached the image or the tap while nothing more was acknowledged",
                point.name()
            );
            // SIGKILL the whole primary: QEMU, daemons, coordinator. The standby survives
            // (a frozen one is let go: its half-written checkpoint is never published).
            let lost_at = rig.kill(&primary);
            sigkill(protection.coordinator.pid().expect("pid"));
            if let (0, Some(replica)) = (i, rig.replica.clone()) {
                // Everything committed or being committed is on both images: at (c) the epoch
                // being committed was shipped before its local writes, so the replica gets it
                // too (it is applying or has applied it); elsewhere nothing is in between.
                // Then the primary's disk is lost for good.
                let deadline = Instant::now() + Duration::from_secs(60);
                while image_hash(&rig.disk) != image_hash(&replica) {
                    assert!(
                        Instant::now() < deadline,
                        "{}: the replica's image differs from the primary's",
                        point.name()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                std::fs::rename(&rig.disk, rig.scratch.join("primary-disk.lost"))
                    .expect("move the primary's image away");
                // From now on the primary's disk is the replica's image.
                rig.disk = replica;
            }
            // SAFETY: our own child.
            unsafe { libc::kill(protection.standby.pid().expect("pid") as i32, libc::SIGCONT) };
            if let Some(g) = guest.take() {
                first_console = g.wait().map(|o| o.serial).unwrap_or_default();
            }
            let (next, report) = rig.takeover(&protection.store, i + 1, lost_at);
            if let (0, Some(replica)) = (i, &rig.replica) {
                assert_eq!(
                    report["replica_image"].as_str().map(PathBuf::from),
                    Some(std::fs::canonicalize(replica).expect("replica path")),
                    "the takeover did not run on the replica's image: {report:#}"
                );
            }
            drop(protection);
            primary = next;
            let serial = primary.serial.clone().expect("serial");
            protection = rig.protect(i + 1, &primary.qmp);
            rig.record_vm(&protection.store, &primary);
            if rig.etcd.is_some() {
                check_arbitration(point, &status, &report, &rig.status(&protection));
            }
            let after = wait_stream(&stream, 16 << 10, &format!("after kill {}", point.name()));
            // A fio round finishing on the new primary verified every block it wrote, across
            // the takeover.
            let fio = if rounds == 0 {
                "-"
            } else if serial
                .wait_stage(Duration::from_secs(300), |s| s.starts_with("round-"))
                .is_some()
            {
                "PASS"
            } else {
                "FAIL"
            };
            rows.push(Row {
                point,
                downtime_ms: report["downtime_ms"].as_f64().unwrap_or(f64::NAN),
                to_running_ms: report["times"]["to_running_ms"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                replayed: report["requests_replayed"].as_u64().unwrap_or(0),
                stream_bytes: after.verified,
                stream_gap_s: after.longest_gap.as_secs_f64(),
                fio,
                arbitrate_ms: report["times"]["arbitrate_ms"].as_f64().unwrap_or(0.0),
                generation: report["generation"].as_u64().unwrap_or(0),
                status,
            });
            print_table(&rows);
            assert_ne!(
                fio,
                "FAIL",
                "{}: no fio round completed\n{}",
                point.name(),
                serial.tail(40)
            );
        }
        let stats = stream.finish(Duration::from_secs(120));
        stop_guest();
        let serial = primary.serial.clone().expect("serial");
        let result = serial.wait_result(Duration::from_secs(300));
        drop(protection);
        println!(
            "chain of {} takeovers in {:.1} s",
            rows.len(),
            started.elapsed().as_secs_f64()
        );
        assert!(stats.error.is_none(), "TCP stream: {stats:?}");
        assert_eq!(result, GuestResult::Pass, "{}", serial.tail(60));
        let mut errors = guest_errors(&first_console);
        for i in 1..=rows.len() {
            errors.extend(guest_errors(
                &SerialFile::new(rig.scratch.join(&format!("takeover-{i}/serial.log"))).text(),
            ));
        }
        assert!(errors.is_empty(), "guest errors: {errors:#?}");
        rows
    })
}

/// Under etcd: the takeover acquired the key only after every deadline the killed coordinator
/// was seen to have, took its generation above the killed coordinator's, and the new
/// coordinator holds the key with the generation above the takeover's.
fn check_arbitration(
    point: KillPoint,
    killed: &serde_json::Value,
    report: &serde_json::Value,
    next: &serde_json::Value,
) {
    let a = &report["arbitration"];
    let what = point.name();
    let old_generation = killed["generation"].as_u64().expect("generation");
    assert_eq!(
        a["previous_generation"].as_u64(),
        Some(old_generation),
        "{what}: etcd's generation before the takeover is not the killed coordinator's: {a:#}"
    );
    let old_deadline = MonotonicTime(
        killed["lease"]["deadline_monotonic_us"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: no lease in {killed:#}")),
    );
    let acquired = MonotonicTime(
        a["acquired_at_monotonic_us"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: no arbitration in {report:#}")),
    );
    assert!(
        acquired > old_deadline,
        "{what}: the takeover acquired the key at {acquired}, before the killed primary's \
         deadline {old_deadline}"
    );
    let taken = report["generation"].as_u64().expect("generation");
    assert!(taken > old_generation, "{what}: generation {taken}");
    assert_eq!(
        next["lease"]["held"], true,
        "{what}: the new coordinator does not hold the key: {next:#}"
    );
    assert!(
        next["generation"].as_u64().is_some_and(|g| g > taken),
        "{what}: the new coordinator's generation is not above the takeover's {taken}: {next:#}"
    );
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<3} {:<20} {:>12} {:>12} {:>9} {:>9} {:>12} {:>8} {:>5}",
        "#",
        "kill point",
        "downtime ms",
        "restore ms",
        "etcd ms",
        "replayed",
        "TCP bytes",
        "gap s",
        "fio"
    );
    for (i, r) in rows.iter().enumerate() {
        println!(
            "{:<3} {:<20} {:>12.0} {:>12.0} {:>9.0} {:>9} {:>12} {:>8.1} {:>5}",
            i + 1,
            r.point.name(),
            r.downtime_ms,
            r.to_running_ms,
            r.arbitrate_ms,
            r.replayed,
            r.stream_bytes,
            r.stream_gap_s,
            r.fio
        );
    }
}

/// The takeover on a network-only guest (no disk I/O: nothing outstanding to replay), killed
/// while idle: the TCP stream through the guest goes on, every byte once and in order.
#[test]
fn takeover_keeps_the_guests_tcp_stream() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rows = run_chain("fo-net", &[KillPoint::Idle], 0, Setup::default());
    assert_eq!(rows[0].replayed, 0);
}

/// Each kill point once, chained across four takeovers of the same guest (issue "Takeover"),
/// arbitrated by etcd: every coordinator holds the VM's key, every takeover waits for the
/// killed primary's lease to expire (`ftctl takeover --etcd`).
#[test]
fn every_kill_point_once_in_a_chain_of_takeovers() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let setup = Setup {
        etcd: true,
        ..Setup::default()
    };
    let rows = run_chain("fo-chain", &KillPoint::ALL, 1000, setup);
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.arbitrate_ms > 0.0));
}

/// Shared-nothing: the standby's image is fed only by disk replication; the primary is killed
/// mid-commit (c: the epoch shipped, its local writes drained, nothing completed towards the
/// guest), the replica's image must equal the primary's, and the primary's image is moved away;
/// the takeover runs on the replica's image, replays the outstanding requests over it, and
/// fio's verify passes (then a takeover at (b) of the new primary, on the same image).
#[test]
fn two_kill_points_on_local_images() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rows = run_chain(
        "fo-replica",
        &[KillPoint::MidCommit, KillPoint::BeforeCommit],
        1000,
        Setup {
            replicate: true,
            ..Setup::default()
        },
    );
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.fio == "PASS"));
}

/// `FT_SOAK_POINTS` (default 20) random kill points in one chain; run by
/// scripts/failover-soak.sh, not in CI.
#[test]
#[ignore = "soak: scripts/failover-soak.sh"]
fn soak_random_kill_points() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n: usize = std::env::var("FT_SOAK_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let points: Vec<KillPoint> = (0..n)
        .map(|_| KillPoint::ALL[fastrand::usize(..KillPoint::ALL.len())])
        .collect();
    let rows = run_chain("fo-soak", &points, 1000, Setup::default());
    println!("SOAK TABLE");
    print_table(&rows);
}

/// `scripts/demo.sh --failover`: one primary, checkpoints, a kill between acknowledgement and
/// commit, the takeover, and a summary.
#[test]
#[ignore = "demo: scripts/demo.sh --failover"]
fn demo_failover() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let setup = Setup {
        etcd: true,
        ..Setup::default()
    };
    let rows = run_chain("fo-demo", &[KillPoint::BeforeCommit], 1000, setup);
    let r = &rows[0];
    let cycle = &r.status["cycle"];
    let capture = &r.status["checkpointer"]["capture"];
    println!("FAILOVER SUMMARY");
    println!(
        "checkpoints: {} durable on the standby, {} epochs committed before the kill ({} mode)",
        capture["checkpoints_durable"],
        cycle["epochs_committed"],
        capture_mode()
    );
    for (what, key) in [
        ("VM pause", "vm_pause"),
        ("capture", "capture"),
        ("standby fsync", "standby_fsync"),
    ] {
        println!(
            "  {what:<14} p50 {:>7.1} ms  p99 {:>7.1} ms",
            capture[key]["p50_us"].as_f64().unwrap_or(f64::NAN) / 1e3,
            capture[key]["p99_us"].as_f64().unwrap_or(f64::NAN) / 1e3
        );
    }
    println!("kill point: {}", r.point.name());
    println!(
        "takeover: guest running {:.0} ms after the kill ({:.0} ms in ftctl takeover)",
        r.downtime_ms, r.to_running_ms
    );
    println!(
        "etcd: the takeover acquired the VM's key {:.0} ms after it started (the killed \
         primary's lease expired), generation {} -> {}",
        r.arbitrate_ms, r.status["generation"], r.generation
    );
    println!("requests replayed: {}", r.replayed);
    println!(
        "TCP stream: {} bytes checked, every byte once and in order (longest gap {:.1} s)",
        r.stream_bytes, r.stream_gap_s
    );
    println!("fio verify across the takeover: {}", r.fio);
    println!("demo took {:.0} s", started.elapsed().as_secs_f64());
    println!("END SUMMARY");
}
