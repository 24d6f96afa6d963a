// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Entry points for fuzzing the control plane (a coverage-guided fuzzer's target, and the
//! tests that replay inputs): whole-input functions that must never panic or hang.
//!
//! - [`codec`]: the input as a byte stream, fed to the incremental decoder in chunks of a size
//!   the input picks, decoded as requests and as daemon messages, and read with the blocking
//!   reader. Checks: bounded buffering, a fatal error stays fatal, every decoded message
//!   re-encodes within the frame bound and decodes back to itself, and the range check never
//!   panics.
//! - [`server`]: the input written to a real [`ControlServer`] (one per process, living across
//!   inputs as it lives across coordinators) whose handler is the daemons' own gate (fence,
//!   epochs of a transaction queue). Checks: every byte the daemon answers is a whole, valid
//!   frame, the daemon keeps serving, and no input moves the fence or the open epoch beyond
//!   [`MAX_REQUEST_NUMBER`].

use super::codec::{encode, read_message, FrameDecoder, HEADER_LEN, MAX_FRAME_LEN};
use super::message::{DaemonMessage, DeviceKind, QueueState, Reply, Request, MAX_REQUEST_NUMBER};
use super::server::{ControlServer, ControlServerHandle};
use super::ControlClient;
use crate::epoch::Epoch;
use crate::fence::Fence;
use crate::gate::{
    AbortDone, CommitDone, Gate, GateDevice, GateError, HeldView, Identity, OnCommitError,
    QueueMerge,
};
use crate::txqueue::{Limits, TxQueue};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Decodes `data` incrementally (chunk size from its first byte, a small and the real frame
/// bound) and with the blocking reader; panics on a broken invariant.
pub fn codec(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    for max in [64, MAX_FRAME_LEN] {
        decode_all::<Request>(rest, chunk, max);
        decode_all::<DaemonMessage>(rest, chunk, max);
    }
    let mut r = rest;
    while let Ok(Some(req)) = read_message::<_, Request>(&mut r, MAX_FRAME_LEN) {
        let _ = req.check_range();
    }
}

fn decode_all<T>(data: &[u8], chunk: usize, max: usize)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut d = FrameDecoder::with_max_frame(max);
    let mut fatal = false;
    for c in data.chunks(chunk) {
        d.feed(c);
        loop {
            match d.decode::<T>() {
                Ok(None) => break,
                Ok(Some(m)) => {
                    assert!(!fatal, "a message after a fatal error");
                    let f = encode(&m).expect("a decoded message re-encodes");
                    assert!(f.len() <= HEADER_LEN + MAX_FRAME_LEN);
                    let mut back = FrameDecoder::new();
                    back.feed(&f);
                    assert_eq!(back.decode::<T>().expect("round trip"), Some(m));
                }
                Err(e) => {
                    if e.is_fatal() {
                        fatal = true;
                        // Every later call fails too: nothing after lost sync is trusted.
                        assert!(d.decode::<T>().is_err());
                        break;
                    }
                    assert!(!fatal, "a non-fatal error after a fatal one");
                }
            }
            assert!(d.buffered() <= HEADER_LEN + max + chunk);
        }
        if fatal {
            break;
        }
    }
    let _ = d.finish();
}

/// The device behind the fuzzed server's gate (the daemons' own [`crate::gate::Gate`]): one
/// transaction queue's epochs, nothing held.
struct FuzzDevice {
    txq: TxQueue<()>,
}

impl GateDevice for FuzzDevice {
    fn identity(&self) -> Identity {
        Identity {
            device: "fuzz".into(),
            kind: DeviceKind::Blk,
            mode: "hold".into(),
        }
    }
    fn seal(&mut self, epoch: Epoch) -> Result<Vec<QueueState>, GateError> {
        self.txq.seal(epoch)?;
        Ok(Vec::new())
    }
    fn commit(&mut self, epoch: Epoch) -> Result<CommitDone, GateError> {
        let previous = self.txq.last_committed();
        self.txq.take_committable(epoch)?;
        Ok(CommitDone {
            previous,
            ..Default::default()
        })
    }
    fn abort(&mut self) -> Result<AbortDone, GateError> {
        // Nothing is held here: the cancelled payloads are ().
        drop(self.txq.abort());
        Ok(AbortDone {
            last_committed: self.txq.last_committed(),
            ..Default::default()
        })
    }
    fn status(&mut self) -> Result<HeldView, GateError> {
        let mut m = QueueMerge::default();
        m.add(&self.txq.counters(), self.txq.epochs(), Instant::now());
        Ok(m.into_view())
    }
}

