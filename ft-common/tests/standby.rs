// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ft-standby's protocol, store and refusals, driven over real sockets with a hand-made
//! migration stream (the QEMU-backed tests are in tests/tests/checkpoint_qemu.rs).

mod common;

use common::TempDir;
use ft_common::control::codec::MAX_FRAME_LEN;
use ft_common::epoch::{Epoch, Generation};
use ft_common::standby::client::StandbyClient;
use ft_common::standby::protocol::{StandbyAddr, StandbyReply, StandbyRequest};
use ft_common::standby::{CheckpointStore, StandbyConfig, StandbyServer};
use std::io::{Read, Write};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

fn start(dir: &TempDir) -> StandbyServer {
    StandbyServer::start(StandbyConfig {
        listen: StandbyAddr::Unix(dir.path().join("standby.sock")),
        store: dir.path().join("store"),
        fsync_delay: Duration::ZERO,
        stream_timeout: Duration::from_secs(5),
    })
    .unwrap()
}

/// A fake migration stream: QEMU's magic and version, then `body`.
fn stream(body: &[u8]) -> Vec<u8> {
    let mut v = b"QEVM\0\0\0\x03".to_vec();
    v.extend_from_slice(body);
    v
}

fn send_stream(addr: &StandbyAddr, bytes: &[u8]) {
    let mut c = addr.connect(T).unwrap();
    c.write_all(bytes).unwrap();
}

fn end(g: u64, e: u64) -> StandbyRequest {
    StandbyRequest::End {
        generation: Generation(g),
        epoch: Epoch(e),
        devices: vec![serde_json::json!({"device": "vda", "kind": "blk", "queues": []})],
        mode: Some("paused".into()),
        vm_paused_us: Some(1000),
        meta: None,
    }
}

fn checkpoint(c: &mut StandbyClient, g: u64, e: u64, body: &[u8]) -> StandbyReply {
    let r = c
        .call(&StandbyRequest::Begin {
            generation: Generation(g),
        })
        .unwrap();
    assert!(matches!(r, StandbyReply::Ready { .. }), "{r:?}");
    send_stream(c.addr(), &stream(body));
    c.call(&end(g, e)).unwrap()
}

#[test]
fn checkpoints_are_published_validated_and_pruned() {
    let dir = TempDir::new("standby-ok");
    let s = start(&dir);
    let mut c = StandbyClient::new(s.addr().clone(), T);
    for e in 1..=3u64 {
        let r = checkpoint(&mut c, 1, e, &vec![e as u8; 3 << 20]);
        match r {
            StandbyReply::Durable {
                epoch, vmstate_len, ..
            } => {
                assert_eq!(epoch, Epoch(e));
                assert_eq!(vmstate_len, 8 + (3 << 20));
            }
            other => panic!("{other:?}"),
        }
        let store = CheckpointStore::open(dir.path().join("store")).unwrap();
        let n = store.newest_valid().unwrap().unwrap();
        assert_eq!((n.generation(), n.epoch()), (Generation(1), Epoch(e)));
        assert_eq!(
            store.list().unwrap().len(),
            1,
            "older checkpoints are deleted"
        );
        assert_eq!(n.devices().unwrap()[0].device, "vda");
    }
}

