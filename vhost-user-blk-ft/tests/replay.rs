// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Replay on the standby: a VM restored from a checkpoint hands a fresh daemon a fresh inflight
//! region and SET_VRING_BASE = the checkpoint's last avail index. Requests the primary had
//! taken off the ring and not completed at the checkpoint are no one's unless the daemon is
//! told which they are (the SEALED record). Driven through the real vhost-user protocol (raw
//! test frontend; the "restored" frontend is a copy of the primary's guest memory) and the
//! real control protocol.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ft_common::control::{
    ControlClient, DeviceKind, ErrorCode, QueueState, Reply, Request, TransactionState,
};
use ft_common::epoch::{Epoch, Generation};
use ft_tests::frontend::TestFrontend;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::*;

mod common;
use common::{blk_req_on, file_bytes, new_image, spawn, Daemon};

const T: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(300);
const G: Generation = Generation(1);

/// Starts the daemon on `img` with its sockets in a new directory and its log in `log`.
fn daemon_on(img: &Path, control: bool, log: &Path, extra: &[&str]) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = File::create(log).expect("log file");
    spawn(dir, img.to_path_buf(), control, T, |c| {
        c.args(extra).stderr(err);
    })
}

fn control(d: &Daemon) -> ControlClient {
    ControlClient::connect(&d.ctl, T).expect("control connect")
}

fn held(c: &mut ControlClient) -> u64 {
    match c.call(&Request::Status).expect("status") {
        Reply::Status(s) => s.held_requests,
        r => panic!("{r:?}"),
    }
}

