// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Arbitration on a real etcd (started per test on loopback): one holder of a VM's key at a
//! time, the next holder only after the previous one's commit deadline, generations above
//! every one ever written; a block daemon refusing a COMMIT after its deadline over the real
//! control protocol; and `ft-coordinator --etcd` committing under its lease, `ftctl abort`
//! handing the key over at once, a stale host refused; and a three-member cluster: the holder
//! keeps its key through the loss of any one member (the leader too) and loses it, committing
//! nothing after its deadline, without a majority.
//!
//! The partition (a primary cut off from etcd) is tests/tests/partition_etcd.rs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ft_common::arbiter::claim::ClaimError;
use ft_common::arbiter::{ArbiterConfig, Claim};
use ft_common::control::deadline::MonotonicTime;
use ft_common::control::{ControlClient, ErrorCode, Reply, Request};
use ft_common::epoch::{Epoch, Generation};
use ft_common::fence::GenerationStore;
use ft_tests::blk_client::BlkClient;
use ft_tests::etcd::{self, EtcdCluster, EtcdServer};
use ft_tests::guest::image::workspace_binary;
use ft_tests::guest::{Backend, BackendCommand, ScratchDir};
use ft_tests::stamped::{blocks_in_image, writer, BLOCK, MAX_WRITES};

const T: Duration = Duration::from_secs(20);

fn binary(package: &str, name: &str) -> PathBuf {
    workspace_binary(package, name).unwrap_or_else(|e| panic!("{name} binary: {e}"))
}

fn need_etcd() {
    assert!(
        etcd::available(),
        "etcd is not installed: run scripts/setup.sh (Debian's etcd-server)"
    );
}

