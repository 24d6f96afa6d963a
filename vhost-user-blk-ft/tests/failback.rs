// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Failback after a takeover (`--dirty-log`, `--replica-resync dirty`,
//! `ReplicaConfig::dirty_log`): the daemon binary on two hosts' images (A and B, two
//! directories), the real replica service and the real vhost-user and control protocols.
//!
//! 1. A is the primary, replicating to B through a proxy, and tracks into A's dirty log. A few
//!    epochs are acknowledged; then the link stalls and A writes one more epoch locally that B
//!    never receives (its commit fails); A is killed (SIGKILL: its log keeps only what it synced).
//! 2. "Takeover": B's replica is fenced and a daemon runs on B's image, tracking into B's log;
//!    it writes known blocks (and a DISCARD), then stops cleanly.
//! 3. Failback: a replica service on A's image with A's log, B's daemon restarted with
//!    `--replicate-to A --replica-resync dirty`. The resync copies exactly B's blocks united with
//!    every block of A's activity-log extents (A crashed), writes keep going meanwhile, and then
//!    both images are byte-equal, including the block A wrote in the unacknowledged epoch.
//!
//! The re-protect chain then takes over back to A and fails back to B the same way.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ft_common::control::{ControlClient, DeviceStatus, Reply, Request};
use ft_common::replica::dirty::DirtyLog;
use ft_common::replica::{ReplicaConfig, ReplicaServer};
use ft_common::standby::StandbyAddr;
use ft_tests::frontend::TestFrontend;
use ft_tests::proxy::FaultyProxy;
use virtio_bindings::virtio_blk::*;

mod common;
use common::{blk_req_on, call, seal_commit, session, spawn, Daemon, IMG_SIZE};

const T: Duration = Duration::from_secs(10);
const BLOCK: u64 = 4096;
/// A's dirty log: 64 KiB activity-log extents (16 blocks), so that the crash's extra copying is
/// small and countable.
const EXTENT_BLOCKS: u64 = 16;
const IMAGE_BLOCKS: u64 = IMG_SIZE / BLOCK;

/// One host's image and dirty log.
struct Host {
    dir: tempfile::TempDir,
    img: PathBuf,
    log: PathBuf,
}

fn host(fill: u8) -> Host {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![fill; IMG_SIZE as usize]).expect("image");
    let log = dir.path().join("dirty.log");
    Host { dir, img, log }
}