fn wait_held(c: &mut ControlClient, n: u64) {
    let deadline = Instant::now() + T;
    while held(c) != n {
        assert!(Instant::now() < deadline, "never held {n}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn seal(c: &mut ControlClient, e: u64) -> TransactionState {
    seal_g(c, G.0, e)
}

fn seal_g(c: &mut ControlClient, g: u64, e: u64) -> TransactionState {
    match c
        .call(&Request::Seal {
            generation: Generation(g),
            epoch: Epoch(e),
        })
        .expect("seal")
    {
        Reply::Sealed { state, .. } => state,
        r => panic!("{r:?}"),
    }
}

/// A primary in hold mode with queue 0 (256 entries) running on an inflight region.
fn primary(img: &Path, log: &Path) -> (Daemon, ControlClient, TestFrontend) {
    let d = daemon_on(img, true, log, &["--ft", "hold"]);
    let c = control(&d);
    let mut f = TestFrontend::connect(&d.sock, 1, T);
    f.handshake();
    f.set_mem_table();
    f.setup_inflight(1, 256);
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    (d, c, f)
}

/// The restored VM's frontend on `standby`: a copy of `f`'s memory, a fresh inflight region
/// from the new daemon, queue 0 set up at `base`. Returns the frontend and SET_VRING_ENABLE's
/// result (the ring starts there).
fn restore(f: &TestFrontend, standby: &Daemon, base: u16) -> (TestFrontend, vhost::Result<()>) {
    let mut r = f.restored_copy(&standby.sock, T);
    r.handshake();
    r.set_mem_table();
    r.setup_inflight(1, 256);
    r.setup_vring(0, base);
    let started = r.fe.set_vring_enable(0, true);
    (r, started)
}

/// The primary dies.
fn kill(d: &mut Daemon) {
    if let Some(mut c) = d.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn log_text(p: &PathBuf) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The bug of issue 13: a fresh inflight region made the daemon ignore SET_VRING_BASE and pop
/// avail[used idx..] again, so a read the primary had already completed (out of order, beside
/// a held write) was executed and put on the used ring a second time (the guest's "id N is not
/// a head"). Without a replay record, such a ring must be refused, naming both numbers.
#[test]
fn fresh_inflight_region_keeps_set_vring_base_and_refuses_unknown_outstanding() {
    let (dir, img) = new_image();
    let (plog, slog) = (
        dir.path().join("primary.log"),
        dir.path().join("standby.log"),
    );
    let (mut p, mut c, mut f) = primary(&img, &plog);
    let buf = f.alloc(4096);
    f.write(buf, &[0x5a; 4096]);
    let (w, _) = blk_req_on(&mut f, 0, VIRTIO_BLK_T_OUT, 0, Some((buf, 4096)));
    let mut reads = Vec::new();
    for i in 1..3u64 {
        let b = f.alloc(4096);
        reads.push(blk_req_on(&mut f, 0, VIRTIO_BLK_T_IN, i * 64, Some((b, 4096))).0);
    }
    f.kick(0);
    let used: Vec<u16> = f.wait_used(0, 2, T).into_iter().map(|u| u.0).collect();
    assert_eq!(used, reads, "reads complete at once, the write is held");
    wait_held(&mut c, 1);
    // The checkpoint: VM stopped (GET_VRING_BASE), SEAL, memory copied.
    let base = f.fe.get_vring_base(0).expect("get_vring_base") as u16;
    assert_eq!((base, f.used_idx(0)), (3, 2));
    let state = seal(&mut c, 1);
    assert_eq!(state.queues[0].outstanding, vec![w]);
    drop(c);
    kill(&mut p);
    let s = daemon_on(&img, false, &slog, &[]);
    let (mut r, started) = restore(&f, &s, base);
    assert!(
        r.wait_used(0, 1, QUIET).is_empty(),
        "a request was executed again (duplicate in the used ring)"
    );
    assert!(
        started.is_err(),
        "ring started without knowing the outstanding request"
    );
    let log = log_text(&slog);
    assert!(
        log.contains("SET_VRING_BASE is 3 but the used ring's idx is 2"),
        "{log}"
    );
    drop(p);
}

fn commit(c: &mut ControlClient, e: u64) {
    commit_g(c, G.0, e)
}

fn commit_g(c: &mut ControlClient, g: u64, e: u64) {
    match c
        .call(&Request::Commit {
            generation: Generation(g),
            epoch: Epoch(e),
            deadline: None,
        })
        .expect("commit")
    {
        Reply::Committed { .. } => {}
        r => panic!("{r:?}"),
    }
}

/// A request the test placed, and what it expects of it.
#[derive(Clone, Debug)]
struct Placed {
    head: u16,
    status: u64,
    /// (sector, data) of a write.
    write: Option<(u64, Vec<u8>)>,
    /// (sector, buffer gpa, len) of a read.
    read: Option<(u64, u64, usize)>,
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
        .collect()
}

fn put_write(f: &mut TestFrontend, sector: u64, data: Vec<u8>) -> Placed {
    let buf = f.alloc(data.len() as u64);
    f.write(buf, &data);
    let (head, status) = blk_req_on(
        f,
        0,
        VIRTIO_BLK_T_OUT,
        sector,
        Some((buf, data.len() as u32)),
    );
    Placed {
        head,
        status,
        write: Some((sector, data)),
        read: None,
    }
}

fn put_read(f: &mut TestFrontend, sector: u64, len: usize) -> Placed {
    let buf = f.alloc(len as u64);
    let (head, status) = blk_req_on(f, 0, VIRTIO_BLK_T_IN, sector, Some((buf, len as u32)));
    Placed {
        head,
        status,
        write: None,
        read: Some((sector, buf, len)),
    }
}

fn put_flush(f: &mut TestFrontend) -> Placed {
    let (head, status) = blk_req_on(f, 0, VIRTIO_BLK_T_FLUSH, 0, None);
    Placed {
        head,
        status,
        write: None,
        read: None,
    }
}

/// Writes the record as the takeover tool does (the SEALED state, serialized) and returns
/// the `--replay` arguments.
fn record_file(dir: &Path, name: &str, state: &TransactionState) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec_pretty(state).unwrap()).unwrap();
    p
}

/// The standby daemon on `img` with `--replay FILE`, gated (`hold`) or not.
fn standby(img: &Path, log: &Path, record: &Path, hold: bool) -> Daemon {
    let rec = record.to_str().unwrap();
    if hold {
        daemon_on(img, true, log, &["--ft", "hold", "--replay", rec])
    } else {
        daemon_on(img, false, log, &["--replay", rec])
    }
}

/// The restored guest sees every request of `outstanding` complete exactly once (and nothing
/// else), with status OK and read data as in `image`.
fn expect_completed_once(r: &mut TestFrontend, outstanding: &[Placed], img: &Path) {
    let used: Vec<u16> = r
        .wait_used(0, outstanding.len(), T)
        .into_iter()
        .map(|u| u.0)
        .collect();
    let extra = r.wait_used(0, 1, QUIET);
    assert!(
        extra.is_empty(),
        "completed more than once: {extra:?} after {used:?}"
    );
    let mut got = used.clone();
    got.sort_unstable();
    let mut want: Vec<u16> = outstanding.iter().map(|p| p.head).collect();
    want.sort_unstable();
    assert_eq!(got, want, "used ring {used:?}");
    for p in outstanding {
        assert_eq!(
            r.read(p.status, 1),
            [VIRTIO_BLK_S_OK as u8],
            "status of {p:?}"
        );
        if let Some((sector, buf, len)) = p.read {
            assert!(
                r.read(buf, len) == file_bytes(img, sector * 512, len),
                "read of sector {sector}"
            );
        }
    }
}

/// The image holds every write of `placed` applied in guest (pop) order.
fn expect_image(img: &Path, placed: &[Placed]) {
    let mut want: std::collections::BTreeMap<u64, u8> = Default::default();
    for p in placed {
        if let Some((sector, data)) = &p.write {
            for (i, b) in data.iter().enumerate() {
                want.insert(sector * 512 + i as u64, *b);
            }
        }
    }
    let len = want.keys().last().map_or(0, |&k| k + 1) as usize;
    let file = file_bytes(img, 0, len);
    for (off, b) in want {
        assert_eq!(file[off as usize], b, "image byte {off}");
    }
}

/// A checkpoint taken of a real primary, the primary then killed.
struct Checkpoint {
    dir: tempfile::TempDir,
    img: PathBuf,
    /// The guest (memory and driver state) as checkpointed.
    guest: TestFrontend,
    state: TransactionState,
    base: u16,
    /// Every request placed, in avail (= pop) order.
    all: Vec<Placed>,
    /// The ones not completed at the checkpoint.
    outstanding: Vec<Placed>,
}

/// The scenario of issue 13 through a real primary: writes held across epochs, reads
/// completed at once (so completions are out of order), a commit arriving while the ring is
/// stopped (deferred completions), a write parked by backpressure, a flush, an overlapping
/// rewrite. SEAL with the ring stopped, then the primary is killed.
fn checkpoint_of_a_dying_primary() -> Checkpoint {
    let (dir, img) = new_image();
    let plog = dir.path().join("primary.log");
    let mut p = daemon_on(
        &img,
        true,
        &plog,
        &["--ft", "hold", "--max-held-requests", "5"],
    );
    let mut c = control(&p);
    let mut f = TestFrontend::connect(&p.sock, 1, T);
    f.handshake();
    f.set_mem_table();
    f.setup_inflight(1, 256);
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");

    let mut all = Vec::new();
    // Epoch 1: two writes around a read.
    all.push(put_write(&mut f, 0, pattern(1, 4096)));
    all.push(put_read(&mut f, 512, 4096));
    all.push(put_write(&mut f, 8, pattern(2, 4096)));
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T)[0].0, all[1].head);
    wait_held(&mut c, 2);
    seal(&mut c, 1);
    // Epoch 2: a rewrite of sector 0, a read, a flush, a write; the last write is parked.
    all.push(put_write(&mut f, 0, pattern(3, 4096)));
    all.push(put_read(&mut f, 520, 4096));
    all.push(put_flush(&mut f));
    all.push(put_write(&mut f, 16, pattern(4, 4096)));
    all.push(put_write(&mut f, 24, pattern(5, 4096)));
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T)[0].0, all[4].head);
    wait_held(&mut c, 5);
    // The checkpoint of epoch 2: VM stopped; the commit of epoch 1 arrives meanwhile (its
    // completions wait for the ring), then SEAL.
    let base = f.fe.get_vring_base(0).expect("get_vring_base") as u16;
    assert_eq!((base, f.used_idx(0)), (8, 2));
    commit(&mut c, 1);
    // Nothing is written to the used ring between GET_VRING_BASE and the next start: the
    // checkpoint's memory and the record agree.
    std::thread::sleep(QUIET);
    assert_eq!(
        f.used_idx(0),
        2,
        "used ring written while the ring was stopped"
    );
    let state = seal(&mut c, 2);
    let q = &state.queues[0];
    let outstanding: Vec<Placed> = all.iter().filter(|p| p.read.is_none()).cloned().collect();
    assert_eq!(
        q.outstanding,
        outstanding.iter().map(|p| p.head).collect::<Vec<_>>(),
        "deferred, held and parked, in pop order"
    );
    assert_eq!((q.next_avail, q.used_idx, q.held), (8, Some(2), 3));
    drop(c);
    kill(&mut p);
    let log = log_text(&plog);
    assert!(!log.contains("SEALED record inconsistent"), "{log}");
    // Epoch 1 reached the image; nothing of epoch 2 did.
    assert!(file_bytes(&img, 0, 4096) == pattern(1, 4096));
    assert!(file_bytes(&img, 16 * 512, 8192).iter().all(|&b| b == 0));
    Checkpoint {
        dir,
        img,
        guest: f,
        state,
        base,
        all,
        outstanding,
    }
}

