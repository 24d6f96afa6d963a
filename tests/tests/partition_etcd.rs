// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Partition: the old primary's coordinator loses etcd while it keeps running. Hosts as network
//! namespaces on this machine: etcd in `E`, the primary's coordinator in `A`, the standby's
//! `ftctl takeover` in `B` (veth links E-A and E-B). The primary's block daemon runs gated
//! (`--ft hold`) with a VM-less client writing numbered, timestamped blocks.
//!
//! At the cut (`ip link set down` on A's link) the coordinator keeps running. Checked:
//! - it commits nothing after its deadline: no block the client submitted after the
//!   coordinator's last commit deadline is in the image (the daemon still holds them), although
//!   the old daemon is NOT fenced (the takeover cannot reach it, as in a real partition): the
//!   deadline alone stops it;
//! - the coordinator deposes itself (lease lost) and says so;
//! - the standby's `ftctl takeover --etcd` waits while A's lease lives and acquires the key
//!   only after A's deadline, then writes a generation above A's to etcd.
//!
//! And a takeover that cannot get the key (the primary's lease lives) changes nothing.
//!
//! What is not run here: the standby restoring a VM (the takeover has no real checkpoint and
//! fails at starting QEMU, as in tests/tests/takeover_cli.rs); the full takeover with QEMU is
//! tests/tests/e2e_failover.rs (its chain of kill points runs under etcd, with `ftctl takeover
//! --etcd` restoring the guest).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ft_common::control::deadline::MonotonicTime;
use ft_common::control::{ControlClient, Reply, Request};
use ft_common::epoch::Generation;
use ft_common::standby::store::CheckpointStore;
use ft_common::takeover::vm_record::peer_pid;
use ft_tests::etcd::{self, veth, EtcdServer, Netns};
use ft_tests::guest::{Backend, BackendCommand, ScratchDir};
use ft_tests::stamped::{blocks_in_image, writer, BLOCK, MAX_WRITES};
use ft_tests::takeover_store::{binary, blk_args, store_with_checkpoint};

const T: Duration = Duration::from_secs(30);

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The standby's store: a stand-in checkpoint of generation 1 and a vm.json whose daemon runs
/// on `new.*` sockets and whose QEMU is /bin/false (the takeover fails there, after the
/// arbitration and the generation, which are what this test is about).
fn standby_store(s: &ScratchDir, image: &Path) -> PathBuf {
    store_with_checkpoint(s, 1, 1, vec!["/bin/false".into()], image)
}