fn config(etcd: &EtcdServer, vm: &str, who: &str) -> ArbiterConfig {
    ArbiterConfig::new(vec![etcd.endpoint().into()], vm.into(), who.into())
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The key has one holder; the next one gets it only after a revoke or after the previous
/// holder's commit deadline; every generation is above all written before; a host whose
/// generation is behind etcd's (another host took over since) is refused.
#[test]
fn one_holder_at_a_time_and_the_next_only_after_the_deadline() {
    need_etcd();
    let s = ScratchDir::new("arb-key").expect("scratch");
    let etcd = EtcdServer::start_loopback(&s.join("etcd.log")).expect("etcd");

    let a = Claim::acquire(&config(&etcd, "vm1", "host A"), Some(T)).expect("A acquires");
    let first = a.deadline();
    assert!(
        first <= MonotonicTime::now().plus(Duration::from_millis(1500)),
        "deadline beyond TTL - margin"
    );
    // The keepalive moves the deadline forward.
    wait_until("a renewed deadline", T, || a.deadline() > first);

    match Claim::acquire(
        &config(&etcd, "vm1", "host B"),
        Some(Duration::from_millis(300)),
    ) {
        Err(ClaimError::Busy { holder, .. }) => assert!(holder.contains("host A"), "{holder}"),
        other => panic!("B acquired a held key: {other:?}"),
    }

    let store_a = GenerationStore::new(s.join("a.gen"));
    let store_b = GenerationStore::new(s.join("b.gen"));
    assert_eq!(
        a.advance_generation(&store_a, Generation(0), true).unwrap(),
        Generation(1)
    );
    let rec = etcd.get("/ft-vhost/vm/vm1/generation").unwrap().unwrap();
    assert!(rec.contains("\"generation\":1"), "{rec}");

    // A revoke hands the key over at once (no TTL to wait for).
    let b_cfg = config(&etcd, "vm1", "host B");
    let waiter = std::thread::spawn(move || {
        let c = Claim::acquire(&b_cfg, Some(T));
        (c, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    let revoked = Instant::now();
    a.revoke().expect("revoke");
    assert_eq!(
        a.deadline(),
        MonotonicTime(0),
        "a revoked claim still commits"
    );
    let (b, b_at) = waiter.join().unwrap();
    let b = b.expect("B acquires after the revoke");
    eprintln!(
        "handover after revoke: {:?}",
        b_at.saturating_duration_since(revoked)
    );
    // B's floor: its own store is empty, etcd says 1.
    assert_eq!(
        b.advance_generation(&store_b, Generation(0), false)
            .unwrap(),
        Generation(2)
    );

    // Expiry: B stops renewing (its process "dies"); the next holder gets the key only once
    // B's last deadline has passed.
    let b_deadline = b.deadline();
    drop(b);
    let c = Claim::acquire(&config(&etcd, "vm1", "host A again"), Some(T)).expect("expiry");
    let acquired = MonotonicTime::now();
    assert!(
        acquired > b_deadline,
        "acquired {acquired} before the previous holder's deadline {b_deadline}"
    );
    eprintln!(
        "acquired {:?} after the previous holder's commit deadline",
        acquired.since(b_deadline)
    );
    // Host A's copy is stale now: etcd's generation 2 is above its 1.
    match c.advance_generation(&store_a, Generation(0), true) {
        Err(ClaimError::TakenOver { etcd, local, .. }) => {
            assert_eq!((etcd, local), (Generation(2), Generation(1)))
        }
        other => panic!("a stale host was not refused: {other:?}"),
    }
    assert_eq!(
        store_a.load().unwrap(),
        Generation(1),
        "refused but persisted"
    );
}

fn blk_daemon(s: &ScratchDir, image: &Path) -> Backend {
    let args: Vec<OsString> = vec![
        "--socket".into(),
        s.join("blk.sock").into(),
        "--image".into(),
        image.into(),
        "--ft".into(),
        "hold".into(),
        "--control".into(),
        s.join("blk.ctl").into(),
    ];
    Backend::start(
        &BackendCommand::new(
            binary("vhost-user-blk-ft", "vhost-user-blk-ft"),
            args,
            s.join("blk.sock"),
        ),
        &s.join("blk.log"),
        T,
    )
    .expect("start vhost-user-blk-ft")
}

fn held(c: &mut ControlClient) -> u64 {
    match c.call(&Request::Status).expect("status") {
        Reply::Status(st) => st.held_requests,
        r => panic!("{r:?}"),
    }
}

/// The daemon, not the coordinator, enforces the deadline: a COMMIT whose deadline passed is
/// `DEADLINE_PASSED` and writes nothing; the same epoch with a later deadline commits.
#[test]
fn a_daemon_refuses_a_commit_after_its_deadline() {
    let s = ScratchDir::new("arb-dl").expect("scratch");
    let image = s.raw_image("disk.raw", 1 << 20).expect("image");
    let _daemon = blk_daemon(&s, &image);
    let mut client =
        BlkClient::connect(s.join("blk.sock").to_str().unwrap(), 1, 64).expect("client");
    let buf = client.alloc_buffer(4096).expect("buffer");
    client.buf_mut(buf).fill(0xa5);
    client
        .submit_write(0, 8192, buf.slice(0, 4096), 1)
        .expect("submit");
    client.kick(0).expect("kick");
    let mut ctl = ControlClient::connect(s.join("blk.ctl"), T).expect("control");
    wait_until("the write held", T, || held(&mut ctl) == 1);
    let g = Generation(1);
    assert!(matches!(
        ctl.call(&Request::Seal {
            generation: g,
            epoch: Epoch(1)
        }),
        Ok(Reply::Sealed { .. })
    ));
    let late = ctl
        .call(&Request::Commit {
            generation: g,
            epoch: Epoch(1),
            deadline: Some(MonotonicTime::now().minus(Duration::from_millis(1))),
        })
        .expect("commit");
    match late {
        Reply::Error { code, .. } => assert_eq!(code, ErrorCode::DeadlinePassed),
        r => panic!("a late COMMIT was answered {r:?}"),
    }
    let on_disk = std::fs::read(&image).unwrap();
    assert!(
        on_disk[8192..12288].iter().all(|&b| b == 0),
        "a refused commit wrote"
    );
    assert_eq!(held(&mut ctl), 1, "a refused commit released its request");
    match ctl
        .call(&Request::Commit {
            generation: g,
            epoch: Epoch(1),
            deadline: Some(MonotonicTime::now().plus(Duration::from_secs(30))),
        })
        .expect("commit")
    {
        Reply::Committed { stats, .. } => assert_eq!(stats.requests, 1),
        r => panic!("{r:?}"),
    }
    let on_disk = std::fs::read(&image).unwrap();
    assert!(on_disk[8192..12288].iter().all(|&b| b == 0xa5));
    let mut done = 0;
    wait_until("the guest's completion", T, || {
        client.drain_completions(0, |c| {
            assert!(c.is_ok());
            done += 1
        });
        done == 1
    });
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ft-coordinator --etcd ETCD --vm-key VM` over the block daemon of `s`, a cut every 20 ms.
fn coordinator(s: &ScratchDir, etcd: &str, vm: &str, state: &Path, log: &str) -> Command {
    let mut c = Command::new(binary("ft-common", "ft-coordinator"));
    c.arg("--device")
        .arg(format!("blk={}", s.join("blk.ctl").display()))
        .args(["--checkpointer", "sim", "--unsafe-no-checkpoint"])
        .args(["--interval-ms", "20"])
        .arg("--state-file")
        .arg(state)
        .arg("--api")
        .arg(s.join("api.sock"))
        .args(["--etcd", etcd, "--vm-key", vm])
        .args(["--lease-ttl", "2s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(s.join(log)).unwrap());
    c
}

fn ftctl(api: &Path, cmd: &str) -> serde_json::Value {
    let o = Command::new(binary("ft-common", "ftctl"))
        .arg("--api")
        .arg(api)
        .arg(cmd)
        .output()
        .expect("ftctl");
    assert!(
        o.status.success(),
        "ftctl {cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("ftctl JSON")
}

/// `ft-coordinator --etcd`: holds the key, commits (with deadlines the daemon admits), shows
/// its lease; `ftctl abort` revokes it (the key is free at once); a coordinator on a host
/// whose generation is behind etcd's does not start.
#[test]
fn a_coordinator_commits_under_its_lease_and_abort_hands_the_key_over() {
    need_etcd();
    let s = ScratchDir::new("arb-co").expect("scratch");
    let etcd = EtcdServer::start_loopback(&s.join("etcd.log")).expect("etcd");
    let image = s.raw_image("disk.raw", 1 << 20).expect("image");
    let _daemon = blk_daemon(&s, &image);
    let state = s.join("coord.state");
    let _co = Proc(
        coordinator(&s, etcd.host_port(), "vm2", &state, "coord.log")
            .spawn()
            .expect("coordinator"),
    );
    wait_until("the API socket", T, || s.join("api.sock").exists());
    let mut client =
        BlkClient::connect(s.join("blk.sock").to_str().unwrap(), 1, 64).expect("client");
    // Committed under the lease: the write completes.
    client
        .write_at(0, 0, &[0x5a; 4096])
        .expect("a write committed under the lease");
    assert!(std::fs::read(&image).unwrap()[..4096]
        .iter()
        .all(|&b| b == 0x5a));
    let st = ftctl(&s.join("api.sock"), "status");
    let lease = &st["lease"];
    assert_eq!(lease["held"], true, "{lease}");
    assert!(lease["deadline_in_ms"].as_i64().unwrap() > 0, "{lease}");
    assert_eq!(st["generation"], 1);
    let o = Command::new(binary("ft-common", "ftctl"))
        .arg("--api")
        .arg(s.join("api.sock"))
        .arg("metrics")
        .output()
        .expect("ftctl metrics");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("\nft_lease_held 1\n"), "{text}");
    assert!(text.contains("ft_lease_deadline_seconds "), "{text}");
    let key = etcd.get("/ft-vhost/vm/vm2/primary").unwrap().expect("key");
    assert!(key.contains("ft-coordinator"), "{key}");

    let ab = ftctl(&s.join("api.sock"), "abort");
    assert_eq!(ab["lease_revoked"], true, "{ab}");
    // The abort's generation is in etcd too (above the coordinator's 1).
    assert_eq!(ab["generation"], 2, "{ab}");
    let gen = etcd.get("/ft-vhost/vm/vm2/generation").unwrap().unwrap();
    assert!(gen.contains("\"generation\":2"), "{gen}");
    assert_eq!(
        etcd.get("/ft-vhost/vm/vm2/primary").unwrap(),
        None,
        "the key outlived the revoke"
    );

    // Another host took the VM over (generation 7 in etcd): this host's coordinator, whose
    // state file says 2, must not start.
    etcd.put(
        "/ft-vhost/vm/vm2/generation",
        r#"{"generation":7,"holder":"ftctl takeover on B"}"#,
    )
    .unwrap();
    let out = coordinator(&s, etcd.host_port(), "vm2", &state, "coord2.log")
        .stderr(Stdio::piped())
        .output()
        .expect("second coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stale host's coordinator started");
    assert!(err.contains("another host took over"), "{err}");
}

/// `ftctl status` of the coordinator at `api`, once it answers.
fn status(api: &Path) -> Option<serde_json::Value> {
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

fn commits(st: &serde_json::Value) -> u64 {
    st["devices"][0]["commits_ok"].as_u64().unwrap_or(0)
}

/// Lease TTL of the coordinator in the cluster test (its default).
const TTL: Duration = Duration::from_secs(2);
/// And its margin (a quarter of the TTL).
const MARGIN: Duration = Duration::from_millis(500);

/// Kills member `victim` and checks that the coordinator keeps its key: its lease is renewed
/// by a keepalive sent after the kill, it is never lost or deposed meanwhile, and commits go on.
/// Returns how long the survivors took to agree on a leader and the renewal after the kill.
fn survives_the_loss_of(
    cluster: &mut EtcdCluster,
    victim: usize,
    survivors: &[usize],
    api: &Path,
) -> (Duration, Duration) {
    let before = commits(&status(api).expect("status"));
    let killed = MonotonicTime::now();
    cluster.kill(victim);
    let t0 = Instant::now();
    let mut leader_after = None;
    loop {
        if leader_after.is_none() && cluster.leader(survivors).is_some() {
            leader_after = Some(t0.elapsed());
        }
        let st = status(api).expect("status");
        let lease = &st["lease"];
        assert!(
            lease["lost"].is_null() && lease["held"] == true && st["cycle"]["deposed"] != true,
            "the holder lost its key when {} of 3 members died: {st:#}",
            cluster.name(victim)
        );
        // Renewed by a keepalive sent after the kill, and committing since.
        let d = MonotonicTime(lease["deadline_monotonic_us"].as_u64().unwrap_or(0));
        if d > killed.plus(TTL - MARGIN) && commits(&st) > before + 5 && leader_after.is_some() {
            return (
                leader_after.unwrap_or_default(),
                d.since(killed) - (TTL - MARGIN),
            );
        }
        assert!(
            t0.elapsed() < T,
            "no renewal or commits after {} died: {st:#}",
            cluster.name(victim)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A three-member etcd cluster on loopback (the coordinator given all three endpoints): the
/// holder keeps its key while one member is down, a follower and then the leader; with two of
/// three down its deadline passes, it deposes itself and nothing the guest wrote after the
/// deadline reaches the image; once the majority is back a standby acquires the key, after
/// that deadline, with a generation above the holder's.
#[test]
fn three_members_keep_the_holder_through_one_failure_and_depose_it_without_a_majority() {
    need_etcd();
    let s = ScratchDir::new("arb-3m").expect("scratch");
    // Elections after 400 ms (etcd's default 1 s, randomised up to 2 s, would let the
    // holder's 1.5 s deadline pass while a new leader is elected: see docs/operations.md).
    let mut cluster = EtcdCluster::start_loopback(3, s.path(), 50, 400).expect("etcd cluster");
    let image = s
        .raw_image("disk.raw", (MAX_WRITES * BLOCK) as u64)
        .expect("image");
    let _daemon = blk_daemon(&s, &image);
    let api = s.join("api.sock");
    let _co = Proc(
        coordinator(
            &s,
            &cluster.host_ports(),
            "vm3",
            &s.join("a.state"),
            "coord.log",
        )
        .spawn()
        .expect("coordinator"),
    );
    wait_until("the coordinator holding the key", T, || {
        status(&api).is_some_and(|st| st["lease"]["held"] == true)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (sock, stop) = (s.join("blk.sock"), stop.clone());
        std::thread::spawn(move || writer(sock, stop, Duration::from_millis(10)))
    };
    wait_until("commits under the lease", T, || {
        status(&api).is_some_and(|st| commits(&st) >= 10)
    });

    // One member down: first a follower, then (with the follower back) the leader.
    let all = [0, 1, 2];
    let leader = cluster.leader(&all).expect("a leader");
    let follower = (leader + 1) % 3;
    let rest: Vec<usize> = all.into_iter().filter(|&i| i != follower).collect();
    let (_, renewed) = survives_the_loss_of(&mut cluster, follower, &rest, &api);
    eprintln!(
        "follower {} killed: renewed {renewed:?} after the kill",
        cluster.name(follower)
    );
    cluster.restart(follower).expect("restart the follower");
    cluster.wait_healthy(&all, T).expect("three members again");
    let leader = cluster.leader(&all).expect("a leader");
    let rest: Vec<usize> = all.into_iter().filter(|&i| i != leader).collect();
    let (elected, renewed) = survives_the_loss_of(&mut cluster, leader, &rest, &api);
    eprintln!(
        "leader {} killed: new leader after {elected:?}, renewed {renewed:?} after the kill",
        cluster.name(leader)
    );
    match Claim::acquire(
        &ArbiterConfig::new(cluster.endpoints(), "vm3".into(), "standby".into()),
        Some(Duration::from_millis(500)),
    ) {
        Err(ClaimError::Busy { holder, .. }) => {
            assert!(holder.contains("ft-coordinator"), "{holder}")
        }
        other => panic!("a standby acquired a held key with 2 of 3 members up: {other:?}"),
    }

    // Two of three down: no quorum, no renewal. The holder's deadline passes; it deposes itself.
    // The second one killed is the new leader: a leader left alone would go on renewing leases
    // until it notices it has no majority (an election timeout later), the lone follower
    // renews nothing.
    let second = cluster.leader(&rest).expect("a new leader");
    let cut = MonotonicTime::now();
    cluster.kill(second);
    let mut deadline = MonotonicTime(0);
    let t0 = Instant::now();
    loop {
        let st = status(&api).expect("status without a majority");
        let d = st["lease"]["deadline_monotonic_us"].as_u64().unwrap_or(0);
        deadline = deadline.max(MonotonicTime(d));
        if !st["lease"]["lost"].is_null() && st["cycle"]["deposed"] == true {
            break;
        }
        assert!(t0.elapsed() < T, "the holder never noticed: {st:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let lost_seen = MonotonicTime::now();
    assert!(
        deadline <= cut.plus(TTL - MARGIN),
        "deadline {deadline} later than the second kill {cut} + TTL - margin"
    );
    // The guest writes on past the deadline; those writes stay held.
    std::thread::sleep(Duration::from_millis(300));
    match ControlClient::connect(s.join("blk.ctl"), T)
        .expect("control")
        .call(&Request::Status)
        .expect("status")
    {
        Reply::Status(st) => assert!(st.held_requests > 0, "nothing held after the deadline"),
        r => panic!("{r:?}"),
    }
    stop.store(true, Ordering::Release);
    let written = w.join().expect("writer");
    let found = blocks_in_image(&image);
    let after_deadline = written.submitted.iter().filter(|&&t| t > deadline).count();
    assert!(after_deadline > 0, "nothing written after the deadline");
    let late: Vec<_> = found.iter().filter(|(_, t)| *t > deadline).collect();
    assert!(
        late.is_empty(),
        "{} writes submitted after the deadline reached the image: {late:?}",
        late.len()
    );

    // The majority back: a standby acquires the key (once the old lease expired on the new
    // leader), after the old holder's deadline, and takes a generation above the holder's 1.
    let back = MonotonicTime::now();
    cluster.restart(leader).expect("restart");
    cluster.restart(second).expect("restart");
    cluster.wait_healthy(&all, T).expect("majority back");
    let standby = Claim::acquire(
        &ArbiterConfig::new(cluster.endpoints(), "vm3".into(), "standby".into()),
        Some(T),
    )
    .expect("the standby acquires the key once the majority is back");
    let acquired = standby.acquired_at();
    assert!(acquired > deadline, "acquired before the old deadline");
    assert_eq!(
        standby
            .advance_generation(
                &GenerationStore::new(s.join("b.state")),
                Generation(0),
                false
            )
            .expect("generation"),
        Generation(2)
    );
    eprintln!(
        "two of three down: deadline {} ms after the second kill, loss seen {} ms after it; \
         {} of {} writes committed, {after_deadline} submitted after the deadline, none on \
         disk; majority restarted {} ms after the second kill, standby acquired the key {} ms \
         after that",
        deadline.since(cut).as_millis(),
        lost_seen.since(cut).as_millis(),
        found.len(),
        written.submitted.len(),
        back.since(cut).as_millis(),
        acquired.since(back).as_millis(),
    );
}
