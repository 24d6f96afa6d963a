// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-level network tests: a Linux guest under QEMU (TCG) with a vhost-user virtio-net device
//! served by our `vhost-user-net-ft` daemon on a tap. The guest (tests/guest/tests/net-iperf.sh)
//! pings the host end of the tap and runs iperf3 against a host server in both directions.
//!
//! Each test runs in a network namespace of its own (tap, addresses and the iperf3 server vanish
//! with it; the fixed 10.77.0.0/24 addresses cannot clash with another run). Run once with the
//! daemon's gating off and once with `--ft hold`: first without any commit (the guest's frames
//! are held and none reaches the tap), then with an acknowledger (SEAL/COMMIT every 5 ms)
//! playing the coordinator: held frames must all be released, nothing left held at the end.
//!
//! The daemon binary comes from the workspace target directory (built on demand). Run with
//! `--nocapture` for timings and throughput.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ft_common::control::{ControlClient, Reply, Request};
use ft_common::epoch::Generation;
use ft_tests::acknowledger::{AckStats, Acknowledger};
use ft_tests::guest::image::workspace_binary;
use ft_tests::guest::{Backend, BackendCommand, Guest, GuestConfig, GuestImage, ScratchDir};
use ft_tests::netns::in_netns;

const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2/24";
const IPERF_SECS: u32 = 3;
const PINGS: u32 = 5;
const ACK_INTERVAL: Duration = Duration::from_millis(5);

/// One guest at a time: each is a busy TCG thread on a small shared machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// `vhost-user-net-ft` next to this test's own binary (target/<profile>/), built if missing.
fn daemon_binary() -> PathBuf {
    workspace_binary("vhost-user-net-ft", "vhost-user-net-ft")
        .unwrap_or_else(|e| panic!("vhost-user-net-ft binary: {e}"))
}

