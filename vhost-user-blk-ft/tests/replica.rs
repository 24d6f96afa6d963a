// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--replicate-to`: the daemon binary in hold mode replicating to a real replica service
//! (`ft_common::replica::ReplicaServer`, the one `ft-standby` runs) through a proxy that can
//! stall or cut the link, driven through the real vhost-user and control protocols.
//!
//! The rule under test (docs/architecture.md, "Disk replication"): a held request completes
//! towards the guest only after the replica acknowledged its epoch. Checked: no completion
//! while the link is stalled or cut, COMMIT_FAILED and the error in STATUS meanwhile, nothing
//! new taken while an epoch waits; once the link is back, every request completes exactly
//! once and the replica's image is byte-equal to the primary's (writes, FLUSH, DISCARD,
//! WRITE_ZEROES).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ft_common::control::{ControlClient, DeviceStatus, Reply, Request};
use ft_common::epoch::{Epoch, Generation};
use ft_common::replica::{ReplicaConfig, ReplicaServer};
use ft_common::standby::StandbyAddr;
use ft_tests::frontend::TestFrontend;
use ft_tests::proxy::FaultyProxy;
use virtio_bindings::virtio_blk::*;

mod common;
use common::{blk_req_on, call, new_image, seal_commit, session, spawn, Daemon, IMG_SIZE};

const T: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(300);
const G: Generation = Generation(1);
/// The daemon's bound on waiting for an acknowledgement (--replica-timeout-ms).
const ACK_TIMEOUT_MS: u64 = 1000;

struct Rig {
    daemon: Daemon,
    replica: ReplicaServer,
    proxy: FaultyProxy,
    replica_img: PathBuf,
    store: PathBuf,
    _replica_dir: tempfile::TempDir,
}

fn rig() -> Rig {
    rig_with(&[])
}

fn rig_with(extra: &[&str]) -> Rig {
    let replica_dir = tempfile::tempdir().expect("tempdir");
    let replica_img = replica_dir.path().join("disk.img");
    std::fs::File::create(&replica_img)
        .and_then(|f| f.set_len(IMG_SIZE))
        .expect("replica image");
    let store = replica_dir.path().join("store");
    let replica = ReplicaServer::start(ReplicaConfig {
        listen: "tcp:127.0.0.1:0".parse().unwrap(),
        image: replica_img.clone(),
        store: store.clone(),
        max_epoch_bytes: 64 << 20,
        io_timeout: Duration::from_secs(5),
        dirty_log: None,
    })
    .expect("replica service");
    let StandbyAddr::Tcp(hp) = replica.addr().clone() else {
        panic!("tcp address expected");
    };
    let proxy = FaultyProxy::start("127.0.0.1:0", hp.parse().unwrap()).expect("proxy");
    let (dir, img) = new_image();
    let to = format!("tcp:{}", proxy.addr());
    let daemon = spawn(dir, img, true, T, |c| {
        c.args(["--ft", "hold", "--replicate-to", &to])
            .args(["--replica-timeout-ms", &ACK_TIMEOUT_MS.to_string()])
            .args(extra);
    });
    Rig {
        daemon,
        replica,
        proxy,
        replica_img,
        store,
        _replica_dir: replica_dir,
    }
}

fn commit(c: &mut ControlClient, e: u64) -> Reply {
    call(
        c,
        Request::Commit {
            generation: G,
            epoch: Epoch(e),
            deadline: None,
        },
    )
}

fn status(c: &mut ControlClient) -> DeviceStatus {
    match call(c, Request::Status) {
        Reply::Status(s) => *s,
        r => panic!("{r:?}"),
    }
}

fn wait_held(c: &mut ControlClient, n: u64) {
    let deadline = Instant::now() + T;
    while status(c).held_requests != n {
        assert!(Instant::now() < deadline, "never held {n} requests");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
        .collect()
}

fn write(f: &mut TestFrontend, sector: u64, data: &[u8]) -> u16 {
    let buf = f.alloc(data.len() as u64);
    f.write(buf, data);
    blk_req_on(
        f,
        0,
        VIRTIO_BLK_T_OUT,
        sector,
        Some((buf, data.len() as u32)),
    )
    .0
}

/// DISCARD or WRITE_ZEROES of `sectors` at `sector`.
fn zero(f: &mut TestFrontend, rtype: u32, sector: u64, sectors: u32, unmap: bool) -> u16 {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..16].copy_from_slice(&u32::from(unmap).to_le_bytes());
    let buf = f.alloc(16);
    f.write(buf, &seg);
    blk_req_on(f, 0, rtype, 0, Some((buf, 16))).0
}

fn same_images(r: &Rig) -> bool {
    std::fs::read(&r.daemon.img).unwrap() == std::fs::read(&r.replica_img).unwrap()
}

