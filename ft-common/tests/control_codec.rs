// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Properties of the control framing: every message round-trips, and no input (truncated,
//! oversized, wrong version, garbage, wrong shape) makes the decoder panic or allocate beyond the
//! frame bound.

use ft_common::control::codec::{
    encode, encode_into, read_message, CodecError, FrameDecoder, HEADER_LEN, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};
use ft_common::control::deadline::MonotonicTime;
use ft_common::control::message::*;
use ft_common::epoch::{Epoch, Generation};
use proptest::prelude::*;
use std::io::Read;

// ---------- strategies ----------

fn epoch() -> impl Strategy<Value = Epoch> {
    any::<u64>().prop_map(Epoch)
}
fn generation() -> impl Strategy<Value = Generation> {
    any::<u64>().prop_map(Generation)
}
fn opt_epoch() -> impl Strategy<Value = Option<Epoch>> {
    proptest::option::of(epoch())
}
fn kind() -> impl Strategy<Value = DeviceKind> {
    prop_oneof![Just(DeviceKind::Blk), Just(DeviceKind::Net)]
}
fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::Malformed),
        Just(ErrorCode::UnsupportedVersion),
        Just(ErrorCode::TooLarge),
        Just(ErrorCode::Fenced),
        Just(ErrorCode::StaleEpoch),
        Just(ErrorCode::NotSealed),
        Just(ErrorCode::Aborted),
        Just(ErrorCode::CommitRefused),
        Just(ErrorCode::Unsupported),
        Just(ErrorCode::Internal),
        Just(ErrorCode::Unknown),
    ]
}
fn stats() -> impl Strategy<Value = CommitStats> {
    any::<[u64; 6]>().prop_map(|v| CommitStats {
        requests: v[0],
        bytes: v[1],
        submit_to_drain_us: v[2],
        fdatasync_us: v[3],
        total_us: v[4],
        epochs: v[5],
    })
}
fn txstate() -> impl Strategy<Value = TransactionState> {
    let queue = (
        any::<u16>(),
        any::<u16>(),
        prop::collection::vec(any::<u16>(), 0..40),
    )
        .prop_map(|(queue, next_avail, outstanding)| QueueState {
            queue,
            next_avail,
            used_idx: Some(next_avail.wrapping_sub(outstanding.len() as u16)),
            held: outstanding.len() as u32 / 2,
            outstanding,
            ..Default::default()
        });
    (".{0,20}", kind(), prop::collection::vec(queue, 0..4)).prop_map(|(device, kind, queues)| {
        TransactionState {
            device,
            kind,
            queues,
        }
    })
}
fn status() -> impl Strategy<Value = DeviceStatus> {
    let held = (epoch(), any::<[u64; 3]>()).prop_map(|(epoch, v)| EpochHeld {
        epoch,
        requests: v[0],
        bytes: v[1],
        oldest_age_us: v[2],
    });
    (
        (".{0,12}", kind(), "off|hold|buffer", generation(), epoch()),
        (opt_epoch(), opt_epoch(), any::<[u64; 5]>()),
        (
            prop::collection::vec(held, 0..4),
            any::<bool>(),
            proptest::option::of(stats()),
        ),
    )
        .prop_map(
            |(
                (device, kind, mode, generation, open_epoch),
                (last_sealed, last_committed, v),
                (epochs, commit_refused, last_commit),
            )| DeviceStatus {
                device,
                kind,
                mode,
                generation,
                open_epoch,
                last_sealed,
                last_committed,
                held_requests: v[0],
                held_bytes: v[1],
                epochs,
                commits_ok: v[2],
                commits_failed: v[3],
                fdatasyncs: v[4],
                commit_refused,
                last_commit,
                replica: None,
                dirty_log: None,
            },
        )
}
fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (generation(), epoch()).prop_map(|(generation, epoch)| Request::Seal { generation, epoch }),
        (
            generation(),
            epoch(),
            proptest::option::of(any::<u64>().prop_map(MonotonicTime))
        )
            .prop_map(|(generation, epoch, deadline)| Request::Commit {
                generation,
                epoch,
                deadline
            }),
        generation().prop_map(|generation| Request::Abort { generation }),
        generation().prop_map(|generation| Request::Announce { generation }),
        (generation(), txstate())
            .prop_map(|(generation, state)| Request::Replay { generation, state }),
        Just(Request::Status),
    ]
}
fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (epoch(), txstate()).prop_map(|(epoch, state)| Reply::Sealed { epoch, state }),
        (epoch(), stats()).prop_map(|(epoch, stats)| Reply::Committed { epoch, stats }),
        (epoch(), any::<String>(), proptest::option::of(any::<i32>())).prop_map(
            |(epoch, error, errno)| Reply::CommitFailed {
                epoch,
                error,
                errno
            }
        ),
        (any::<u64>(), any::<u64>(), opt_epoch()).prop_map(|(r, b, l)| Reply::Aborted {
            cancelled_requests: r,
            cancelled_bytes: b,
            last_committed: l
        }),
        any::<u32>().prop_map(|packets| Reply::Announced { packets }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(queues, requests)| Reply::ReplayAccepted { queues, requests }),
        status().prop_map(|s| Reply::Status(Box::new(s))),
        (error_code(), any::<String>()).prop_map(|(code, message)| Reply::Error { code, message }),
    ]
}
fn daemon_message() -> impl Strategy<Value = DaemonMessage> {
    prop_oneof![
        reply().prop_map(DaemonMessage::Reply),
        epoch()
            .prop_map(|epoch| DaemonMessage::Notification(Notification::OutputPending { epoch })),
    ]
}