/// A host process killed (and reaped) on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `iperf3 -s` bound to the tap address; waits until it listens.
fn start_iperf_server(log: &Path) -> Reaped {
    let out = std::fs::File::create(log).expect("iperf3 log");
    let child = Command::new("iperf3")
        .args(["-s", "-B", HOST_IP, "--forceflush"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup log fd"))
        .stderr(out)
        .spawn()
        .expect("start iperf3 -s");
    let mut server = Reaped(child);
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("Server listening") {
            return server;
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("iperf3 -s exited ({status}):\n{text}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "iperf3 -s not listening:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The facts the guest printed as `FT-NET: ...` lines.
#[derive(Debug, Default)]
struct NetReport {
    rtts_ms: Vec<f64>,
    pings_sent: u64,
    pings_received: u64,
    /// (sent_bytes, received_bytes, seconds) per direction.
    tx: Option<(u64, u64, f64)>,
    rx: Option<(u64, u64, f64)>,
    guest_tx_packets: Option<u64>,
    guest_rx_packets: Option<u64>,
}

fn parse_report(serial: &str) -> NetReport {
    let mut r = NetReport::default();
    for line in serial.lines() {
        let Some(i) = line.find("FT-NET: ") else {
            continue;
        };
        let rest = &line[i + "FT-NET: ".len()..];
        let kv = |key: &str| -> Option<&str> {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        let num = |key: &str| kv(key).and_then(|v| v.parse::<u64>().ok());
        if let Some(ms) = kv("rtt_ms").and_then(|v| v.parse().ok()) {
            r.rtts_ms.push(ms);
        } else if rest.starts_with("ping ") {
            r.pings_sent = num("sent").unwrap_or(0);
            r.pings_received = num("received").unwrap_or(0);
        } else if rest.starts_with("iperf ") {
            let v = (
                num("sent_bytes").unwrap_or(0),
                num("received_bytes").unwrap_or(0),
                kv("seconds").and_then(|v| v.parse().ok()).unwrap_or(0.0),
            );
            match kv("dir") {
                Some("tx") => r.tx = Some(v),
                Some("rx") => r.rx = Some(v),
                _ => {}
            }
        } else if rest.starts_with("eth0 ") {
            r.guest_tx_packets = num("tx_packets");
            r.guest_rx_packets = num("rx_packets");
        }
    }
    r
}

fn mbits(v: Option<(u64, u64, f64)>) -> f64 {
    match v {
        Some((_, bytes, secs)) if secs > 0.0 => bytes as f64 * 8.0 / secs / 1e6,
        _ => 0.0,
    }
}

fn status(ctl: &Path) -> ft_common::control::DeviceStatus {
    let mut c = ControlClient::connect(ctl, Duration::from_secs(10)).expect("control connect");
    match c.call(&Request::Status).expect("STATUS") {
        Reply::Status(s) => *s,
        other => panic!("STATUS answered {other:?}"),
    }
}

/// The daemon's shutdown line: "stopped: tx T frames (D dropped), ..., committed C, aborted A".
fn shutdown_counters(log: &str) -> Option<(u64, u64, u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains("stopped: tx "))?;
    let nums: Vec<u64> = line[line.find("stopped: tx ")?..]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    // tx, tx dropped, rx, rx dropped, committed, aborted
    match nums[..] {
        [tx, tx_dropped, _, _, committed, aborted] => Some((tx, tx_dropped, committed, aborted)),
        _ => None,
    }
}

fn run_guest(gated: bool) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("guest prerequisites: {e}"));
    let daemon = daemon_binary();
    in_netns(move || run_in_netns(image, daemon, gated))
}

fn run_in_netns(image: GuestImage, daemon: PathBuf, gated: bool) {
    let test_start = Instant::now();
    let label = if gated { "hold" } else { "off" };
    let scratch = ScratchDir::new(&format!("guest-net-{label}")).expect("scratch dir");
    let sock = scratch.join("net.sock");
    let ctl = scratch.join("net.ctl");
    let tap = format!("ftvm{label}");
    let mut args: Vec<String> = vec![
        "--socket".into(),
        sock.display().to_string(),
        "--tap".into(),
        tap.clone(),
        "--ip".into(),
        format!("{HOST_IP}/24"),
        "--mac".into(),
        "52:54:00:12:34:56".into(),
    ];
    if gated {
        args.extend([
            "--ft".into(),
            "hold".into(),
            "--control".into(),
            ctl.display().to_string(),
        ]);
    }
    let backend_log = scratch.join("daemon.log");
    let backend = Backend::start(
        &BackendCommand::new(&daemon, &args, &sock),
        &backend_log,
        Duration::from_secs(10),
    )
    .expect("start vhost-user-net-ft");
    let _iperf = start_iperf_server(&scratch.join("iperf3.log"));

    let mut config = GuestConfig::new(&image, "net-iperf", scratch.path());
    config.net = Some(sock.clone());
    config.timeout = Duration::from_secs(150);
    config.cmdline_extra = vec![
        format!("ft.ip={GUEST_IP}"),
        format!("ft.peer={HOST_IP}"),
        format!("ft.pings={PINGS}"),
        "ft.ping_interval=0.2".into(),
        format!("ft.iperf_secs={IPERF_SECS}"),
    ];
    let guest = Guest::start(&config).expect("start QEMU");
    let ack = gated.then(|| {
        hold_before_first_commit(&guest, &ctl, &tap);
        Acknowledger::start(std::slice::from_ref(&ctl), ACK_INTERVAL, Generation(1))
            .expect("start acknowledger")
    });
    let outcome = guest.wait().expect("run guest");
    let report = parse_report(&outcome.serial);
    println!(
        "[{label}] boot to net-up {:.1} s, ping rtt {:?} ms, iperf guest->host {:.1} Mbit/s, \
         host->guest {:.1} Mbit/s, guest run {:.1} s",
        outcome.stage("net-up").map_or(0.0, |d| d.as_secs_f64()),
        report.rtts_ms,
        mbits(report.tx),
        mbits(report.rx),
        outcome.elapsed.as_secs_f64(),
    );
    assert!(outcome.passed(), "{}", outcome.report(60));

    // The guest's numbers: every stage ran and moved data both ways.
    assert!(
        report.pings_sent == u64::from(PINGS) && report.pings_received > 0,
        "ping: {report:?}\n{}",
        outcome.report(40)
    );
    assert!(!report.rtts_ms.is_empty(), "no RTT lines: {report:?}");
    for (dir, v) in [("guest->host", report.tx), ("host->guest", report.rx)] {
        let (sent, received, secs) =
            v.unwrap_or_else(|| panic!("no iperf3 {dir} result\n{}", outcome.report(40)));
        assert!(
            sent > 0 && received > 0 && secs > 0.0,
            "iperf3 {dir}: sent {sent} received {received} in {secs} s"
        );
    }
    let guest_tx = report
        .guest_tx_packets
        .unwrap_or_else(|| panic!("no NIC counters\n{}", outcome.report(40)));

    if let Some(ack) = ack {
        // Stop after the guest is gone: the final round releases whatever it sent last.
        assert!(ack.is_running(), "acknowledger stopped early");
        let (stats, result) = ack.stop();
        result.unwrap_or_else(|e| panic!("acknowledger: {e} (after {stats:?})"));
        check_gated(&ctl, &stats, guest_tx);
    } else {
        // Gating off: the control socket was not even created.
        assert!(!ctl.exists());
    }

    backend
        .stop(Duration::from_secs(5))
        .expect("stop vhost-user-net-ft");
    let log = std::fs::read_to_string(&backend_log).unwrap_or_default();
    let (tx, tx_dropped, committed, aborted) = shutdown_counters(&log)
        .unwrap_or_else(|| panic!("no shutdown counters in the daemon log:\n{log}"));
    println!(
        "[{label}] daemon: tx {tx} frames ({tx_dropped} dropped), committed {committed}, \
         aborted {aborted}; guest tx_packets {guest_tx}; test {:.1} s",
        test_start.elapsed().as_secs_f64()
    );
    assert!(
        tx >= guest_tx,
        "daemon saw {tx} TX frames, guest sent {guest_tx}"
    );
    assert_eq!(aborted, 0);
    if gated {
        // Every frame the daemon took from the guest went out through a commit.
        assert_eq!(committed, tx - tx_dropped, "daemon log:\n{log}");
    } else {
        assert_eq!(committed, 0, "nothing is committed with gating off");
    }
}

/// Frames the host end of `tap` received (the daemon's writes to the tap fd), from this
/// thread's network namespace.
fn tap_rx_packets(tap: &str) -> u64 {
    let dev =
        std::fs::read_to_string("/proc/thread-self/net/dev").expect("/proc/thread-self/net/dev");
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix(tap)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("{tap} not in /proc/net/dev:\n{dev}"))
}

/// Before any commit the guest's first frames (ARP, pings) are held: the daemon reports them
/// and nothing reached the tap. The guest keeps retrying its first ping meanwhile.
fn hold_before_first_commit(guest: &Guest, ctl: &Path, tap: &str) {
    assert!(
        guest.wait_for_stage("net-up"),
        "guest never brought its NIC up"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        let s = status(ctl);
        if s.held_requests >= 2 || Instant::now() >= deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "[hold] before the first commit: {} frames / {} bytes held, tap received {}",
        held.held_requests,
        held.held_bytes,
        tap_rx_packets(tap)
    );
    assert!(held.held_requests >= 2, "guest output not held: {held:?}");
    assert_eq!(held.last_committed, None);
    assert_eq!(
        tap_rx_packets(tap),
        0,
        "frames left the daemon before any commit"
    );
}

/// With gating on: commits happened, released the guest's traffic, and nothing is left held.
fn check_gated(ctl: &Path, stats: &AckStats, guest_tx: u64) {
    let s = status(ctl);
    println!(
        "[hold] acknowledger: {} rounds (epochs {:?}..={:?}), {} non-empty, {} frames / {} bytes \
         released, slowest round {} us; daemon commits_ok {}",
        stats.rounds,
        stats.first_epoch,
        stats.last_epoch,
        stats.nonempty_commits,
        stats.committed_requests,
        stats.committed_bytes,
        stats.max_round_us,
        s.commits_ok,
    );
    assert_eq!(s.mode, "hold");
    assert_eq!(s.last_committed, stats.last_epoch);
    assert_eq!(s.last_sealed, stats.last_epoch);
    assert_eq!(s.commits_ok, stats.rounds);
    assert_eq!(
        (s.held_requests, s.held_bytes),
        (0, 0),
        "output left held after the last commit: {s:?}"
    );
    // A few seconds of traffic under a 5 ms cadence: many commits, many of them carrying data.
    assert!(stats.rounds >= 100, "{stats:?}");
    assert!(stats.nonempty_commits >= 10, "{stats:?}");
    // Everything the guest transmitted was released by some commit.
    assert!(
        stats.committed_requests >= guest_tx,
        "commits released {} frames, the guest sent {guest_tx}",
        stats.committed_requests
    );
}

#[test]
fn net_ping_iperf_gating_off() {
    run_guest(false);
}

#[test]
fn net_ping_iperf_gating_hold_with_acknowledger() {
    run_guest(true);
}