/// A fresh daemon and a restored copy of the guest: each outstanding request completes
/// exactly once, writes land in guest order, and the ring carries on. With `over_control` the
/// record goes over the (gated) standby's control socket (REPLAY) instead of `--replay FILE`.
fn replay_after_primary_dies(standby_hold: bool, over_control: bool) {
    let ck = checkpoint_of_a_dying_primary();
    let (img, outstanding) = (&ck.img, &ck.outstanding);
    let slog = ck.dir.path().join("standby.log");
    let replay = |c: &mut ControlClient, g: u64| {
        c.call(&Request::Replay {
            generation: Generation(g),
            state: ck.state.clone(),
        })
        .expect("replay")
    };
    let s = if over_control {
        let s = daemon_on(img, true, &slog, &["--ft", "hold"]);
        let mut sc = control(&s);
        assert_eq!(
            replay(&mut sc, 2),
            Reply::ReplayAccepted {
                queues: 1,
                requests: 6
            }
        );
        // Fenced like every command that changes what the daemon does.
        assert!(matches!(
            replay(&mut sc, 1),
            Reply::Error {
                code: ErrorCode::Fenced,
                ..
            }
        ));
        s
    } else {
        let rec = record_file(ck.dir.path(), "replay.json", &ck.state);
        standby(img, &slog, &rec, standby_hold)
    };
    let (mut r, started) = restore(&ck.guest, &s, ck.base);
    started.expect("restored ring starts with the record");
    if over_control {
        // Too late once the ring ran.
        match replay(&mut control(&s), 2) {
            Reply::Error { code, message } => {
                assert_eq!(code, ErrorCode::ReplayRefused);
                assert!(message.contains("already ran"), "{message}");
            }
            r => panic!("{r:?}"),
        }
    }
    if standby_hold || over_control {
        // The new primary's first epoch holds them: nothing completes before its commit.
        let g = if over_control { 2 } else { G.0 };
        let mut sc = control(&s);
        wait_held(&mut sc, outstanding.len() as u64);
        assert!(
            r.wait_used(0, 1, QUIET).is_empty(),
            "completed before commit"
        );
        seal_g(&mut sc, g, 1);
        commit_g(&mut sc, g, 1);
    }
    expect_completed_once(&mut r, outstanding, img);
    expect_image(img, &ck.all);
    // The ring carries on from the base: a new request is taken and answered once.
    let more = put_read(&mut r, 0, 4096);
    r.kick(0);
    expect_completed_once(&mut r, std::slice::from_ref(&more), img);
    assert!(r.read(more.read.unwrap().1, 4096) == pattern(3, 4096));
    let log = log_text(&slog);
    assert!(log.contains("replaying 6 request(s)"), "{log}");
}