/// A raw frame with an arbitrary version byte and body.
fn raw_frame(version: u8, body: &[u8]) -> Vec<u8> {
    let mut f = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    f.push(version);
    f.extend_from_slice(body);
    f
}

/// Drains a decoder; checks every message it yields re-encodes, and stops at a fatal error.
fn drain_checked(d: &mut FrameDecoder) -> (usize, usize, bool) {
    let (mut ok, mut errs) = (0, 0);
    loop {
        match d.decode::<Request>() {
            Ok(None) => return (ok, errs, false),
            Ok(Some(req)) => {
                // A decoded message must be a real message: it encodes back within bounds.
                encode(&req).expect("decoded request re-encodes");
                ok += 1;
            }
            Err(e) => {
                errs += 1;
                if e.is_fatal() {
                    assert!(matches!(e, CodecError::TooLarge { .. }));
                    return (ok, errs, true);
                }
            }
        }
        assert!(d.buffered() <= HEADER_LEN + MAX_FRAME_LEN + 4096);
    }
}

// ---------- properties ----------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Random bytes, fed in random chunks: never a panic, always an error or a valid frame.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512),
                                chunk in 1usize..64) {
        let mut d = FrameDecoder::new();
        for c in bytes.chunks(chunk) {
            d.feed(c);
            if drain_checked(&mut d).2 { break; }
        }
        let _ = d.finish();
        // The blocking reader too.
        let mut r = &bytes[..];
        while let Ok(Some(_)) = read_message::<_, Request>(&mut r, MAX_FRAME_LEN) {}
    }

    /// Well-framed garbage (valid length and version, random body) exercises the JSON layer.
    #[test]
    fn random_bodies_are_malformed_not_panics(body in prop::collection::vec(any::<u8>(), 0..256),
                                              version in any::<u8>()) {
        let mut d = FrameDecoder::new();
        d.feed(&raw_frame(version, &body));
        d.feed(&encode(&Request::Status).unwrap());
        match d.decode::<Request>() {
            Ok(Some(r)) => { encode(&r).unwrap(); }
            Ok(None) => prop_assert!(false, "a complete frame must decode to something"),
            Err(e) => {
                prop_assert!(!e.is_fatal());
                if version != PROTOCOL_VERSION {
                    prop_assert!(matches!(e, CodecError::UnsupportedVersion(v) if v == version));
                }
            }
        }
        // The frame after it is unaffected.
        prop_assert_eq!(d.decode::<Request>().unwrap(), Some(Request::Status));
    }

    /// Random JSON values of the wrong shape are typed errors.
    #[test]
    fn json_of_random_shape_is_handled(keys in prop::collection::vec("[a-z_]{1,10}", 0..5),
                                       tag in "[A-Z_]{0,16}",
                                       n in any::<i64>()) {
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), serde_json::Value::String(tag));
        for k in keys {
            obj.insert(k, serde_json::Value::from(n));
        }
        let body = serde_json::to_vec(&obj).unwrap();
        let mut d = FrameDecoder::new();
        d.feed(&raw_frame(PROTOCOL_VERSION, &body));
        match d.decode::<Request>() {
            Ok(Some(r)) => { encode(&r).unwrap(); }
            Ok(None) => prop_assert!(false, "complete frame"),
            Err(e) => prop_assert!(matches!(e, CodecError::Malformed(_))),
        }
        let mut d = FrameDecoder::new();
        d.feed(&raw_frame(PROTOCOL_VERSION, &body));
        match d.decode::<DaemonMessage>() {
            Ok(Some(m)) => { encode(&m).unwrap(); }
            Ok(None) => prop_assert!(false, "complete frame"),
            Err(e) => prop_assert!(matches!(e, CodecError::Malformed(_))),
        }
    }

    #[test]
    fn requests_round_trip(req in request()) {
        let f = encode(&req).unwrap();
        let mut r = &f[..];
        prop_assert_eq!(read_message::<_, Request>(&mut r, MAX_FRAME_LEN).unwrap(), Some(req));
    }

    #[test]
    fn daemon_messages_round_trip(msg in daemon_message()) {
        let f = encode(&msg).unwrap();
        let mut d = FrameDecoder::new();
        d.feed(&f);
        prop_assert_eq!(d.decode::<DaemonMessage>().unwrap(), Some(msg.clone()));
        // The same bytes decode as the specific type.
        let mut r = &f[..];
        match msg {
            DaemonMessage::Reply(rep) =>
                prop_assert_eq!(read_message::<_, Reply>(&mut r, MAX_FRAME_LEN).unwrap(), Some(rep)),
            DaemonMessage::Notification(n) =>
                prop_assert_eq!(read_message::<_, Notification>(&mut r, MAX_FRAME_LEN).unwrap(), Some(n)),
        }
    }

    /// A stream of frames split at arbitrary points decodes to the same messages, in order.
    #[test]
    fn split_points_do_not_matter(msgs in prop::collection::vec(daemon_message(), 1..6),
                                  cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_into(m, &mut stream, MAX_FRAME_LEN).unwrap();
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for w in points.windows(2) {
            d.feed(&stream[w[0]..w[1]]);
            while let Some(m) = d.decode::<DaemonMessage>().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert!(d.finish().is_ok());
    }
}

