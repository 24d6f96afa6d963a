// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The replica service (`ft_common::replica`, run by `ft-standby --replica-image`) through its
//! real socket, with the primary's real client end: order, duplicates after a lost
//! acknowledgement, the takeover fence, a full disk, a restarted replica, garbage.

use ft_common::epoch::Epoch;
use ft_common::replica::protocol::{self, MsgType};
use ft_common::replica::{server, ReplicaConfig, ReplicaLink, ReplicaServer};
use ft_common::standby::{CheckpointStore, StandbyAddr};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;

struct Fx {
    dir: tempfile::TempDir,
    img: PathBuf,
    store: PathBuf,
}

fn fx() -> Fx {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(SIZE))
        .unwrap();
    let store = dir.path().join("store");
    CheckpointStore::create(&store).unwrap();
    Fx { dir, img, store }
}

fn start(img: &Path, store: &Path) -> ReplicaServer {
    ReplicaServer::start(ReplicaConfig {
        listen: "tcp:127.0.0.1:0".parse().unwrap(),
        image: img.to_path_buf(),
        store: store.to_path_buf(),
        max_epoch_bytes: 16 << 20,
        io_timeout: Duration::from_secs(5),
        dirty_log: None,
    })
    .unwrap()
}

fn link(s: &ReplicaServer, timeout_ms: u64) -> ReplicaLink {
    ReplicaLink::new(s.addr().clone(), SIZE, Duration::from_millis(timeout_ms))
}

/// Ships one epoch: `fill` written over `len` bytes at `off`.
fn ship(l: &mut ReplicaLink, e: u64, off: u64, len: usize, fill: u8) {
    let data = vec![fill; len];
    let f = l.begin(Epoch(e));
    f.write(off, [&data[..]].into_iter());
    f.flush();
    f.finish();
    l.send();
}

fn at(img: &Path, off: u64, len: usize) -> Vec<u8> {
    let b = std::fs::read(img).unwrap();
    b[off as usize..off as usize + len].to_vec()
}

/// A raw primary: HELLO with `session`, then each epoch; the ACK's duplicate flag per epoch,
/// or the refusal.
fn raw_epochs(hp: &str, session: u64, epochs: &[(u64, u8)]) -> Result<Vec<bool>, String> {
    let mut c = std::net::TcpStream::connect(hp).unwrap();
    protocol::write_frame(&mut c, MsgType::Hello, &protocol::hello(session, SIZE, 0)).unwrap();
    let mut body = Vec::new();
    let h = protocol::read_header(&mut c).unwrap();
    protocol::read_body(&mut c, &h, 1 << 16, &mut body).unwrap();
    assert_eq!(h.kind, MsgType::Welcome);
    let mut out = Vec::new();
    for &(e, fill) in epochs {
        let mut f = protocol::EpochFrame::default();
        f.begin(session, Epoch(e));
        f.write(0, [&[fill; 8192][..]].into_iter());
        f.finish();
        std::io::Write::write_all(&mut c, f.bytes()).unwrap();
        let h = protocol::read_header(&mut c).unwrap();
        protocol::read_body(&mut c, &h, 1 << 16, &mut body).unwrap();
        match h.kind {
            MsgType::Ack => {
                let (acked, dup) = protocol::parse_ack(&body).unwrap();
                assert_eq!(acked, Epoch(e));
                out.push(dup);
            }
            _ => return Err(String::from_utf8_lossy(&body).into_owned()),
        }
    }
    Ok(out)
}