#[test]
fn outstanding_requests_replay_exactly_once_on_a_plain_standby() {
    replay_after_primary_dies(false, false);
}

#[test]
fn outstanding_requests_replay_in_the_first_epoch_of_a_gated_standby() {
    replay_after_primary_dies(true, false);
}

#[test]
fn the_record_can_come_over_the_control_socket() {
    replay_after_primary_dies(true, true);
}

/// A record built by hand for requests the primary had taken in flight (reads too, which a
/// stopped hold-mode primary never leaves outstanding): reads, overlapping writes and a flush,
/// listed in an order other than the avail ring's. The standby executes them in the record's
/// order, each once.
#[test]
fn replayed_reads_writes_and_flushes_keep_the_record_order() {
    let (dir, img) = new_image();
    std::fs::write(&img, {
        let mut v = vec![0u8; 16 << 20];
        v[1 << 20..(1 << 20) + 4096].copy_from_slice(&pattern(9, 4096));
        v
    })
    .unwrap();
    let slog = dir.path().join("standby.log");
    // The "primary" is the guest alone: requests on the avail ring, none completed.
    let nobody = dir.path().join("nobody.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&nobody).unwrap();
    let mut f = TestFrontend::connect(&nobody, 1, T);
    f.init_queue(0, 256);
    let mut placed = Vec::new();
    for i in 0..8u8 {
        placed.push(put_write(&mut f, 40, pattern(0x20 + i, 4096)));
    }
    placed.push(put_read(&mut f, 2048, 4096));
    placed.push(put_flush(&mut f));
    // Taken in reverse avail order by the primary.
    placed.reverse();
    let state = TransactionState {
        device: "disk.img".into(),
        kind: DeviceKind::Blk,
        queues: vec![QueueState {
            queue: 0,
            next_avail: 10,
            used_idx: Some(0),
            outstanding: placed.iter().map(|p| p.head).collect(),
            ..Default::default()
        }],
    };
    let rec = record_file(dir.path(), "replay.json", &state);
    let s = standby(&img, &slog, &rec, false);
    let (mut r, started) = restore(&f, &s, 10);
    started.expect("ring starts");
    expect_completed_once(&mut r, &placed, &img);
    // Record order: the first-placed write was replayed last.
    assert!(file_bytes(&img, 40 * 512, 4096) == pattern(0x20, 4096));
    assert!(r.read(placed[1].read.unwrap().1, 4096) == pattern(9, 4096));
}

/// Negative controls: without the record the restored guest's outstanding requests never
/// complete (the ring is refused); a record that does not match the restored rings is refused
/// with both numbers named, and nothing of it is executed.
#[test]
fn missing_or_wrong_records_are_refused() {
    let ck = checkpoint_of_a_dying_primary();
    let before = file_bytes(&ck.img, 0, 64 * 512);
    let wrong_base = {
        let mut s = ck.state.clone();
        s.queues[0].next_avail -= 1;
        s
    };
    let one_missing = {
        let mut s = ck.state.clone();
        s.queues[0].outstanding.remove(2);
        s
    };
    let bad_head = {
        let mut s = ck.state.clone();
        s.queues[0].outstanding[0] = 300;
        s
    };
    let cases: [(&str, Option<TransactionState>, &str); 4] = [
        ("none", None, "SET_VRING_BASE is 8 but the used ring's idx is 2"),
        (
            "wrong_base",
            Some(wrong_base),
            "SET_VRING_BASE is 8 but the replay record's base is 7",
        ),
        (
            "one_missing",
            Some(one_missing),
            "used ring's idx 2 plus the replay record's 5 outstanding request(s) is 7, but the base is 8",
        ),
        ("bad_head", Some(bad_head), "head 300 is outside the ring of 256"),
    ];
    for (name, record, message) in cases {
        let slog = ck.dir.path().join(format!("standby-{name}.log"));
        let s = match &record {
            Some(st) => {
                let rec = record_file(ck.dir.path(), &format!("{name}.json"), st);
                standby(&ck.img, &slog, &rec, false)
            }
            None => daemon_on(&ck.img, false, &slog, &[]),
        };
        let (mut r, started) = restore(&ck.guest, &s, ck.base);
        assert!(started.is_err(), "{name}: ring started");
        assert!(
            r.wait_used(0, 1, QUIET).is_empty(),
            "{name}: something completed"
        );
        let log = log_text(&slog);
        assert!(log.contains(message), "{name}: {log}");
        assert!(
            file_bytes(&ck.img, 0, 64 * 512) == before,
            "{name}: a request was executed"
        );
    }
}

/// One request of a random run: 0 read, 1 write, 2 flush; the 4 KiB slot it touches; whether
/// the batch ends (kick) after it.
type RandomOp = (u8, u64, bool);

/// A random mix of reads, writes and flushes, kicked in random batches, with epochs sealed and
/// committed at random points (so reads complete at once and writes at random later commits:
/// completion orders differ from the ring's), a final commit possibly arriving while the ring
/// is stopped, SEAL; then a standby (plain or gated) with the record. Every request completes
/// exactly once over primary and standby, and the image holds the writes in guest order.
fn random_run(ops: &[RandomOp], actions: &[u8], commit_while_stopped: bool, standby_hold: bool) {
    let (dir, img) = new_image();
    let (plog, slog) = (
        dir.path().join("primary.log"),
        dir.path().join("standby.log"),
    );
    let mut p = daemon_on(&img, true, &plog, &["--ft", "hold"]);
    let mut c = control(&p);
    let mut f = TestFrontend::connect(&p.sock, 1, T);
    f.handshake();
    f.set_mem_table();
    f.setup_inflight(1, 256);
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    let mut all: Vec<Placed> = Vec::new();
    let mut done: Vec<u16> = Vec::new();
    // Held requests (indices into `all`) per state: open epoch, sealed not committed.
    let (mut open, mut sealed): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    let (mut epoch, mut last_sealed) = (1u64, None);
    let mut batch_reads = 0;
    let mut action = actions.iter().cycle();
    for (i, &(kind, slot, kick)) in ops.iter().enumerate() {
        let placed = match kind {
            0 => put_read(&mut f, slot * 8, 4096),
            1 => put_write(&mut f, slot * 8, pattern(i as u8, 4096)),
            _ => put_flush(&mut f),
        };
        if placed.read.is_some() {
            batch_reads += 1;
        } else {
            open.push(all.len());
        }
        all.push(placed);
        if !kick && i + 1 < ops.len() {
            continue;
        }
        f.kick(0);
        done.extend(f.wait_used(0, batch_reads, T).into_iter().map(|u| u.0));
        batch_reads = 0;
        wait_held(&mut c, (open.len() + sealed.len()) as u64);
        match action.next().copied().unwrap_or(0) % 3 {
            1 => {
                seal(&mut c, epoch);
                sealed.append(&mut open);
                last_sealed = Some(epoch);
                epoch += 1;
            }
            2 => {
                seal(&mut c, epoch);
                commit(&mut c, epoch);
                let n = open.len() + sealed.len();
                open.clear();
                sealed.clear();
                done.extend(f.wait_used(0, n, T).into_iter().map(|u| u.0));
                epoch += 1;
                last_sealed = None;
            }
            _ => {}
        }
    }
    // The checkpoint: ring stopped, maybe the commit of the last sealed epoch meanwhile.
    let base = f.fe.get_vring_base(0).expect("get_vring_base") as u16;
    let mut deferred = Vec::new();
    if let (true, Some(e)) = (commit_while_stopped, last_sealed) {
        commit(&mut c, e);
        deferred.append(&mut sealed);
    }
    let state = seal(&mut c, epoch);
    let mut pending: Vec<usize> = deferred;
    pending.extend(sealed);
    pending.extend(open);
    pending.sort_unstable();
    let outstanding: Vec<Placed> = pending.iter().map(|&i| all[i].clone()).collect();
    assert_eq!(
        state.queues[0].outstanding,
        outstanding.iter().map(|p| p.head).collect::<Vec<_>>()
    );
    assert_eq!(base, all.len() as u16);
    assert_eq!(f.used_idx(0) as usize, done.len());
    drop(c);
    kill(&mut p);

    let rec = record_file(dir.path(), "replay.json", &state);
    let s = standby(&img, &slog, &rec, standby_hold);
    let (mut r, started) = restore(&f, &s, base);
    started.expect("restored ring starts");
    if standby_hold {
        let mut sc = control(&s);
        wait_held(&mut sc, outstanding.len() as u64);
        seal(&mut sc, 1);
        commit(&mut sc, 1);
    }
    expect_completed_once(&mut r, &outstanding, &img);
    let mut every: Vec<u16> = done;
    every.extend(outstanding.iter().map(|p| p.head));
    every.sort_unstable();
    let mut want: Vec<u16> = all.iter().map(|p| p.head).collect();
    want.sort_unstable();
    assert_eq!(every, want, "not every request completed exactly once");
    expect_image(&img, &all);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..Default::default()
    })]
    #[test]
    fn random_outstanding_sets_replay_exactly_once(
        ops in proptest::collection::vec((0u8..3, 0u64..4, proptest::bool::ANY), 1..14),
        actions in proptest::collection::vec(0u8..3, 1..8),
        commit_while_stopped in proptest::bool::ANY,
        standby_hold in proptest::bool::ANY,
    ) {
        random_run(&ops, &actions, commit_while_stopped, standby_hold);
    }
}
