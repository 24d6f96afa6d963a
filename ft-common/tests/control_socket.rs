// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End to end over a real unix socket: a `ControlServer` with a toy device handler and a
//! `ControlClient`, plus raw garbage writers.

use ft_common::control::codec::{encode, read_message, MAX_FRAME_LEN, PROTOCOL_VERSION};
use ft_common::control::message::*;
use ft_common::control::{ClientError, ControlClient, ControlServer, Notifier};
use ft_common::epoch::{Epoch, Generation};
use ft_common::fence::Fence;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

/// A fresh directory per test, removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ft-ctl-{}-{}-{}",
            std::process::id(),
            name,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("ctl.sock")
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A toy device that follows the protocol's fencing and epoch rules.
#[derive(Default)]
struct ToyState {
    fence: Fence,
    open: u64,
    last_sealed: Option<Epoch>,
    last_committed: Option<Epoch>,
}
struct Toy(Mutex<ToyState>);
impl Toy {
    fn new() -> Toy {
        Toy(Mutex::new(ToyState {
            open: 1,
            ..Default::default()
        }))
    }
    fn handle(&self, req: Request) -> Reply {
        let mut s = self.0.lock().unwrap();
        if let Some(g) = req.generation() {
            if let Err(e) = s.fence.admit(g) {
                return Reply::error(ErrorCode::Fenced, e.to_string());
            }
        }
        match req {
            Request::Seal { epoch, .. } => {
                if epoch.0 < s.open {
                    return Reply::error(ErrorCode::StaleEpoch, "already sealed");
                }
                s.last_sealed = Some(epoch);
                s.open = epoch.0 + 1;
                Reply::Sealed {
                    epoch,
                    state: TransactionState {
                        device: "toy".into(),
                        kind: DeviceKind::Blk,
                        queues: vec![QueueState {
                            queue: 0,
                            next_avail: epoch.0 as u16,
                            outstanding: vec![1, 2],
                            ..Default::default()
                        }],
                    },
                }
            }
            Request::Commit { epoch, .. } => {
                if Some(epoch) > s.last_sealed {
                    return Reply::error(ErrorCode::NotSealed, "not sealed");
                }
                if Some(epoch) <= s.last_committed {
                    return Reply::error(ErrorCode::StaleEpoch, "already committed");
                }
                s.last_committed = Some(epoch);
                Reply::Committed {
                    epoch,
                    stats: CommitStats {
                        requests: 2,
                        bytes: 8192,
                        ..Default::default()
                    },
                }
            }
            Request::Abort { .. } => Reply::Aborted {
                cancelled_requests: 0,
                cancelled_bytes: 0,
                last_committed: s.last_committed,
            },
            Request::Announce { .. } | Request::Replay { .. } => {
                Reply::error(ErrorCode::Unsupported, "blk")
            }
            Request::Status => Reply::Status(Box::new(DeviceStatus {
                device: "toy".into(),
                kind: DeviceKind::Blk,
                mode: "hold".into(),
                generation: s.fence.newest(),
                open_epoch: Epoch(s.open),
                last_sealed: s.last_sealed,
                last_committed: s.last_committed,
                held_requests: 0,
                held_bytes: 0,
                epochs: vec![],
                commits_ok: 0,
                commits_failed: 0,
                fdatasyncs: 0,
                commit_refused: false,
                last_commit: None,
                replica: None,
                dirty_log: None,
            })),
        }
    }
}

fn start_toy(dir: &TempDir) -> (ft_common::control::ControlServerHandle, Notifier) {
    let server = ControlServer::bind(dir.sock()).unwrap();
    let notifier = server.notifier();
    let toy = Toy::new();
    let handle = server.spawn(move |req| toy.handle(req)).unwrap();
    (handle, notifier)
}