#[test]
fn epochs_apply_in_order_and_a_lost_ack_is_answered_without_reapplying() {
    let f = fx();
    let s = start(&f.img, &f.store);
    let rec = server::replica_image(&f.store)
        .unwrap()
        .expect("replica.json");
    assert_eq!(rec.image, std::fs::canonicalize(&f.img).unwrap());
    let mut l = link(&s, 5000);
    for e in 1..=3 {
        ship(&mut l, e, 0, 8192, e as u8);
        assert_eq!(l.wait_ack().unwrap(), Epoch(e));
    }
    assert!(at(&f.img, 0, 8192).iter().all(|&b| b == 3));
    assert_eq!(l.status().epochs_acked, 3);

    let StandbyAddr::Tcp(hp) = s.addr().clone() else {
        panic!()
    };
    assert_eq!(
        raw_epochs(&hp, 77, &[(1, 1), (2, 2)]).unwrap(),
        [false, false]
    );
    // The primary did not see the ack of epoch 2 and re-sends it on a new connection of the
    // same session; the replica acknowledges it without applying it again (checked: a write
    // made behind its back in between survives).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f.img)
        .and_then(|file| std::os::unix::fs::FileExt::write_all_at(&file, &[9u8; 512], 0))
        .unwrap();
    assert_eq!(raw_epochs(&hp, 77, &[(2, 2)]).unwrap(), [true]);
    assert!(
        at(&f.img, 0, 512).iter().all(|&b| b == 9),
        "epoch 2 applied twice"
    );
    assert_eq!(s.stats().duplicates, 1);
    // An older epoch of the session is refused, with the reason, and changes nothing.
    let err = raw_epochs(&hp, 77, &[(1, 7)]).unwrap_err();
    assert!(err.contains("older"), "{err}");
    assert!(at(&f.img, 0, 512).iter().all(|&b| b == 9));
    // A new session (a restarted primary daemon) starts the order again.
    assert_eq!(raw_epochs(&hp, 78, &[(1, 5)]).unwrap(), [false]);
    assert!(at(&f.img, 0, 8192).iter().all(|&b| b == 5));
    assert_eq!(s.stats().epochs_applied, 6);
}

#[test]
fn a_takeover_fence_stops_the_old_primary_for_good() {
    let f = fx();
    let s = start(&f.img, &f.store);
    let mut l = link(&s, 1000);
    ship(&mut l, 1, 0, 4096, 1);
    l.wait_ack().unwrap();
    // The takeover fences the replica (under its apply lock).
    assert!(server::fence(&f.store).unwrap());
    ship(&mut l, 2, 0, 4096, 2);
    let err = l.wait_ack().unwrap_err().to_string();
    assert!(err.contains("fenced"), "{err}");
    assert!(
        at(&f.img, 0, 4096).iter().all(|&b| b == 1),
        "fenced epoch applied"
    );
    // A new connection (a restarted primary daemon) is refused at HELLO.
    let mut l2 = link(&s, 500);
    ship(&mut l2, 1, 0, 4096, 3);
    assert!(l2.wait_ack().unwrap_err().to_string().contains("fenced"));
    assert!(at(&f.img, 0, 4096).iter().all(|&b| b == 1));
    // And no replica service starts on this store again: its image is the new primary's.
    drop(s);
    let e = ReplicaServer::start(ReplicaConfig {
        listen: "tcp:127.0.0.1:0".parse().unwrap(),
        image: f.img.clone(),
        store: f.store.clone(),
        max_epoch_bytes: 1 << 20,
        io_timeout: Duration::from_secs(1),
        dirty_log: None,
    })
    .err()
    .expect("a replica started on a taken-over store");
    assert!(e.to_string().contains("takeover"), "{e}");
    // No replica on a store: fence says so.
    let other = f.dir.path().join("plain-store");
    std::fs::create_dir(&other).unwrap();
    assert!(!server::fence(&other).unwrap());
}

#[test]
fn the_replica_down_then_back_gets_the_unacknowledged_epoch_again() {
    let f = fx();
    let s = start(&f.img, &f.store);
    let addr = s.addr().clone();
    let mut l = link(&s, 600);
    ship(&mut l, 1, 0, 4096, 1);
    l.wait_ack().unwrap();
    drop(s);
    // Down: the epoch is not acknowledged within the bound, and stays in the link.
    ship(&mut l, 2, 4096, 4096, 2);
    let t = Instant::now();
    let err = l.wait_ack().unwrap_err().to_string();
    assert!(t.elapsed() >= Duration::from_millis(600), "{err}");
    assert_eq!(l.unacked(), Some(Epoch(2)));
    assert!(l.status().error.is_some());
    // Back (same port): the retry re-sends it.
    let StandbyAddr::Tcp(hp) = addr else { panic!() };
    let s2 = ReplicaServer::start(ReplicaConfig {
        listen: StandbyAddr::Tcp(hp),
        image: f.img.clone(),
        store: f.store.clone(),
        max_epoch_bytes: 16 << 20,
        io_timeout: Duration::from_secs(5),
        dirty_log: None,
    })
    .unwrap();
    assert_eq!(l.wait_ack().unwrap(), Epoch(2));
    assert!(at(&f.img, 4096, 4096).iter().all(|&b| b == 2));
    assert_eq!(l.status().unacked_epoch, None);
    drop(s2);
}