/// Epoch 1 with every kind of output, while the link is stalled: the commit fails after the
/// ack timeout, the guest sees nothing, STATUS names the error; epoch 2 is held, not taken.
/// Then the link passes again: the next commit completes epoch 1 first, then epoch 2, each
/// request once, and both images are equal.
#[test]
fn guest_completion_waits_for_the_replicas_acknowledgement() {
    let r = rig();
    let mut c = ControlClient::connect(&r.daemon.ctl, T).expect("control");
    let mut f = session(&r.daemon);
    let mut heads = vec![
        write(&mut f, 0, &pattern(1, 64 << 10)),
        write(&mut f, 64, &pattern(2, 4096)), // overlaps the first: guest order decides
        zero(&mut f, VIRTIO_BLK_T_DISCARD, 32, 8, false),
        blk_req_on(&mut f, 0, VIRTIO_BLK_T_FLUSH, 0, None).0,
        zero(&mut f, VIRTIO_BLK_T_WRITE_ZEROES, 200, 16, false),
        write(&mut f, 1000, &pattern(3, 8192)),
    ];
    f.kick(0);
    wait_held(&mut c, heads.len() as u64);

    r.proxy.freeze();
    let t = Instant::now();
    match seal_commit(&mut c, 1) {
        Reply::CommitFailed { epoch, error, .. } => {
            assert_eq!(epoch, Epoch(1));
            assert!(error.contains("replica"), "{error}");
        }
        r => panic!("commit with a stalled replica link: {r:?}"),
    }
    assert!(
        t.elapsed() >= Duration::from_millis(ACK_TIMEOUT_MS),
        "gave up before the ack timeout"
    );
    assert!(
        f.wait_used(0, 1, QUIET).is_empty(),
        "a request completed towards the guest without the replica's acknowledgement"
    );
    let st = status(&mut c);
    let rs = st.replica.expect("replica status");
    assert_eq!(rs.unacked_epoch, Some(Epoch(1)));
    assert!(rs.error.is_some(), "{rs:?}");
    assert_eq!(rs.last_acked, None);
    assert_eq!(st.commits_failed, 1);
    assert!(
        !st.commit_refused,
        "a replica outage must not stop the daemon"
    );
    // The local commit ran: the primary's image has epoch 1, the replica's nothing yet.
    assert!(std::fs::read(&r.replica_img)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert!(!same_images(&r));

    // Epoch 2 while the link is still stalled: held, and not taken by the failed commit.
    heads.push(write(&mut f, 2000, &pattern(4, 4096)));
    f.kick(0);
    wait_held(&mut c, 1);
    assert!(matches!(seal_commit(&mut c, 2), Reply::CommitFailed { .. }));
    assert_eq!(
        status(&mut c).held_requests,
        1,
        "taken before epoch 1 was acknowledged"
    );
    assert!(f.wait_used(0, 1, QUIET).is_empty());

    // Cut the stalled link, let new connections through: epoch 1 is re-sent and acknowledged,
    // then epoch 2 goes.
    r.proxy.cut();
    r.proxy.pass();
    match commit(&mut c, 2) {
        Reply::Committed { epoch, .. } => assert_eq!(epoch, Epoch(2)),
        r => panic!("commit after the link came back: {r:?}"),
    }
    let mut done: Vec<u16> = f.wait_used(0, heads.len(), T).iter().map(|u| u.0).collect();
    assert!(
        f.wait_used(0, 1, QUIET).is_empty(),
        "a request completed twice"
    );
    done.sort_unstable();
    heads.sort_unstable();
    assert_eq!(done, heads, "every request completes once");
    let rs = status(&mut c).replica.expect("replica status");
    assert_eq!((rs.last_acked, rs.unacked_epoch), (Some(Epoch(2)), None));
    assert!(rs.error.is_none(), "{rs:?}");
    assert!(same_images(&r), "replica image differs from the primary's");
    let stats = r.replica.stats();
    assert_eq!(stats.last_applied.map(|l| l.1), Some(Epoch(2)));
    drop(r.store);
}

/// Epochs go in order over one connection, one acknowledgement each; reads are not shipped,
/// and an epoch without output ships nothing.
#[test]
fn every_committed_epoch_reaches_the_replica_in_order() {
    let r = rig();
    let mut c = ControlClient::connect(&r.daemon.ctl, T).expect("control");
    let mut f = session(&r.daemon);
    for e in 1..=5u64 {
        for i in 0..4u64 {
            write(
                &mut f,
                (e * 4 + i) * 8 % 4096,
                &pattern(e as u8 * 4 + i as u8, 4096),
            );
        }
        f.kick(0);
        wait_held(&mut c, 4);
        assert!(matches!(seal_commit(&mut c, e), Reply::Committed { .. }));
        assert_eq!(f.wait_used(0, 4, T).len(), 4);
        assert!(same_images(&r), "after epoch {e}");
    }
    // An empty epoch.
    assert!(matches!(seal_commit(&mut c, 6), Reply::Committed { .. }));
    let stats = r.replica.stats();
    assert_eq!(stats.epochs_applied, 5);
    assert_eq!(stats.last_applied.map(|l| l.1), Some(Epoch(5)));
    let rs = status(&mut c).replica.unwrap();
    assert_eq!((rs.epochs_acked, rs.bytes_acked), (5, 5 * 4 * 4096));
}

/// Bounded memory while the replica does not answer: the epoch waiting for it is the only one
/// taken; new writes fill the held queue up to its limit and then stay on the ring (not even
/// popped), so nothing grows however long the outage lasts. Once the link is back everything
/// completes and the images are equal.
#[test]
fn a_stalled_replica_gives_backpressure_not_buffering() {
    let r = rig_with(&["--max-held-requests", "8"]);
    let mut c = ControlClient::connect(&r.daemon.ctl, T).expect("control");
    let mut f = session(&r.daemon);
    let mut heads = Vec::new();
    for i in 0..4u64 {
        heads.push(write(&mut f, i * 8, &pattern(i as u8, 4096)));
    }
    f.kick(0);
    wait_held(&mut c, 4);
    r.proxy.cut();
    assert!(matches!(seal_commit(&mut c, 1), Reply::CommitFailed { .. }));
    // 40 more writes while the replica is unreachable: 8 are held, the rest wait on the ring.
    for i in 4..44u64 {
        heads.push(write(&mut f, i * 8, &pattern(i as u8, 4096)));
    }
    f.kick(0);
    wait_held(&mut c, 8);
    for e in 2..=4 {
        assert!(matches!(seal_commit(&mut c, e), Reply::CommitFailed { .. }));
        let st = status(&mut c);
        assert_eq!(st.held_requests, 8, "held beyond the limit");
        let rs = st.replica.expect("replica status");
        assert_eq!(
            rs.unacked_epoch,
            Some(Epoch(1)),
            "more than one epoch buffered"
        );
        assert_eq!(rs.unacked_bytes, 4 * 4096);
    }
    assert!(f.wait_used(0, 1, QUIET).is_empty());
    r.proxy.pass();
    // Epoch 5 takes epochs 1 (kept) and 2..=5 (the 8 held); the ring then refills the queue.
    let mut e = 5;
    let mut done = Vec::new();
    let deadline = Instant::now() + T;
    while done.len() < heads.len() {
        assert!(Instant::now() < deadline, "only {} completed", done.len());
        match seal_commit(&mut c, e) {
            Reply::Committed { .. } => {}
            r => panic!("commit {e}: {r:?}"),
        }
        done.extend(f.wait_used(0, heads.len() - done.len(), QUIET));
        e += 1;
    }
    assert_eq!(done.len(), heads.len());
    assert!(same_images(&r));
}

/// Initial sync of a running disk: the primary's image is full of data (and a zero region),
/// the replica's of garbage. With `--replica-initial-sync --replica-sync-chunk-mib 1` each
/// commit ships the next 1 MiB ahead of its own writes, which land before and after the copy
/// cursor. Progress grows in STATUS, the replica's record says "not a copy" until the last
/// chunk is acknowledged, and then both images are byte-equal.
#[test]
fn initial_sync_copies_a_running_disk_and_reports_progress() {
    let replica_dir = tempfile::tempdir().expect("tempdir");
    let replica_img = replica_dir.path().join("disk.img");
    std::fs::write(&replica_img, vec![0xeeu8; IMG_SIZE as usize]).expect("replica image");
    let store = replica_dir.path().join("store");
    let replica = ReplicaServer::start(ReplicaConfig {
        listen: "tcp:127.0.0.1:0".parse().unwrap(),
        image: replica_img.clone(),
        store: store.clone(),
        max_epoch_bytes: 64 << 20,
        io_timeout: Duration::from_secs(5),
        dirty_log: None,
    })
    .expect("replica service");
    let (dir, img) = new_image();
    // 12 MiB of data, then 4 MiB of zeroes.
    let data: Vec<u8> = (0..12u64 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&img).unwrap(),
        &data,
        0,
    )
    .unwrap();
    let to = replica.addr().to_string();
    let daemon = spawn(dir, img, true, T, |c| {
        c.args(["--ft", "hold", "--replicate-to", &to]).args([
            "--replica-initial-sync",
            "--replica-sync-chunk-mib",
            "1",
        ]);
    });
    let mut c = ControlClient::connect(&daemon.ctl, T).expect("control");
    let mut f = session(&daemon);
    let in_sync_record = || {
        ft_common::replica::server::replica_image(&store)
            .unwrap()
            .expect("replica.json")
            .in_sync
    };
    let st = status(&mut c).replica.expect("replica status");
    assert!(!st.in_sync, "in sync before any copy: {st:?}");
    let mut last_percent = 0;
    let mut e = 0;
    loop {
        e += 1;
        assert!(e < 40, "initial sync never finished");
        // One write ahead of the copy cursor and one behind it, every epoch.
        let behind = (e - 1) * 2048 % 32768;
        // (within the first 12 MiB: the last 4 MiB stay zero and go as WRITE_ZEROES)
        let ahead = (e * 2048 + 8192) % 24576;
        write(&mut f, behind, &pattern(e as u8, 4096));
        write(&mut f, ahead, &pattern(e as u8 ^ 0x55, 8192));
        f.kick(0);
        wait_held(&mut c, 2);
        match seal_commit(&mut c, e) {
            Reply::Committed { .. } => {}
            r => panic!("commit {e}: {r:?}"),
        }
        assert_eq!(f.wait_used(0, 2, T).len(), 2);
        let st = status(&mut c).replica.expect("replica status");
        let p = st.sync.clone().expect("sync progress");
        assert!(p.percent >= last_percent, "{p:?}");
        assert!(
            p.percent == 0 || p.rate_kib_s > 0,
            "no rate during the copy: {p:?}"
        );
        last_percent = p.percent;
        if st.in_sync {
            assert_eq!((p.percent, p.copied_bytes), (100, IMG_SIZE));
            assert!(p.zero_chunks >= 4, "{p:?}");
            assert!(p.rate_kib_s > 0, "no rate once done: {p:?}");
            break;
        }
        assert!(
            !in_sync_record(),
            "replica record in sync at {}%",
            p.percent
        );
    }
    assert_eq!(e, 16, "one 1 MiB chunk per commit of a 16 MiB image");
    assert!(in_sync_record());
    assert!(
        std::fs::read(&daemon.img).unwrap() == std::fs::read(&replica_img).unwrap(),
        "replica image differs after the initial sync"
    );
    // Replication goes on as usual afterwards.
    write(&mut f, 100, &pattern(200, 4096));
    f.kick(0);
    wait_held(&mut c, 1);
    assert!(matches!(
        seal_commit(&mut c, e + 1),
        Reply::Committed { .. }
    ));
    assert!(std::fs::read(&daemon.img).unwrap() == std::fs::read(&replica_img).unwrap());
}