#[test]
fn garbage_old_generations_and_stale_epochs_are_refused_with_a_reason() {
    let dir = TempDir::new("standby-refuse");
    let s = start(&dir);
    let mut c = StandbyClient::new(s.addr().clone(), T);
    assert!(matches!(
        checkpoint(&mut c, 2, 10, b"state"),
        StandbyReply::Durable { .. }
    ));

    // Garbage: not a frame (length far over the bound).
    let mut g = s.addr().connect(T).unwrap();
    g.write_all(b"\x7fELF garbage garbage garbage").unwrap();
    let r: StandbyReply = ft_common::control::codec::read_message(&mut g, MAX_FRAME_LEN)
        .unwrap()
        .unwrap();
    match r {
        StandbyReply::Refused { reason } => assert!(reason.contains("exceeds"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A well-framed body that is no request.
    let mut g = s.addr().connect(T).unwrap();
    ft_common::control::codec::write_message(&mut g, &serde_json::json!({"type": "HELLO"}))
        .unwrap();
    let r: StandbyReply = ft_common::control::codec::read_message(&mut g, MAX_FRAME_LEN)
        .unwrap()
        .unwrap();
    assert!(matches!(r, StandbyReply::Refused { ref reason } if reason.contains("bad request")));

    // An older generation.
    let r = c
        .call(&StandbyRequest::Begin {
            generation: Generation(1),
        })
        .unwrap();
    match r {
        StandbyReply::Refused { reason } => {
            assert!(
                reason.contains("generation 1 is older than generation 2"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A stale epoch of the same generation.
    match checkpoint(&mut c, 2, 10, b"again") {
        StandbyReply::Refused { reason } => assert!(reason.contains("not newer"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A stream that is not QEMU's (wrong version) is cut off and the END refused.
    let r = c
        .call(&StandbyRequest::Begin {
            generation: Generation(2),
        })
        .unwrap();
    assert!(matches!(r, StandbyReply::Ready { .. }));
    send_stream(s.addr(), b"QEVM\0\0\0\x09junk");
    match c.call(&end(2, 11)).unwrap() {
        StandbyReply::Refused { reason } => assert!(reason.contains("version"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // END without a stream.
    let r = c
        .call(&StandbyRequest::Begin {
            generation: Generation(2),
        })
        .unwrap();
    assert!(matches!(r, StandbyReply::Ready { .. }));
    match c.call(&end(2, 12)).unwrap() {
        StandbyReply::Refused { reason } => assert!(reason.contains("no migration stream")),
        other => panic!("{other:?}"),
    }
    // A stream nobody announced is closed at once.
    let mut orphan = s.addr().connect(T).unwrap();
    orphan.write_all(&stream(b"orphan")).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(orphan.read(&mut b).unwrap_or(0), 0);
    // A fence written by a takeover refuses the old generation from then on.
    let store = CheckpointStore::open(dir.path().join("store")).unwrap();
    store.fence(Generation(3)).unwrap();
    let r = c
        .call(&StandbyRequest::Begin {
            generation: Generation(2),
        })
        .unwrap();
    assert!(matches!(r, StandbyReply::Refused { .. }), "{r:?}");
    // Through all of it the published checkpoint stayed.
    let n = store.newest_valid().unwrap().unwrap();
    assert_eq!((n.generation(), n.epoch()), (Generation(2), Epoch(10)));
    assert_eq!(std::fs::read(n.vmstate_path()).unwrap(), stream(b"state"));
}

#[test]
fn a_cut_stream_or_a_lost_checkpointer_leaves_the_published_checkpoint() {
    let dir = TempDir::new("standby-cut");
    let s = start(&dir);
    let mut c = StandbyClient::new(s.addr().clone(), T);
    assert!(matches!(
        checkpoint(&mut c, 1, 1, b"first"),
        StandbyReply::Durable { .. }
    ));
    // Stream cut mid-way, checkpointer cancels: the standby reports nothing wrong of its own.
    let r = c
        .call(&StandbyRequest::Begin {
            generation: Generation(1),
        })
        .unwrap();
    assert!(matches!(r, StandbyReply::Ready { .. }));
    send_stream(s.addr(), &stream(&[7u8; 100_000])[..50_000]);
    let r = c
        .call(&StandbyRequest::Cancel {
            reason: "migration failed".into(),
        })
        .unwrap();
    assert!(matches!(r, StandbyReply::Cancelled { .. }), "{r:?}");
    // Checkpointer vanishes mid-stream.
    let r = c
        .call(&StandbyRequest::Begin {
            generation: Generation(1),
        })
        .unwrap();
    assert!(matches!(r, StandbyReply::Ready { .. }));
    let mut st = s.addr().connect(T).unwrap();
    st.write_all(&stream(&[1u8; 10_000])).unwrap();
    c.disconnect();
    drop(st);
    let store_dir = dir.path().join("store");
    common::wait_for("incoming removed", || {
        std::fs::read_dir(&store_dir).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".incoming")
        })
    });
    let store = CheckpointStore::open(&store_dir).unwrap();
    let n = store.newest_valid().unwrap().unwrap();
    assert_eq!(n.epoch(), Epoch(1));
    assert_eq!(std::fs::read(n.vmstate_path()).unwrap(), stream(b"first"));
    // And the next checkpoint goes through.
    let mut c = StandbyClient::new(s.addr().clone(), T);
    assert!(matches!(
        checkpoint(&mut c, 1, 2, b"second"),
        StandbyReply::Durable { .. }
    ));
}

#[test]
fn a_new_begin_preempts_a_checkpoint_in_progress() {
    let dir = TempDir::new("standby-preempt");
    let s = start(&dir);
    // A checkpointer that went silent mid-checkpoint (its host died without closing).
    let mut old = StandbyClient::new(s.addr().clone(), T);
    let r = old
        .call(&StandbyRequest::Begin {
            generation: Generation(1),
        })
        .unwrap();
    assert!(matches!(r, StandbyReply::Ready { .. }));
    // Its successor (a restarted coordinator: next generation) is not locked out.
    let mut new = StandbyClient::new(s.addr().clone(), T);
    assert!(matches!(
        checkpoint(&mut new, 2, 5, b"new"),
        StandbyReply::Durable { .. }
    ));
    // The old one can no longer publish anything.
    match old.call(&end(1, 6)).unwrap() {
        StandbyReply::Refused { reason } => assert!(reason.contains("preempted"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let store = CheckpointStore::open(dir.path().join("store")).unwrap();
    let n = store.newest_valid().unwrap().unwrap();
    assert_eq!((n.generation(), n.epoch()), (Generation(2), Epoch(5)));
}