fn fuzz_server() -> &'static PathBuf {
    static SERVER: OnceLock<(ControlServerHandle, PathBuf)> = OnceLock::new();
    let (_, path) = SERVER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("ft-fuzz-ctl-{}.sock", std::process::id()));
        let server = ControlServer::bind(&path).expect("bind the fuzz control socket");
        // A static is never dropped: remove the socket file at exit instead.
        extern "C" fn unlink_socket() {
            let p = std::env::temp_dir().join(format!("ft-fuzz-ctl-{}.sock", std::process::id()));
            let _ = std::fs::remove_file(p);
        }
        // SAFETY: registers a plain extern "C" function without arguments.
        unsafe { libc::atexit(unlink_socket) };
        let gate = Gate::new(
            FuzzDevice {
                txq: TxQueue::new(Limits {
                    max_requests: 16,
                    max_bytes: 1 << 20,
                }),
            },
            Fence::default(),
            OnCommitError::Stop,
        );
        let handle = server.spawn(gate).expect("spawn the fuzz control server");
        (handle, path)
    });
    path
}

/// Writes `data` to the fuzz server over a fresh connection and checks what comes back.
pub fn server(data: &[u8]) {
    let path = fuzz_server();
    let mut s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The daemon may hang up first (lost frame sync); then the rest is not sent.
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .expect("the daemon closes a connection whose peer finished sending");
    let mut d = FrameDecoder::new();
    d.feed(&answer);
    while d
        .decode::<DaemonMessage>()
        .expect("the daemon sent a malformed frame")
        .is_some()
    {}
    d.finish().expect("the daemon cut a frame short");
    // The daemon still serves: STATUS over a connection kept across inputs (a connect per
    // input doubled the cost of an execution); a fresh one if the daemon dropped it (evicted,
    // which a coordinator could also see).
    static STATUS: Mutex<Option<ControlClient>> = Mutex::new(None);
    let mut kept = STATUS.lock().unwrap_or_else(|e| e.into_inner());
    let reply = match kept.as_mut().map(|c| c.call(&Request::Status)) {
        Some(Ok(r)) => r,
        _ => {
            let mut c =
                ControlClient::connect(path, Duration::from_secs(10)).expect("still serving");
            let r = c.call(&Request::Status).expect("STATUS answered");
            *kept = Some(c);
            r
        }
    };
    match reply {
        Reply::Status(st) => {
            assert!(st.generation.0 <= MAX_REQUEST_NUMBER);
            assert!(st.open_epoch <= Epoch(MAX_REQUEST_NUMBER + 1));
        }
        r => panic!("STATUS answered {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::codec::encode_into;
    use crate::epoch::Generation;
    use proptest::prelude::*;

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let frame = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..48),
            (0u8..4, any::<u64>(), any::<u64>()).prop_map(|(k, g, e)| {
                let (generation, epoch) = (Generation(g % (1 << 54)), Epoch(e % (1 << 54)));
                let req = match k {
                    0 => Request::Seal { generation, epoch },
                    1 => Request::Commit {
                        generation,
                        epoch,
                        deadline: None,
                    },
                    2 => Request::Abort { generation },
                    _ => Request::Status,
                };
                let mut f = Vec::new();
                encode_into(&req, &mut f, MAX_FRAME_LEN).unwrap();
                f
            }),
        ];
        prop::collection::vec(frame, 0..8).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn codec_entry_point(data in stream(), first in any::<u8>()) {
            let mut input = vec![first];
            input.extend(data);
            codec(&input);
        }

        #[test]
        fn server_entry_point(data in stream()) {
            server(&data);
        }
    }
}