/// A held write whose data page the frontend truncates after SEAL: shipping the epoch copies
/// the data, faults, and the SIGBUS handler maps a zero page over the lost one. Those zeros
/// must reach neither the replica (the op is dropped from the frame) nor the local image (the
/// commit never submits a request whose memory is broken); the guest gets no completion.
/// Before the checks both images got the zeros.
#[test]
fn a_write_from_truncated_memory_reaches_neither_image() {
    let r = rig();
    let mut c = ControlClient::connect(&r.daemon.ctl, T).expect("control");
    let mut f = session(&r.daemon);
    let old = pattern(7, 4096);
    let head = write(&mut f, 8, &old);
    f.kick(0);
    wait_held(&mut c, 1);
    assert!(matches!(seal_commit(&mut c, 1), Reply::Committed { .. }));
    assert_eq!(f.wait_used(0, 1, T).first().map(|u| u.0), Some(head));
    assert!(same_images(&r), "epoch 1 not replicated");

    let lost = ft_tests::frontend::MEM_GPA + ft_tests::frontend::MEM_SIZE - 0x1000;
    f.write(lost, &[0x5a; 4096]);
    let (head, _) = blk_req_on(&mut f, 0, VIRTIO_BLK_T_OUT, 8, Some((lost, 4096)));
    let used = f.used_idx(0);
    f.kick(0);
    wait_held(&mut c, 1);
    match call(
        &mut c,
        Request::Seal {
            generation: G,
            epoch: Epoch(2),
        },
    ) {
        Reply::Sealed { .. } => {}
        r => panic!("seal 2: {r:?}"),
    }
    f.truncate_guest_memory(ft_tests::frontend::MEM_SIZE - 0x1000);
    // The write fails (EFAULT, as when the kernel's own copy faults): COMMIT_FAILED.
    let reply = commit(&mut c, 2);
    assert!(matches!(reply, Reply::CommitFailed { .. }), "{reply:?}");
    let img = std::fs::read(&r.daemon.img).unwrap();
    assert!(
        img[8 * 512..8 * 512 + 4096] == old[..],
        "zeros on the local image"
    );
    let rep = std::fs::read(&r.replica_img).unwrap();
    assert!(
        rep[8 * 512..8 * 512 + 4096] == old[..],
        "zeros on the replica"
    );
    std::thread::sleep(QUIET);
    assert_eq!(
        f.used_idx(0),
        used,
        "head {head} over lost memory completed"
    );
}