// ---------- exhaustive and boundary cases ----------

fn sample_messages() -> Vec<Vec<u8>> {
    vec![
        encode(&Request::Status).unwrap(),
        encode(&Request::Seal {
            generation: Generation(3),
            epoch: Epoch(17),
        })
        .unwrap(),
        encode(&Reply::Sealed {
            epoch: Epoch(17),
            state: TransactionState {
                device: "vda".into(),
                kind: DeviceKind::Blk,
                queues: vec![QueueState {
                    queue: 0,
                    next_avail: 9,
                    outstanding: vec![1, 2, 3],
                    used_idx: Some(6),
                    held: 2,
                    ..Default::default()
                }],
            },
        })
        .unwrap(),
    ]
}

#[test]
fn truncation_at_every_cut_point() {
    for f in sample_messages() {
        for cut in 0..f.len() {
            let part = &f[..cut];
            let mut r = part;
            let res = read_message::<_, serde_json::Value>(&mut r, MAX_FRAME_LEN);
            if cut == 0 {
                assert!(matches!(res, Ok(None)));
            } else {
                let e = res.unwrap_err();
                assert!(
                    matches!(e, CodecError::Truncated { have, .. } if have == cut),
                    "{e}"
                );
                assert!(e.is_fatal());
            }
            let mut d = FrameDecoder::new();
            d.feed(part);
            assert!(
                matches!(d.decode::<serde_json::Value>(), Ok(None)),
                "cut {cut}"
            );
            assert_eq!(d.finish().is_err(), cut > 0);
            // Completing the frame later still works.
            d.feed(&f[cut..]);
            assert!(d.decode::<serde_json::Value>().unwrap().is_some());
        }
    }
}