fn ftctl_status(api: &Path) -> Option<serde_json::Value> {
    let o = Command::new(binary("ft-common", "ftctl"))
        .arg("--api")
        .arg(api)
        .arg("status")
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[test]
fn a_partitioned_primary_stops_committing_at_its_deadline_and_the_standby_takes_over() {
    assert!(
        etcd::available(),
        "etcd is not installed: run scripts/setup.sh (Debian's etcd-server)"
    );
    let s = ScratchDir::new("partition").expect("scratch");
    let pid = std::process::id() % 100_000;
    let (ns_e, ns_a, ns_b) = (
        Netns::new("e").expect("netns E"),
        Netns::new("a").expect("netns A"),
        Netns::new("b").expect("netns B"),
    );
    let (e_a, a_e) = (format!("etcdea{pid}"), format!("etcdae{pid}"));
    let (e_b, b_e) = (format!("etcdeb{pid}"), format!("etcdbe{pid}"));
    veth(&ns_e, &e_a, "10.47.1.1", &ns_a, &a_e, "10.47.1.2").expect("link E-A");
    veth(&ns_e, &e_b, "10.47.2.1", &ns_b, &b_e, "10.47.2.2").expect("link E-B");
    let etcd = EtcdServer::start_in(&ns_e, "10.47.1.1", &s.join("etcd.log")).expect("etcd");
    let port = etcd.host_port().rsplit(':').next().unwrap().to_string();
    let (from_a, from_b) = (format!("10.47.1.1:{port}"), format!("10.47.2.1:{port}"));

    // The primary: its block daemon (unix sockets only), its coordinator on host A.
    let image = s
        .raw_image("disk.raw", (MAX_WRITES * BLOCK) as u64)
        .expect("image");
    let _daemon = Backend::start(
        &BackendCommand::new(
            binary("vhost-user-blk-ft", "vhost-user-blk-ft"),
            blk_args(&s, &image, "old"),
            s.join("old.sock"),
        ),
        &s.join("old.log"),
        T,
    )
    .expect("block daemon");
    let api = s.join("api.sock");
    let _coordinator = Proc(
        ns_a.command(binary("ft-common", "ft-coordinator"))
            .arg("--device")
            .arg(format!("blk={}", s.join("old.ctl").display()))
            .args(["--checkpointer", "sim", "--unsafe-no-checkpoint"])
            .args(["--interval-ms", "20", "--on-device-failure", "continue"])
            .arg("--state-file")
            .arg(s.join("a.state"))
            .arg("--api")
            .arg(&api)
            .args(["--etcd", &from_a, "--vm-key", "pvm", "--lease-ttl", "2s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(s.join("coordinator.log")).unwrap())
            .spawn()
            .expect("coordinator"),
    );
    let t0 = Instant::now();
    let held = loop {
        if let Some(st) = ftctl_status(&api) {
            if st["lease"]["held"] == true {
                break st;
            }
        }
        assert!(t0.elapsed() < T, "the coordinator never held the key");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(held["generation"], 1);

    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (sock, stop) = (s.join("old.sock"), stop.clone());
        std::thread::spawn(move || writer(sock, stop, Duration::from_millis(5)))
    };
    // Commits flow under the lease.
    let t0 = Instant::now();
    loop {
        let st = ftctl_status(&api).expect("status");
        if st["devices"][0]["commits_ok"].as_u64().unwrap_or(0) >= 10
            && blocks_in_image(&image).len() >= 10
        {
            break;
        }
        assert!(t0.elapsed() < T, "no commits under the lease: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The standby starts its takeover now: it must wait while A's lease lives.
    let store = standby_store(&s, &s.raw_image("standby.raw", 1 << 20).expect("image"));
    let takeover = ns_b
        .command(binary("ft-common", "ftctl"))
        .arg("takeover")
        .arg("--store")
        .arg(&store)
        .arg("--state-file")
        .arg(s.join("b.state"))
        .arg("--run-dir")
        .arg(s.join("run"))
        // As in a real partition, the takeover cannot reach the old daemon: only the
        // deadline stops the old primary.
        .args(["--fence", "blk=/nonexistent/old.ctl"])
        .args([
            "--etcd",
            &from_b,
            "--vm-key",
            "pvm",
            "--etcd-wait-ms",
            "30000",
        ])
        .args(["--timeout-ms", "10000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ftctl takeover");
    std::thread::sleep(Duration::from_millis(300));

    // The cut: host A loses etcd; its coordinator keeps running.
    let cut = MonotonicTime::now();
    ns_a.ip(&["link", "set", &a_e, "down"]).expect("cut A");

    // The coordinator's deadline stops moving; it notices the loss.
    let mut deadline = MonotonicTime(0);
    let t0 = Instant::now();
    let lost = loop {
        let st = ftctl_status(&api).expect("status after the cut");
        let d = st["lease"]["deadline_monotonic_us"].as_u64().unwrap_or(0);
        deadline = deadline.max(MonotonicTime(d));
        // The loss is recorded, then the cycle told: wait for both.
        if !st["lease"]["lost"].is_null() && st["cycle"]["deposed"] == true {
            break st;
        }
        assert!(t0.elapsed() < T, "the coordinator never noticed: {st}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let lost_seen = MonotonicTime::now();
    assert!(
        deadline <= cut.plus(Duration::from_millis(1500)),
        "deadline {deadline} later than the cut {cut} + TTL - margin"
    );
    assert_eq!(lost["cycle"]["deposed"], true, "{}", lost["cycle"]);

    let out = takeover.wait_with_output().expect("takeover");
    let terr = String::from_utf8_lossy(&out.stderr).into_owned();
    std::fs::write(s.join("takeover.log"), &terr).unwrap();
    if let Ok(pid) = peer_pid(&s.join("new.ctl")) {
        // SAFETY: kill(2) on the daemon this test made ftctl start.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    // The takeover got past the arbitration and failed only at QEMU (/bin/false).
    assert!(terr.contains("QEMU exited"), "takeover: {terr}");
    let acquired = terr
        .split("acquired_at_us=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .map(MonotonicTime)
        .unwrap_or_else(|| panic!("no acquisition in the takeover's log: {terr}"));
    assert!(
        acquired > deadline,
        "the standby acquired the key at {acquired}, before the old primary's deadline {deadline}"
    );
    let gen = etcd
        .get("/ft-vhost/vm/pvm/generation")
        .unwrap()
        .expect("gen");
    assert!(
        gen.contains("\"generation\":2") && gen.contains("takeover"),
        "{gen}"
    );

    // Let the old primary run on past the expiry, then stop the client.
    std::thread::sleep(Duration::from_millis(300));
    // The old daemon was never fenced and still holds what came after the deadline (the
    // client's disconnect below cancels it).
    let mut ctl = ControlClient::connect(s.join("old.ctl"), T).expect("old control");
    match ctl.call(&Request::Status).expect("status") {
        Reply::Status(st) => {
            assert_eq!(st.generation, Generation(1), "the old daemon was fenced");
            assert!(st.held_requests > 0, "nothing held after the deadline");
        }
        r => panic!("{r:?}"),
    }
    stop.store(true, Ordering::Release);
    let written = w.join().expect("writer");

    // Nothing submitted after the deadline reached the image, although such writes exist
    // and the old daemon still admits generation 1 (never fenced).
    let found = blocks_in_image(&image);
    let after_deadline = written.submitted.iter().filter(|&&t| t > deadline).count();
    assert!(
        after_deadline > 0,
        "the client wrote nothing after the deadline"
    );
    let late: Vec<_> = found.iter().filter(|(_, t)| *t > deadline).collect();
    assert!(
        late.is_empty(),
        "{} writes submitted after the deadline reached the image: {late:?}",
        late.len()
    );
    let last_found = found.iter().map(|(_, t)| *t).max().expect("blocks");
    eprintln!(
        "partition: deadline {} ms after the cut, lease loss seen {} ms after the cut; \
         standby acquired the key {} ms after the cut ({} ms after the deadline); \
         newest committed write submitted {} ms after the cut; {} of {} writes committed, \
         {} submitted after the deadline, none of them on disk",
        ms(deadline.since(cut)),
        ms(lost_seen.since(cut)),
        ms(acquired.since(cut)),
        ms(acquired.since(deadline)),
        last_found.0 as i128 / 1000 - cut.0 as i128 / 1000,
        found.len(),
        written.submitted.len(),
        after_deadline,
    );
}

/// A takeover that cannot get the key (the primary's lease lives) changes nothing: no
/// generation persisted, the store not fenced, no daemon started; the error names the holder.
#[test]
fn a_takeover_without_the_key_changes_nothing() {
    assert!(
        etcd::available(),
        "etcd is not installed: run scripts/setup.sh (Debian's etcd-server)"
    );
    let s = ScratchDir::new("tk-nokey").expect("scratch");
    let etcd = EtcdServer::start_loopback(&s.join("etcd.log")).expect("etcd");
    let primary = ft_common::arbiter::Claim::acquire(
        &ft_common::arbiter::ArbiterConfig::new(
            vec![etcd.endpoint().into()],
            "kvm".into(),
            "the live primary".into(),
        ),
        Some(T),
    )
    .expect("the primary holds the key");
    let store = standby_store(&s, &s.raw_image("standby.raw", 1 << 20).expect("image"));
    let state = s.join("b.state");
    let out = Command::new(binary("ft-common", "ftctl"))
        .arg("takeover")
        .arg("--store")
        .arg(&store)
        .arg("--state-file")
        .arg(&state)
        .arg("--run-dir")
        .arg(s.join("run"))
        .args(["--etcd", etcd.host_port(), "--vm-key", "kvm"])
        .args(["--etcd-wait-ms", "700"])
        .output()
        .expect("ftctl takeover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "took over a held key");
    assert!(err.contains("the live primary"), "{err}");
    assert!(!state.exists(), "a generation was persisted");
    assert_eq!(
        CheckpointStore::open(&store)
            .unwrap()
            .fenced_generation()
            .unwrap(),
        Generation(0),
        "the store was fenced"
    );
    assert!(!s.join("new.ctl").exists(), "a daemon was started");
    drop(primary);
}
