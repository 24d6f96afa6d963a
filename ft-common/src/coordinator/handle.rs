// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Operator requests to a running coordinator: [`Op`] (what `ftctl`, the API socket, the
//! metrics endpoint and tests can ask) and [`CoordinatorHandle`] (sends them to the runtime's
//! thread from any thread, through the thread's `Mailbox`, which the checkpointer's reports
//! also use). Its own module so that the front ends (`api`, `metrics`, `ftctl`)
//! depend on it and the runtime depends on them, without a cycle.
//!
//! Invariant: an answer arrives or the call fails within a bound (`OP_TIMEOUT` per daemon call,
//! four times that for the runtime's answer); a stopped coordinator is an error, never a hang.

use super::cycle::{DeviceId, Input};
use super::device_link::{Answer, LinkRequester};
use crate::control::message::Request;
use serde_json::Value;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Operator requests (from `ftctl`, the metrics endpoint, or a test). The doc comments are
/// `ftctl`'s help text; [`Op::name`] is the API's wire name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum Op {
    /// Epochs sealed/committed, held output per device, latencies, checkpointer state.
    Status,
    /// Stop cutting epochs (acknowledged epochs still commit).
    Pause,
    /// Cut epochs again (also clears a halt after a device failure once all are connected).
    Resume,
    /// Cut an epoch now.
    Checkpoint,
    /// Depose this primary: ABORT to every device under a new, persisted generation (and, with
    /// --etcd, revoke the lease so the standby can take over at once).
    Abort,
    /// Gratuitous RARP from the net devices (after failover).
    Announce,
    /// The Prometheus text the metrics endpoint serves.
    // Over the API it is one JSON string.
    Metrics,
}

impl Op {
    /// Every request.
    pub const ALL: [Op; 7] = [
        Op::Status,
        Op::Pause,
        Op::Resume,
        Op::Checkpoint,
        Op::Abort,
        Op::Announce,
        Op::Metrics,
    ];

    /// The name on the API socket (`{"cmd":"status"}`) and on `ftctl`'s command line.
    pub fn name(self) -> &'static str {
        match self {
            Op::Status => "status",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Checkpoint => "checkpoint",
            Op::Abort => "abort",
            Op::Announce => "announce",
            Op::Metrics => "metrics",
        }
    }
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Op::ALL
            .into_iter()
            .find(|op| op.name() == s)
            .ok_or_else(|| format!("unknown command {s:?}"))
    }
}

pub(crate) type OpAnswer = mpsc::Sender<Result<Value, String>>;

/// What the runtime's thread receives.
pub(crate) enum Msg {
    Input(Input),
    Op(Op, OpAnswer),
    /// An operator request for one daemon (see [`LinkRequester`]).
    Call(DeviceId, Request, Answer),
    Shutdown,
}

/// The runtime thread's mailbox: a channel plus the eventfd its `poll` waits on (the thread
/// also polls the device links' sockets, so it cannot block on the channel alone).
#[derive(Clone, Debug)]
pub(crate) struct Mailbox {
    tx: mpsc::Sender<Msg>,
    wake: Arc<EventFd>,
}

impl Mailbox {
    pub(crate) fn new() -> std::io::Result<(Mailbox, mpsc::Receiver<Msg>, Arc<EventFd>)> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let m = Mailbox {
            tx,
            wake: wake.clone(),
        };
        Ok((m, rx, wake))
    }

    /// Delivers `msg` and wakes the runtime; false once the runtime is gone.
    pub(crate) fn send(&self, msg: Msg) -> bool {
        let ok = self.tx.send(msg).is_ok();
        // Written after the message is queued, so the woken thread finds it.
        let _ = self.wake.write(1);
        ok
    }
}

/// Bound on operator calls to a daemon (ABORT, ANNOUNCE, STATUS).
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends operator requests to a running coordinator from any thread.
pub struct CoordinatorHandle {
    mailbox: Mailbox,
    requesters: Vec<LinkRequester>,
}

impl CoordinatorHandle {
    pub(crate) fn new(mailbox: Mailbox, requesters: Vec<LinkRequester>) -> Self {
        CoordinatorHandle {
            mailbox,
            requesters,
        }
    }

    pub fn op(&self, op: Op) -> Result<Value, String> {
        if op == Op::Status || op == Op::Metrics {
            // Fresh per-device held-output numbers; a dead device keeps its last snapshot.
            for r in &self.requesters {
                if r.shared()
                    .connected
                    .load(std::sync::atomic::Ordering::Acquire)
                {
                    let _ = r.call(Request::Status, OP_TIMEOUT);
                }
            }
        }
        let (atx, arx) = mpsc::channel();
        if !self.mailbox.send(Msg::Op(op, atx)) {
            return Err("coordinator stopped".to_string());
        }
        arx.recv_timeout(OP_TIMEOUT * 4)
            .map_err(|_| "coordinator did not answer".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_parses_from_its_name() {
        for op in Op::ALL {
            assert_eq!(op.name().parse::<Op>(), Ok(op));
        }
        assert!("stat".parse::<Op>().is_err());
    }
}