/// A reader that records how much was taken from it.
struct Counting<'a> {
    data: &'a [u8],
    taken: usize,
}
impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.data.len().min(buf.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.taken += n;
        Ok(n)
    }
}

#[test]
fn oversized_lengths_are_refused_before_reading_the_body() {
    for len in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1; 64]);
        let mut r = Counting {
            data: &bytes,
            taken: 0,
        };
        let e = read_message::<_, Request>(&mut r, MAX_FRAME_LEN).unwrap_err();
        assert!(matches!(e, CodecError::TooLarge { len: l, .. } if l == u64::from(len)));
        assert!(e.is_fatal());
        assert_eq!(r.taken, HEADER_LEN, "nothing past the header was read");

        let mut d = FrameDecoder::new();
        d.feed(&len.to_be_bytes());
        assert!(matches!(
            d.decode::<Request>(),
            Err(CodecError::TooLarge { .. })
        ));
        // Frame sync is lost for good: even a valid frame afterwards is refused.
        d.feed(&encode(&Request::Status).unwrap());
        assert!(d.decode::<Request>().unwrap_err().is_fatal());
    }
}

#[test]
fn the_bound_is_inclusive() {
    // {"type":"STATUS"} padded with JSON whitespace to exactly the bound.
    let mut body = br#"{"type":"STATUS"}"#.to_vec();
    body.resize(MAX_FRAME_LEN - 1, b' ');
    let f = raw_frame(PROTOCOL_VERSION, &body);
    let mut r = &f[..];
    assert_eq!(
        read_message::<_, Request>(&mut r, MAX_FRAME_LEN).unwrap(),
        Some(Request::Status)
    );
    body.push(b' ');
    let f = raw_frame(PROTOCOL_VERSION, &body);
    let mut d = FrameDecoder::new();
    d.feed(&f);
    assert!(matches!(
        d.decode::<Request>(),
        Err(CodecError::TooLarge { .. })
    ));
}