/// A replica on a 1 MiB tmpfs with a sparse image: the epoch that needs more room is refused
/// with ENOSPC (never acknowledged); a smaller one afterwards goes through.
#[test]
fn a_full_replica_disk_refuses_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tmpfs-replica");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs-replica"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cannot mount a tmpfs, but CI=true"
        );
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    }
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    let img = mnt.join("disk.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(SIZE))
        .unwrap();
    let store = dir.path().join("store");
    CheckpointStore::create(&store).unwrap();
    let s = start(&img, &store);
    let mut l = link(&s, 1000);
    ship(&mut l, 1, 0, 2 << 20, 1);
    let err = l.wait_ack().unwrap_err().to_string();
    assert!(err.contains("No space left"), "{err}");
    assert_eq!(l.unacked(), Some(Epoch(1)));
    assert!(s.stats().last_error.is_some());
    assert_eq!(s.stats().epochs_applied, 0);
}

#[test]
fn garbage_and_oversized_frames_are_refused() {
    let f = fx();
    let s = start(&f.img, &f.store);
    let StandbyAddr::Tcp(hp) = s.addr().clone() else {
        panic!()
    };
    // Not HELLO first.
    let mut c = std::net::TcpStream::connect(&hp).unwrap();
    protocol::write_frame(&mut c, MsgType::Ack, &protocol::ack(Epoch(1), false)).unwrap();
    let h = protocol::read_header(&mut c).unwrap();
    assert_eq!(h.kind, MsgType::Refused);
    // A wrong image size.
    let mut c = std::net::TcpStream::connect(&hp).unwrap();
    protocol::write_frame(&mut c, MsgType::Hello, &protocol::hello(7, SIZE + 512, 0)).unwrap();
    let h = protocol::read_header(&mut c).unwrap();
    assert_eq!(h.kind, MsgType::Refused);
    // An epoch beyond the bound: refused before its body is read.
    let mut c = std::net::TcpStream::connect(&hp).unwrap();
    protocol::write_frame(&mut c, MsgType::Hello, &protocol::hello(7, SIZE, 0)).unwrap();
    let h = protocol::read_header(&mut c).unwrap();
    assert_eq!(h.kind, MsgType::Welcome);
    let mut body = Vec::new();
    protocol::read_body(&mut c, &h, 64, &mut body).unwrap();
    let mut head = [0u8; protocol::HEADER_LEN];
    head[..4].copy_from_slice(&protocol::MAGIC);
    head[4] = protocol::VERSION;
    head[5] = MsgType::Epoch as u8;
    head[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::io::Write::write_all(&mut c, &head).unwrap();
    let h = protocol::read_header(&mut c).unwrap();
    assert_eq!(h.kind, MsgType::Refused);
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(String::from_utf8_lossy(&rest).contains("exceeds"));
    // Plain garbage.
    let mut c = std::net::TcpStream::connect(&hp).unwrap();
    std::io::Write::write_all(&mut c, b"GET / HTTP/1.1\r\n\r\n and more bytes").unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    // The service still works.
    let mut l = link(&s, 5000);
    ship(&mut l, 1, 0, 512, 5);
    l.wait_ack().unwrap();
    assert!(s.stats().refused >= 3);
}

/// `ft-standby --replica-image --replica-listen`: the binary runs the service beside the store.
#[test]
fn ft_standby_runs_the_replica_service() {
    let f = fx();
    let sock = f.dir.path().join("replica.sock");
    let standby_sock = f.dir.path().join("standby.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ft-standby"))
        .arg("--listen")
        .arg(format!("unix:{}", standby_sock.display()))
        .arg("--store")
        .arg(&f.store)
        .arg("--replica-image")
        .arg(&f.img)
        .arg("--replica-listen")
        .arg(format!("unix:{}", sock.display()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "replica socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut l = ReplicaLink::new(StandbyAddr::Unix(sock), SIZE, Duration::from_secs(5));
    ship(&mut l, 1, 8192, 4096, 6);
    let r = l.wait_ack();
    let _ = child.kill();
    let _ = child.wait();
    r.unwrap();
    assert!(at(&f.img, 8192, 4096).iter().all(|&b| b == 6));
}