impl Host {
    fn store(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn replica_on(h: &Host, store: &str) -> ReplicaServer {
    ReplicaServer::start(ReplicaConfig {
        listen: "tcp:127.0.0.1:0".parse().unwrap(),
        image: h.img.clone(),
        store: h.store(store),
        max_epoch_bytes: 64 << 20,
        io_timeout: Duration::from_secs(5),
        dirty_log: Some(h.log.clone()),
    })
    .expect("replica service")
}

fn tcp(r: &ReplicaServer) -> std::net::SocketAddr {
    let StandbyAddr::Tcp(hp) = r.addr().clone() else {
        panic!("tcp address expected");
    };
    hp.parse().unwrap()
}

/// A daemon in hold mode on `h`'s image, tracking into its log, plus `extra`.
fn daemon_on(h: &Host, extra: &[&str]) -> Daemon {
    let sockets = tempfile::tempdir().expect("tempdir");
    let log = h.log.to_str().unwrap().to_owned();
    spawn(sockets, h.img.clone(), true, T, |c| {
        c.args(["--ft", "hold", "--dirty-log", &log])
            .args(["--dirty-log-extent-kib", &(EXTENT_BLOCKS * 4).to_string()])
            .args([
                "--replica-timeout-ms",
                // Generous: a 1 MiB chunk's apply and fdatasync on a loaded disk. Only the
                // commits with a frozen link wait for it.
                "3000",
                "--replica-sync-chunk-mib",
                "1",
            ])
            .args(extra);
    })
}

/// Stops a daemon cleanly (SIGTERM), as an operator would before restarting it.
fn stop(mut d: Daemon) {
    let mut child = d.child.take().expect("child");
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().expect("wait");
    assert!(st.success(), "daemon exit: {st}");
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
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// A guest writing whole blocks (and discarding) through a daemon, one epoch per `commit`.
struct Guest {
    f: TestFrontend,
    c: ControlClient,
    epoch: u64,
    held: u64,
}

impl Guest {
    fn new(d: &Daemon) -> Guest {
        Guest {
            c: ControlClient::connect(&d.ctl, T).expect("control"),
            f: session(d),
            epoch: 0,
            held: 0,
        }
    }

    /// Writes `n` blocks from `block` with data from `seed`.
    fn write(&mut self, block: u64, n: u64, seed: u8) {
        let data = pattern(seed, (n * BLOCK) as usize);
        let buf = self.f.alloc(data.len() as u64);
        self.f.write(buf, &data);
        blk_req_on(
            &mut self.f,
            0,
            VIRTIO_BLK_T_OUT,
            block * 8,
            Some((buf, data.len() as u32)),
        );
        self.held += 1;
    }

    fn discard(&mut self, block: u64, n: u64) {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&(block * 8).to_le_bytes());
        seg[8..12].copy_from_slice(&((n * 8) as u32).to_le_bytes());
        let buf = self.f.alloc(16);
        self.f.write(buf, &seg);
        blk_req_on(&mut self.f, 0, VIRTIO_BLK_T_DISCARD, 0, Some((buf, 16)));
        self.held += 1;
    }

    /// Seals and commits the next epoch with what was written; the commit's reply.
    fn commit(&mut self) -> Reply {
        self.f.kick(0);
        wait_held(&mut self.c, self.held);
        self.epoch += 1;
        let r = seal_commit(&mut self.c, self.epoch);
        if matches!(r, Reply::Committed { .. }) {
            assert_eq!(
                self.f.wait_used(0, self.held as usize, T).len(),
                self.held as usize
            );
            self.held = 0;
        }
        r
    }

    fn committed(&mut self) {
        match self.commit() {
            Reply::Committed { .. } => {}
            r => panic!("commit {}: {r:?}", self.epoch),
        }
    }
}

/// The blocks of every extent that holds one of `blocks`.
fn extents_of(blocks: &[u64], extent_blocks: u64) -> Vec<u64> {
    let mut out: Vec<u64> = blocks
        .iter()
        .flat_map(|b| {
            let x = b / extent_blocks;
            x * extent_blocks..(x + 1) * extent_blocks
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn union(a: &[u64], b: &[u64]) -> u64 {
    let mut v = [a, b].concat();
    v.sort_unstable();
    v.dedup();
    v.len() as u64
}

fn dirty_blocks_in(log: &Path) -> u64 {
    DirtyLog::open_existing(log, IMG_SIZE)
        .expect("dirty log")
        .dirty_blocks()
}

fn same(a: &Host, b: &Host) -> bool {
    std::fs::read(&a.img).unwrap() == std::fs::read(&b.img).unwrap()
}

/// Runs the failback resync from the primary `g` (its daemon started with `--replica-resync
/// dirty`) to completion, with writes going on: one to a block of `dirty_later` (dirty, and not
/// yet walked when written), one to a clean block. Returns the final sync progress.
fn resync(g: &mut Guest, dirty_later: u64, clean: u64) -> (ft_common::replica::SyncProgress, u32) {
    let st = status(&mut g.c).replica.expect("replica status");
    assert!(!st.in_sync, "in sync before the resync: {st:?}");
    g.write(dirty_later, 1, 0xd1);
    g.write(clean, 1, 0xd2);
    let mut commits = 0;
    loop {
        g.committed();
        commits += 1;
        assert!(commits < 64, "the resync never finished");
        let st = status(&mut g.c).replica.expect("replica status");
        let p = st.sync.expect("sync progress");
        assert_eq!(p.mode, "dirty");
        assert_eq!(p.image_blocks, IMAGE_BLOCKS);
        if st.in_sync {
            assert!(p.done && p.percent == 100, "{p:?}");
            return (p, commits);
        }
    }
}

/// The whole story of the module doc: copied blocks counted exactly, images equal afterwards.
#[test]
fn failback_copies_only_the_dirty_blocks_and_repairs_the_unacknowledged_epoch() {
    let a = host(0);
    let b = host(0);

    // 1. A primary, B replica (B's log is created by its replica service: B has no past).
    let replica_b = replica_on(&b, "store");
    let proxy = FaultyProxy::start("127.0.0.1:0", tcp(&replica_b)).expect("proxy");
    let to_b = format!("tcp:{}", proxy.addr());
    let da = daemon_on(&a, &["--replicate-to", &to_b]);
    let mut ga = Guest::new(&da);
    let mut a_blocks = Vec::new();
    for (block, n, seed) in [(0, 4, 1), (100, 1, 2), (1000, 1, 3), (2000, 2, 4)] {
        ga.write(block, n, seed);
        ga.committed();
        a_blocks.extend(block..block + n);
    }
    assert!(same(&a, &b), "acknowledged epochs differ");
    // The unacknowledged epoch: on A's image, never on B's.
    proxy.freeze();
    ga.write(3000, 1, 5);
    ga.write(17, 1, 6);
    a_blocks.extend([3000, 17]);
    assert!(matches!(ga.commit(), Reply::CommitFailed { .. }));
    assert_ne!(
        common::file_bytes(&a.img, 3000 * BLOCK, 4096),
        common::file_bytes(&b.img, 3000 * BLOCK, 4096),
        "the unacknowledged epoch must be on A only"
    );
    drop(ga);
    drop(da); // SIGKILL: A's log holds only what it synced (bitmap + activity log)
    drop(proxy);

    // 2. Takeover: B's replica fenced, a daemon on B's image tracking into B's log.
    drop(replica_b);
    assert!(ft_common::replica::server::fence(&b.store("store")).unwrap());
    let db = daemon_on(&b, &[]);
    let mut gb = Guest::new(&db);
    gb.write(5, 1, 7); // inside A's extent 0 already
    gb.write(500, 2, 8);
    gb.committed();
    gb.write(3500, 1, 9);
    gb.discard(4000, 4);
    gb.committed();
    // 2 MiB more, so that the resync takes several 1 MiB chunks (commits).
    for i in 0..4 {
        gb.write(1024 + i * 128, 128, 20 + i as u8);
    }
    gb.committed();
    let mut b_blocks: Vec<u64> = [5, 500, 501, 3500, 4000, 4001, 4002, 4003].to_vec();
    b_blocks.extend(1024..1536);
    let dl = status(&mut gb.c).dirty_log.expect("dirty log status");
    assert_eq!(
        (dl.dirty_blocks, dl.image_blocks),
        (b_blocks.len() as u64, IMAGE_BLOCKS)
    );
    drop(gb);
    stop(db);
    assert_eq!(
        dirty_blocks_in(&b.log),
        b_blocks.len() as u64,
        "B's log after a clean stop"
    );
    // After its crash A's log counts every block of its activity-log extents.
    let a_set = extents_of(&a_blocks, EXTENT_BLOCKS);
    assert_eq!(
        dirty_blocks_in(&a.log),
        a_set.len() as u64,
        "A's log after the crash"
    );
    assert!(!same(&a, &b));

    // 3. Failback: A's replica with A's log; B replicates to it with a dirty resync.
    let replica_a = replica_on(&a, "store");
    let rec = ft_common::replica::server::replica_image(&a.store("store"))
        .unwrap()
        .unwrap();
    assert!(!rec.in_sync, "a failback target must not count as in sync");
    let to_a = replica_a.addr().to_string();
    let db = daemon_on(&b, &["--replicate-to", &to_a, "--replica-resync", "dirty"]);
    let mut gb = Guest::new(&db);
    let (p, commits) = resync(&mut gb, 3500, 1500);
    // One 1 MiB chunk (256 blocks) per commit; block 3500 is walked after it was written.
    assert_eq!(commits, 3, "{p:?}");
    let expected = union(&a_set, &b_blocks);
    assert_eq!(
        (p.blocks_total, p.blocks_copied),
        (expected, expected),
        "copied: B's blocks since the split united with A's activity-log extents"
    );
    assert!(expected < IMAGE_BLOCKS / 6, "{expected} of {IMAGE_BLOCKS}");
    assert!(same(&a, &b), "images differ after the failback resync");
    assert!(
        ft_common::replica::server::replica_image(&a.store("store"))
            .unwrap()
            .unwrap()
            .in_sync
    );
    // Replication goes on as usual.
    gb.write(77, 1, 10);
    gb.committed();
    assert!(same(&a, &b));
    drop(gb);
    stop(db);
    drop(replica_a);
    assert_eq!(
        dirty_blocks_in(&a.log),
        0,
        "A's log is emptied by the resync"
    );
    assert_eq!(
        dirty_blocks_in(&b.log),
        0,
        "B's log is clean once all is acknowledged"
    );
    let lineage = |h: &Host| DirtyLog::open_existing(&h.log, IMG_SIZE).unwrap().lineage();
    assert_ne!(lineage(&a), 0, "the resync's lineage was not recorded");
    assert_eq!(
        lineage(&a),
        lineage(&b),
        "both logs descend from the resync"
    );
}

/// A dirty resync is refused with the reason when the replica has no log of its past, and
/// when the primary's log does not exist.
#[test]
fn a_dirty_resync_without_logs_is_refused_with_the_reason() {
    let a = host(0);
    let b = host(0);
    // The replica's log did not exist before its service started: nothing says what differs.
    let replica_a = replica_on(&a, "store");
    // B's daemon with no log at all: refused at start.
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk-ft"))
        .args(["--socket", "/nonexistent/fb.sock", "--ft", "hold"])
        .args(["--control", "/nonexistent/fb-ctl.sock"])
        .arg("--image")
        .arg(&b.img)
        .args([
            "--replicate-to",
            "tcp:127.0.0.1:1",
            "--replica-resync",
            "dirty",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dirty-log"), "{err}");
    // B's log given but missing.
    let sockets = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk-ft"))
        .arg("--socket")
        .arg(sockets.path().join("s"))
        .arg("--control")
        .arg(sockets.path().join("c"))
        .arg("--image")
        .arg(&b.img)
        .arg("--dirty-log")
        .arg(&b.log)
        .args([
            "--replicate-to",
            "tcp:127.0.0.1:1",
            "--replica-resync",
            "dirty",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
    // B's log exists; A's did not when its service started: the commit fails with the reason.
    drop(DirtyLog::open(&b.log, IMG_SIZE, Default::default()).unwrap());
    let to_a = replica_a.addr().to_string();
    let db = daemon_on(&b, &["--replicate-to", &to_a, "--replica-resync", "dirty"]);
    let mut gb = Guest::new(&db);
    gb.write(0, 1, 1);
    match gb.commit() {
        Reply::CommitFailed { error, .. } => {
            assert!(error.contains("did not exist"), "{error}");
            assert!(error.contains("--replica-resync full"), "{error}");
        }
        r => panic!("{r:?}"),
    }
    let st = status(&mut gb.c).replica.expect("replica status");
    assert!(!st.in_sync);
    assert!(st.error.is_some_and(|e| e.contains("dirty")));
    drop(gb);
    drop(db);
    drop(replica_a);

    // A replica whose log descends from another sync (another lineage): refused too.
    let c = host(0);
    let mut log = DirtyLog::open(&c.log, IMG_SIZE, Default::default()).unwrap();
    log.set_lineage(7).unwrap();
    log.close().unwrap();
    let replica_c = replica_on(&c, "store");
    let to_c = replica_c.addr().to_string();
    let db = daemon_on(&b, &["--replicate-to", &to_c, "--replica-resync", "dirty"]);
    let mut gb = Guest::new(&db);
    gb.write(0, 1, 1);
    match gb.commit() {
        Reply::CommitFailed { error, .. } => {
            assert!(error.contains("lineage"), "{error}");
            assert!(error.contains("--replica-resync full"), "{error}");
        }
        r => panic!("{r:?}"),
    }
}

/// The re-protect chain: A primary -> takeover to B -> failback protects B with A's image ->
/// B writes an epoch A never acknowledges and dies -> takeover back to A -> failback protects A
/// with B's image. Each resync copies exactly the expected blocks and ends byte-equal. The
/// takeovers run while the fenced replica service is still up (it must not hold the log).
#[test]
fn reprotect_chain_takes_over_back_and_fails_back_again() {
    let a = host(0);
    let b = host(0);
    // B's log with small extents too, made before its replica service (the header wins).
    DirtyLog::open(
        &b.log,
        IMG_SIZE,
        ft_common::replica::dirty::Geometry {
            extent_blocks: EXTENT_BLOCKS as u32,
            al_slots: 256,
        },
    )
    .unwrap()
    .close()
    .unwrap();

    // A primary, B replica; everything acknowledged; A dies.
    let replica_b = replica_on(&b, "store");
    let da = daemon_on(&a, &["--replicate-to", &replica_b.addr().to_string()]);
    let mut ga = Guest::new(&da);
    ga.write(40, 2, 1);
    ga.committed();
    assert!(same(&a, &b));
    drop(ga);
    drop(da);

    // Takeover to B (its fenced replica service still running), writes, clean stop.
    assert!(ft_common::replica::server::fence(&b.store("store")).unwrap());
    let db = daemon_on(&b, &[]);
    let mut gb = Guest::new(&db);
    gb.write(600, 1, 2);
    gb.committed();
    drop(gb);
    stop(db);
    drop(replica_b);

    // Failback to A through a proxy.
    let replica_a = replica_on(&a, "store");
    let proxy = FaultyProxy::start("127.0.0.1:0", tcp(&replica_a)).expect("proxy");
    let to_a = format!("tcp:{}", proxy.addr());
    let db = daemon_on(&b, &["--replicate-to", &to_a, "--replica-resync", "dirty"]);
    let mut gb = Guest::new(&db);
    let (p, _) = resync(&mut gb, 600, 1500);
    // A crashed with extent 2 (blocks 40, 41) in its AL; B wrote block 600 since the split.
    assert_eq!(
        (p.blocks_total, p.blocks_copied),
        (EXTENT_BLOCKS + 1, EXTENT_BLOCKS + 1)
    );
    assert!(same(&a, &b));
    gb.write(77, 1, 3);
    gb.committed();
    // B's last epoch never reaches A; B dies.
    proxy.freeze();
    gb.write(2500, 1, 4);
    assert!(matches!(gb.commit(), Reply::CommitFailed { .. }));
    assert!(!same(&a, &b));
    drop(gb);
    drop(db);
    drop(proxy);

    // Takeover back to A (replica service still running), writes, clean stop.
    assert!(ft_common::replica::server::fence(&a.store("store")).unwrap());
    let da = daemon_on(&a, &[]);
    let mut ga = Guest::new(&da);
    ga.write(10, 1, 5);
    ga.write(3600, 1, 6);
    ga.committed();
    drop(ga);
    stop(da);
    drop(replica_a);

    // Failback to B: A's blocks since the second split, and B's activity-log extents: those of
    // blocks 77 and 2500, written after B's resync ended (its end writes the log down exactly
    // and empties the activity log; blocks 600 and 1500 were acknowledged before).
    let replica_b = replica_on(&b, "store2");
    let da = daemon_on(
        &a,
        &[
            "--replicate-to",
            &replica_b.addr().to_string(),
            "--replica-resync",
            "dirty",
        ],
    );
    let mut ga = Guest::new(&da);
    let (p, _) = resync(&mut ga, 3600, 200);
    let b_set = extents_of(&[77, 2500], EXTENT_BLOCKS);
    let expected = union(&b_set, &[10, 3600]);
    assert_eq!((p.blocks_total, p.blocks_copied), (expected, expected));
    assert!(same(&a, &b), "images differ after the second failback");
    drop(ga);
    stop(da);
    drop(replica_b);
    assert_eq!(dirty_blocks_in(&a.log), 0);
    assert_eq!(dirty_blocks_in(&b.log), 0);
}