#[test]
fn unknown_versions_are_refused_and_skipped() {
    for v in [0u8, 2, 255] {
        let mut d = FrameDecoder::new();
        d.feed(&raw_frame(v, br#"{"type":"STATUS"}"#));
        d.feed(
            &encode(&Request::Abort {
                generation: Generation(1),
            })
            .unwrap(),
        );
        let e = d.decode::<Request>().unwrap_err();
        assert!(matches!(e, CodecError::UnsupportedVersion(x) if x == v));
        assert_eq!(e.error_code(), Some(ErrorCode::UnsupportedVersion));
        assert!(!e.is_fatal());
        assert_eq!(
            d.decode::<Request>().unwrap(),
            Some(Request::Abort {
                generation: Generation(1)
            })
        );
    }
}

#[test]
fn wrong_shapes_are_malformed() {
    for body in [
        &b""[..],
        b"null",
        b"{}",
        b"[]",
        b"{\"type\":\"SEAL\"}",
        b"{\"type\":\"COMMIT\",\"generation\":\"1\",\"epoch\":2}",
        b"{\"type\":\"SEALED\",\"epoch\":1}",
        b"{\"type\":\"STATUS\"} trailing",
        b"\xff\xfe",
        b"{\"type\":\"SEAL\",\"generation\":1,\"epoch\":18446744073709551616}",
    ] {
        let mut d = FrameDecoder::new();
        d.feed(&raw_frame(PROTOCOL_VERSION, body));
        let e = d.decode::<Request>().unwrap_err();
        assert!(matches!(e, CodecError::Malformed(_)), "{e}");
        assert_eq!(e.error_code(), Some(ErrorCode::Malformed));
    }
    // Deep nesting hits serde_json's recursion limit instead of the stack.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut d = FrameDecoder::new();
    d.feed(&raw_frame(PROTOCOL_VERSION, deep.as_bytes()));
    assert!(matches!(
        d.decode::<DaemonMessage>(),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn a_full_multiqueue_seal_fits_the_bound() {
    // 16 queues of 32768 outstanding heads each (a ring cannot have more outstanding than its
    // size, 32768 at most), all held, with the widest head numbers: the design maximum.
    let queues = (0..16)
        .map(|q| QueueState {
            queue: q,
            next_avail: u16::MAX,
            used_idx: Some(u16::MAX - 32768),
            held: 32768,
            outstanding: (0..32768u16)
                .map(|i| i.wrapping_add(32768 - 10000))
                .collect(),
            ..Default::default()
        })
        .collect();
    let msg = Reply::Sealed {
        epoch: Epoch(u64::MAX),
        state: TransactionState {
            device: "a-rather-long-device-name-for-good-measure".into(),
            kind: DeviceKind::Net,
            queues,
        },
    };
    let f = encode(&msg).expect("fits");
    assert!(f.len() <= HEADER_LEN + MAX_FRAME_LEN);
    let mut d = FrameDecoder::new();
    d.feed(&f);
    assert_eq!(d.decode::<Reply>().unwrap(), Some(msg));
}

// ---------- the specification's examples ----------

fn spec() -> String {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/control-protocol.md");
    std::fs::read_to_string(p).expect("docs/control-protocol.md")
}

/// Re-encodes `v` as `T` and checks nothing was lost or invented (unknown fields would be
/// silently ignored on decode, so a typo in the spec would otherwise pass).
fn round_trips_as<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: &serde_json::Value,
) -> bool {
    serde_json::from_value::<T>(v.clone())
        .ok()
        .and_then(|m| serde_json::to_value(m).ok())
        .is_some_and(|back| &back == v)
}

#[test]
fn doc_examples_decode() {
    let spec = spec();
    let mut in_json = false;
    let mut checked = 0;
    for line in spec.lines() {
        match line.trim() {
            "```json" => in_json = true,
            "```" => in_json = false,
            l if in_json && !l.is_empty() => {
                let v: serde_json::Value = serde_json::from_str(l).expect(l);
                assert!(
                    round_trips_as::<Request>(&v) || round_trips_as::<DaemonMessage>(&v),
                    "spec example does not match the message types exactly: {l}"
                );
                // And as a real frame.
                let mut d = FrameDecoder::new();
                d.feed(&raw_frame(PROTOCOL_VERSION, l.as_bytes()));
                assert!(d.decode::<serde_json::Value>().unwrap().is_some());
                checked += 1;
            }
            _ => {}
        }
    }
    assert!(checked >= 12, "only {checked} examples found");
}

#[test]
fn doc_lists_every_error_code_and_the_bound() {
    let spec = spec();
    for c in [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::TooLarge,
        ErrorCode::Fenced,
        ErrorCode::StaleEpoch,
        ErrorCode::NotSealed,
        ErrorCode::Aborted,
        ErrorCode::CommitRefused,
        ErrorCode::Unsupported,
        ErrorCode::ReplayRefused,
        ErrorCode::Internal,
    ] {
        let name = serde_json::to_value(c).unwrap();
        let row = format!("| `{}` |", name.as_str().unwrap());
        assert!(
            spec.contains(&row),
            "error code {row} missing from the spec"
        );
    }
    // The spec states the bound literally; keep them in step.
    assert_eq!(MAX_FRAME_LEN, 4_194_304);
    assert!(spec.contains("MAX_FRAME_LEN = 4_194_304"));
}