fn code(r: Reply) -> ErrorCode {
    match r {
        Reply::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn gen(g: u64) -> Generation {
    Generation(g)
}

#[test]
fn requests_get_their_replies_and_rules_are_enforced() {
    let dir = TempDir::new("rr");
    let (_server, _n) = start_toy(&dir);
    let mut c = ControlClient::connect(dir.sock(), T).unwrap();
    let seal = |g, e| Request::Seal {
        generation: gen(g),
        epoch: Epoch(e),
    };
    let commit = |g, e| Request::Commit {
        generation: gen(g),
        epoch: Epoch(e),
        deadline: None,
    };

    assert!(matches!(
        c.call(&seal(2, 1)).unwrap(),
        Reply::Sealed {
            epoch: Epoch(1),
            ..
        }
    ));
    assert_eq!(code(c.call(&commit(2, 2)).unwrap()), ErrorCode::NotSealed);
    assert!(matches!(
        c.call(&commit(2, 1)).unwrap(),
        Reply::Committed {
            epoch: Epoch(1),
            ..
        }
    ));
    assert_eq!(code(c.call(&commit(2, 1)).unwrap()), ErrorCode::StaleEpoch);
    assert_eq!(code(c.call(&seal(2, 1)).unwrap()), ErrorCode::StaleEpoch);
    assert_eq!(code(c.call(&seal(1, 2)).unwrap()), ErrorCode::Fenced);
    assert_eq!(
        code(c.call(&Request::Announce { generation: gen(2) }).unwrap()),
        ErrorCode::Unsupported
    );
    match c.call(&Request::Status).unwrap() {
        Reply::Status(s) => {
            assert_eq!(s.generation, gen(2));
            assert_eq!(s.open_epoch, Epoch(2));
            assert_eq!(s.last_committed, Some(Epoch(1)));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.call(&Request::Abort { generation: gen(3) }).unwrap(),
        Reply::Aborted {
            last_committed: Some(Epoch(1)),
            ..
        }
    ));
    assert!(c.take_notifications().is_empty());
}

#[test]
fn socket_file_mode_stale_live_and_cleanup() {
    let dir = TempDir::new("fs");
    let path = dir.sock();
    // A stale socket (bound, then its listener gone) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());
    let (server, _n) = start_toy(&dir);
    let md = std::fs::metadata(&path).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    // A live one is refused, not stolen.
    let e = ControlServer::bind(&path).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    // Stop unlinks.
    server.stop();
    assert!(!path.exists());
    // A regular file is never removed.
    std::fs::write(&path, b"precious").unwrap();
    let e = ControlServer::bind(&path).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

fn raw_reply(s: &mut UnixStream) -> Option<Reply> {
    read_message::<_, Reply>(s, MAX_FRAME_LEN).unwrap()
}

#[test]
fn garbage_gets_error_replies_and_the_server_survives() {
    let dir = TempDir::new("garbage");
    let (_server, _n) = start_toy(&dir);

    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    // Unknown version: error, connection stays.
    let mut bad_version = 18u32.to_be_bytes().to_vec();
    bad_version.push(PROTOCOL_VERSION + 1);
    bad_version.extend_from_slice(br#"{"type":"STATUS"}"#);
    s.write_all(&bad_version).unwrap();
    assert_eq!(
        code(raw_reply(&mut s).unwrap()),
        ErrorCode::UnsupportedVersion
    );
    // Bad JSON and wrong shape: error, connection stays.
    for body in [&b"\x01{not json"[..], b"\x01{\"type\":\"SEAL\"}", b""] {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        s.write_all(&f).unwrap();
        assert_eq!(code(raw_reply(&mut s).unwrap()), ErrorCode::Malformed);
    }
    s.write_all(&encode(&Request::Status).unwrap()).unwrap();
    assert!(matches!(raw_reply(&mut s), Some(Reply::Status(_))));
    // Oversized length: error reply, then a clean close.
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(&[0xAB; 100]);
    s.write_all(&huge).unwrap();
    // The server may already have hung up; later writes may fail, replies stay readable.
    let _ = s.write_all(&[0xCD; 100]);
    assert_eq!(code(raw_reply(&mut s).unwrap()), ErrorCode::TooLarge);
    assert!(
        raw_reply(&mut s).is_none(),
        "connection closed after lost sync"
    );

    // Random bytes, then hang up mid-frame.
    let mut s2 = UnixStream::connect(dir.sock()).unwrap();
    s2.write_all(&[0, 0, 0, 50, 1, b'{']).unwrap();
    drop(s2);

    // The server accepts the next connection and works.
    let mut c = ControlClient::connect(dir.sock(), T).unwrap();
    assert!(matches!(
        c.call(&Request::Status).unwrap(),
        Reply::Status(_)
    ));
}

#[test]
fn notifications_interleave_with_replies() {
    let dir = TempDir::new("notify");
    let (_server, notifier) = start_toy(&dir);
    let mut c = ControlClient::connect(dir.sock(), T).unwrap();
    // Make sure the server has accepted us before notifying (notifications without a
    // coordinator are dropped by design).
    c.call(&Request::Status).unwrap();

    // Idle: a notification wakes the waiter; repeats of the same epoch are coalesced.
    notifier.output_pending(Epoch(1));
    notifier.output_pending(Epoch(1));
    assert_eq!(
        c.wait_notification(T).unwrap(),
        Some(Notification::OutputPending { epoch: Epoch(1) })
    );
    assert_eq!(
        c.wait_notification(Duration::from_millis(100)).unwrap(),
        None
    );

    // Busy: queue threads notify while calls are in flight.
    const LAST: u64 = 300;
    let n2 = notifier.clone();
    let raiser = std::thread::spawn(move || {
        for e in 2..=LAST {
            n2.output_pending(Epoch(e));
            n2.output_pending(Epoch(e - 1)); // an older epoch never goes out again
            std::thread::sleep(Duration::from_micros(300));
        }
    });
    let mut calls = 0;
    while !raiser.is_finished() || calls < 50 {
        assert!(matches!(
            c.call(&Request::Status).unwrap(),
            Reply::Status(_)
        ));
        calls += 1;
    }
    raiser.join().unwrap();
    let mut seen: Vec<u64> = c
        .take_notifications()
        .into_iter()
        .map(|Notification::OutputPending { epoch }| epoch.0)
        .collect();
    let during_calls = seen.len();
    // Drain whatever is still in flight until the newest epoch arrives.
    while seen.last() != Some(&LAST) {
        match c.wait_notification(T).unwrap() {
            Some(Notification::OutputPending { epoch }) => seen.push(epoch.0),
            None => panic!("newest epoch never notified; saw {seen:?}"),
        }
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: {seen:?}"
    );
    eprintln!(
        "{calls} calls, {during_calls} notifications collected by calls, {} in all",
        seen.len()
    );
    assert!(during_calls > 0, "no notification arrived between replies");
    // An epoch older than the newest notified one is never sent again.
    notifier.output_pending(Epoch(LAST - 5));
    notifier.output_pending(Epoch(LAST));
    assert_eq!(
        c.wait_notification(Duration::from_millis(100)).unwrap(),
        None
    );
    // A disabled notifier (daemon without control socket) accepts calls and does nothing.
    Notifier::disabled().output_pending(Epoch(LAST + 1));
}

#[test]
fn late_replies_are_skipped() {
    let dir = TempDir::new("late");
    let server = ControlServer::bind(dir.sock()).unwrap();
    let slow = Arc::new(AtomicU64::new(0));
    let slow2 = slow.clone();
    let toy = Toy::new();
    let _h = server
        .spawn(move |req| {
            std::thread::sleep(Duration::from_millis(slow2.load(Ordering::Relaxed)));
            toy.handle(req)
        })
        .unwrap();

    let mut a = ControlClient::connect(dir.sock(), Duration::from_millis(100)).unwrap();
    slow.store(400, Ordering::Relaxed);
    assert!(matches!(
        a.call(&Request::Status),
        Err(ClientError::Timeout(_))
    ));
    assert_eq!(a.in_flight(), 0);
    slow.store(0, Ordering::Relaxed);
    a.set_timeout(T);
    // The late STATUS reply is skipped; this call gets its own answer.
    assert!(matches!(
        a.call(&Request::Abort { generation: gen(1) }).unwrap(),
        Reply::Aborted { .. }
    ));
}

#[test]
fn a_new_coordinator_fences_an_attached_old_one_and_slots_are_bounded() {
    use ft_common::control::server::MAX_CONNECTIONS;
    let dir = TempDir::new("fence");
    let (_server, notifier) = start_toy(&dir);
    let mut old = ControlClient::connect(dir.sock(), T).unwrap();
    assert!(matches!(
        old.call(&Request::Seal {
            generation: gen(1),
            epoch: Epoch(1)
        })
        .unwrap(),
        Reply::Sealed { .. }
    ));
    // The new coordinator gets in while the old one is still attached, and fences it.
    let mut new = ControlClient::connect(dir.sock(), T).unwrap();
    assert!(matches!(
        new.call(&Request::Abort { generation: gen(2) }).unwrap(),
        Reply::Aborted { .. }
    ));
    let commit = Request::Commit {
        generation: gen(1),
        epoch: Epoch(1),
        deadline: None,
    };
    assert_eq!(code(old.call(&commit).unwrap()), ErrorCode::Fenced);

    // Notifications reach every connection.
    notifier.output_pending(Epoch(3));
    for c in [&mut old, &mut new] {
        assert_eq!(
            c.wait_notification(T).unwrap(),
            Some(Notification::OutputPending { epoch: Epoch(3) })
        );
    }

    // Fill the remaining slots; one more evicts the connection that has gone longest without
    // a request: the fenced old coordinator.
    let mut others: Vec<ControlClient> = (2..MAX_CONNECTIONS)
        .map(|_| ControlClient::connect(dir.sock(), T).unwrap())
        .collect();
    for c in &mut others {
        assert!(matches!(
            c.call(&Request::Status).unwrap(),
            Reply::Status(_)
        ));
    }
    let mut newest = ControlClient::connect(dir.sock(), T).unwrap();
    assert!(matches!(
        newest
            .call(&Request::Seal {
                generation: gen(2),
                epoch: Epoch(4)
            })
            .unwrap(),
        Reply::Sealed {
            epoch: Epoch(4),
            ..
        }
    ));
    assert!(old.call(&Request::Status).is_err(), "old was evicted");
    assert!(matches!(
        new.call(&Request::Status).unwrap(),
        Reply::Status(_)
    ));
}

/// Idle connections and half-written frames in every slot must not lock a new coordinator
/// out; the stalest strangers are evicted first, so the coordinator keeps its slot while more
/// of them arrive.
#[test]
fn stale_connections_never_lock_out_a_new_coordinator() {
    use ft_common::control::server::MAX_CONNECTIONS;
    let dir = TempDir::new("lockout");
    let (_server, _n) = start_toy(&dir);
    let mut junk: Vec<UnixStream> = Vec::new();
    let half = |s: &mut UnixStream, i: usize| {
        let frame = encode(&Request::Status).unwrap();
        s.write_all(&frame[..1 + i % (frame.len() - 1)]).unwrap();
    };
    for i in 0..MAX_CONNECTIONS {
        let mut s = UnixStream::connect(dir.sock()).unwrap();
        if i % 2 == 1 {
            half(&mut s, i);
        }
        junk.push(s);
    }
    let mut coord = ControlClient::connect(dir.sock(), T).unwrap();
    assert!(matches!(
        coord
            .call(&Request::Seal {
                generation: gen(1),
                epoch: Epoch(1)
            })
            .unwrap(),
        Reply::Sealed { .. }
    ));
    for i in 0..3 * MAX_CONNECTIONS {
        let mut s = UnixStream::connect(dir.sock()).unwrap();
        half(&mut s, i);
        junk.push(s);
        assert!(
            matches!(coord.call(&Request::Status).unwrap(), Reply::Status(_)),
            "the served coordinator was evicted by stranger {i}"
        );
    }
}

/// A peer that stops in the middle of a frame is disconnected after the frame timeout.
#[test]
fn a_half_written_frame_times_out() {
    use std::io::Read;
    let dir = TempDir::new("halfframe");
    let mut server = ControlServer::bind(dir.sock()).unwrap();
    server.set_frame_timeout(Duration::from_millis(200));
    let toy = Toy::new();
    let _h = server.spawn(move |req| toy.handle(req)).unwrap();
    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let frame = encode(&Request::Status).unwrap();
    s.write_all(&frame[..frame.len() - 1]).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed, not answered");
    // A whole frame in several pieces well within the timeout is fine.
    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(&frame[..3]).unwrap();
    s.write_all(&frame[3..]).unwrap();
    assert!(matches!(raw_reply(&mut s), Some(Reply::Status(_))));
}

/// A peer that sends requests and never reads the replies must not block the control thread:
/// another coordinator is answered at once (the write timeout here is far longer than the
/// call's timeout, so a blocking write would fail this test).
#[test]
fn a_peer_that_never_reads_does_not_block_others() {
    let dir = TempDir::new("noread");
    let mut server = ControlServer::bind(dir.sock()).unwrap();
    server.set_write_timeout(Duration::from_secs(600));
    let toy = Toy::new();
    let _h = server.spawn(move |req| toy.handle(req)).unwrap();
    let mut hog = UnixStream::connect(dir.sock()).unwrap();
    let frames: Vec<u8> = (0..20_000)
        .flat_map(|_| encode(&Request::Status).unwrap())
        .collect();
    // The hog's own writes block once the daemon stops reading it: write from a thread.
    let writer = {
        let mut hog = hog.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = hog.write_all(&frames);
        })
    };
    // Let its replies fill the socket buffers.
    std::thread::sleep(Duration::from_millis(300));
    let mut c = ControlClient::connect(dir.sock(), T).unwrap();
    for e in 1..=20 {
        assert!(matches!(
            c.call(&Request::Seal {
                generation: gen(1),
                epoch: Epoch(e)
            })
            .unwrap(),
            Reply::Sealed { .. }
        ));
    }
    // The hog was not dropped: once it reads, every reply arrives, in order.
    let _ = hog.set_read_timeout(Some(T));
    for i in 0..20_000 {
        assert!(
            matches!(raw_reply(&mut hog), Some(Reply::Status(_))),
            "reply {i}"
        );
    }
    writer.join().unwrap();
}

/// Generations and epochs above 2^53 - 1 are refused with no effect, so nobody can push the
/// fence or the open epoch to where no later value exists.
#[test]
fn numbers_beyond_the_protocol_bound_are_refused_without_effect() {
    use ft_common::control::message::MAX_REQUEST_NUMBER;
    let dir = TempDir::new("range");
    let (_server, _n) = start_toy(&dir);
    let mut c = ControlClient::connect(dir.sock(), T).unwrap();
    for req in [
        Request::Abort {
            generation: gen(u64::MAX),
        },
        Request::Seal {
            generation: gen(MAX_REQUEST_NUMBER + 1),
            epoch: Epoch(1),
        },
        Request::Seal {
            generation: gen(1),
            epoch: Epoch(u64::MAX - 1),
        },
        Request::Commit {
            generation: gen(1),
            epoch: Epoch(u64::MAX),
            deadline: None,
        },
    ] {
        match c.call(&req).unwrap() {
            Reply::Error { code, message } => {
                assert_eq!(code, ErrorCode::Malformed, "{req:?}");
                assert!(message.contains("maximum"), "{message}");
            }
            r => panic!("{req:?} accepted: {r:?}"),
        }
    }
    match c.call(&Request::Status).unwrap() {
        Reply::Status(s) => {
            assert_eq!(s.generation, gen(0), "the fence did not move");
            assert_eq!(s.open_epoch, Epoch(1), "the epoch did not move");
        }
        r => panic!("{r:?}"),
    }
    // The largest allowed values still work, and a coordinator after them still counts.
    assert!(matches!(
        c.call(&Request::Seal {
            generation: gen(7),
            epoch: Epoch(MAX_REQUEST_NUMBER - 1)
        })
        .unwrap(),
        Reply::Sealed { .. }
    ));
    assert!(matches!(
        c.call(&Request::Abort { generation: gen(8) }).unwrap(),
        Reply::Aborted { .. }
    ));
}

/// Many pipelined requests from a peer that reads only after writing them all are answered,
/// in order, even though the daemon stops reading while its replies are unread.
#[test]
fn deep_pipelining_is_answered_in_order() {
    let dir = TempDir::new("pipeline");
    let (_server, _n) = start_toy(&dir);
    let mut s = UnixStream::connect(dir.sock()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let n = 3000u64;
    let frames: Vec<u8> = (1..=n)
        .flat_map(|e| {
            encode(&Request::Seal {
                generation: gen(1),
                epoch: Epoch(e),
            })
            .unwrap()
        })
        .collect();
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || s.write_all(&frames).unwrap())
    };
    for e in 1..=n {
        match raw_reply(&mut s) {
            Some(Reply::Sealed { epoch, .. }) => assert_eq!(epoch, Epoch(e)),
            r => panic!("reply {e}: {r:?}"),
        }
    }
    writer.join().unwrap();
}

#[test]
fn a_panicking_handler_yields_internal_and_the_server_lives_on() {
    let dir = TempDir::new("panic");
    let server = ControlServer::bind(dir.sock()).unwrap();
    let _h = server
        .spawn(|req| match req {
            Request::Announce { .. } => panic!("handler bug"),
            _ => Reply::Announced { packets: 0 },
        })
        .unwrap();
    let mut c = ControlClient::connect(dir.sock(), T).unwrap();
    assert_eq!(
        code(c.call(&Request::Announce { generation: gen(0) }).unwrap()),
        ErrorCode::Internal
    );
    assert!(matches!(
        c.call(&Request::Status).unwrap(),
        Reply::Announced { .. }
    ));
}

#[test]
fn client_reports_a_daemon_that_goes_away() {
    let dir = TempDir::new("gone");
    let (server, _n) = start_toy(&dir);
    let mut c = ControlClient::connect(dir.sock(), T).unwrap();
    c.call(&Request::Status).unwrap();
    server.stop();
    let e = c.call(&Request::Status).unwrap_err();
    assert!(
        matches!(e, ClientError::Closed | ClientError::Codec(_)),
        "{e}"
    );
    assert!(c.is_broken());
    assert!(matches!(c.call(&Request::Status), Err(ClientError::Broken)));
    assert!(matches!(
        ControlClient::connect(dir.sock(), T),
        Err(ClientError::Connect { .. })
    ));
}

#[test]
fn fan_out_and_pipelining_keep_replies_in_order() {
    let d1 = TempDir::new("fan1");
    let d2 = TempDir::new("fan2");
    let (_s1, _n1) = start_toy(&d1);
    let (_s2, _n2) = start_toy(&d2);
    let mut c1 = ControlClient::connect(d1.sock(), T).unwrap();
    let mut c2 = ControlClient::connect(d2.sock(), T).unwrap();

    assert!(matches!(c1.recv_reply(), Err(ClientError::Protocol(_))));
    assert!(!c1.is_broken());

    // One SEAL to both daemons, then collect.
    let seal = Request::Seal {
        generation: gen(1),
        epoch: Epoch(5),
    };
    c1.send(&seal).unwrap();
    c2.send(&seal).unwrap();
    for c in [&mut c1, &mut c2] {
        assert!(matches!(
            c.recv_reply().unwrap(),
            Reply::Sealed {
                epoch: Epoch(5),
                ..
            }
        ));
    }

    // Pipelined requests on one connection are answered in order.
    c1.send(&Request::Commit {
        generation: gen(1),
        epoch: Epoch(5),
        deadline: None,
    })
    .unwrap();
    c1.send(&Request::Commit {
        generation: gen(1),
        epoch: Epoch(5),
        deadline: None,
    })
    .unwrap();
    c1.send(&Request::Status).unwrap();
    assert_eq!(c1.in_flight(), 3);
    assert!(matches!(
        c1.wait_notification(Duration::ZERO),
        Err(ClientError::Protocol(_))
    ));
    assert!(matches!(
        c1.recv_reply().unwrap(),
        Reply::Committed {
            epoch: Epoch(5),
            ..
        }
    ));
    assert_eq!(code(c1.recv_reply().unwrap()), ErrorCode::StaleEpoch);
    assert!(matches!(c1.recv_reply().unwrap(), Reply::Status(_)));
    assert_eq!(c1.in_flight(), 0);
    assert_eq!(c1.wait_notification(Duration::ZERO).unwrap(), None);
}

mod through_the_socket {
    //! Arbitrary bytes and arbitrary numbers into a live control server (the codec's own
    //! properties are in `control_codec.rs`): whatever a peer sends, every byte the daemon
    //! answers is a well-formed frame, the daemon keeps serving, and no request can push the
    //! fence or the open epoch beyond the protocol bound.
    use super::*;
    use ft_common::control::codec::encode_into;
    use ft_common::control::message::MAX_REQUEST_NUMBER;
    use ft_common::control::{DaemonMessage, FrameDecoder};
    use proptest::prelude::*;
    use std::io::Read;

    fn chunk() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            // Garbage.
            prop::collection::vec(any::<u8>(), 0..64),
            // A well-framed random body.
            prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| {
                let mut f = ((b.len() + 1) as u32).to_be_bytes().to_vec();
                f.push(PROTOCOL_VERSION);
                f.extend_from_slice(&b);
                f
            }),
            // A real request with arbitrary numbers.
            (0u8..4, any::<u64>(), any::<u64>()).prop_map(|(k, g, e)| {
                let req = match k {
                    0 => Request::Seal {
                        generation: Generation(g),
                        epoch: Epoch(e),
                    },
                    1 => Request::Commit {
                        generation: Generation(g),
                        epoch: Epoch(e),
                        deadline: None,
                    },
                    2 => Request::Abort {
                        generation: Generation(g),
                    },
                    _ => Request::Status,
                };
                let mut f = Vec::new();
                encode_into(&req, &mut f, MAX_FRAME_LEN).unwrap();
                f
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn arbitrary_input_never_breaks_the_server(chunks in prop::collection::vec(chunk(), 1..12)) {
            let dir = TempDir::new("prop");
            let (_server, _n) = start_toy(&dir);
            let mut s = UnixStream::connect(dir.sock()).unwrap();
            for c in &chunks {
                // The server may hang up (lost frame sync); later writes may fail.
                if s.write_all(c).is_err() {
                    break;
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
            s.set_read_timeout(Some(T)).unwrap();
            let mut answered = Vec::new();
            let _ = s.read_to_end(&mut answered);
            let mut d = FrameDecoder::new();
            d.feed(&answered);
            while let Some(m) = d.decode::<DaemonMessage>().expect("the daemon sent a bad frame") {
                prop_assert!(!matches!(m, DaemonMessage::Notification(_)));
            }
            prop_assert!(d.finish().is_ok(), "the daemon cut a frame short");
            let mut c = ControlClient::connect(dir.sock(), T).unwrap();
            match c.call(&Request::Status).unwrap() {
                Reply::Status(st) => {
                    prop_assert!(st.generation.0 <= MAX_REQUEST_NUMBER);
                    prop_assert!(st.open_epoch.0 <= MAX_REQUEST_NUMBER + 1);
                }
                r => prop_assert!(false, "{:?}", r),
            }
        }
    }
}
