// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's control handler: answers SEAL/COMMIT/ABORT/ANNOUNCE/STATUS from the coordinator
//! by sending each queue-pair worker a [`NetMsg`] (run on the worker thread that owns the tap
//! queue and hold buffer) and combining the answers into one reply.
//!
//! Invariants: every fenced command passes the generation [`Fence`] first (an older generation
//! is refused and reaches no worker); epoch errors from the transaction queues become the
//! protocol's error codes, never panics. In net copy mode (`hold` copies frames out of the ring
//! and completes the descriptors at once) no descriptor of the guest is held, so SEAL records
//! carry the TX rings' next avail index and no held heads: after a failover the guest resumes
//! from a state in which it already "sent" uncommitted frames, i.e. they look like packet loss,
//! which the guest's transport protocols recover from.

use crate::device::{FtMode, GateOp, NetMsg, NetReply};
use crate::mac::MacAddr;
use crate::tx_hold::Released;
use ft_common::control::gate::{self, EpochMerge};
use ft_common::control::{
    CommitStats, ControlHandler, DeviceKind, DeviceStatus, ErrorCode, Reply, Request,
    TransactionState,
};
use ft_common::epoch::{Epoch, Fence};
use ft_common::vhost_user::WorkerHandle;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Default)]
struct GateState {
    fence: Fence,
    commits_ok: u64,
    last_commit: Option<CommitStats>,
    last_committed: Option<Epoch>,
}

pub struct NetControl {
    workers: Vec<WorkerHandle>,
    device: String,
    mac: MacAddr,
    mode: FtMode,
    state: Mutex<GateState>,
}

impl NetControl {
    pub fn new(workers: Vec<WorkerHandle>, device: String, mac: MacAddr, mode: FtMode) -> Self {
        NetControl {
            workers,
            device,
            mac,
            mode,
            state: Mutex::new(GateState::default()),
        }
    }

    /// Uses `fence` (e.g. a persistent one, [`Fence::from_state_dir`]) instead of a fresh
    /// in-memory fence.
    pub fn with_fence(self, fence: Fence) -> Self {
        if let Ok(mut st) = self.state.lock() {
            st.fence = fence;
        }
        self
    }

    /// Sends `op` to every worker; the first refusal or failure becomes the error reply.
    fn fan_out(&self, op: impl Fn() -> GateOp) -> Result<Vec<NetReply>, Reply> {
        let mut out = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            let r = w
                .call(Box::new(NetMsg::Gate(op())))
                .map_err(|e| Reply::error(ErrorCode::Internal, e.to_string()))?;
            match r.downcast::<NetReply>().map(|r| *r) {
                Ok(NetReply::Refused(e)) => return Err(gate::tx_error_reply(e)),
                Ok(NetReply::NotHolding) => {
                    return Err(Reply::error(
                        ErrorCode::Unsupported,
                        "output gating is off (--ft off)",
                    ))
                }
                Ok(r) => out.push(r),
                Err(_) => return Err(Reply::error(ErrorCode::Internal, "bad worker reply")),
            }
        }
        Ok(out)
    }

    fn seal(&self, epoch: Epoch) -> Reply {
        let replies = match self.fan_out(|| GateOp::Seal(epoch)) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let queues = replies
            .into_iter()
            .flat_map(|r| match r {
                NetReply::Sealed { rings, .. } => rings.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        Reply::Sealed {
            epoch,
            state: TransactionState {
                device: self.device.clone(),
                kind: DeviceKind::Net,
                queues,
            },
        }
    }

    fn sum(replies: Vec<NetReply>) -> Released {
        let mut t = Released::default();
        for r in replies {
            if let NetReply::Committed(r) | NetReply::Aborted(r) = r {
                t.frames += r.frames;
                t.bytes += r.bytes;
                t.errors += r.errors;
            }
        }
        t
    }

    fn commit(&self, epoch: Epoch, st: &mut GateState) -> Reply {
        // Tests stop or panic the daemon here: COMMIT admitted, no frame handed to a worker yet.
        ft_common::killpoint::reached("net-before-commit");
        let start = Instant::now();
        let replies = match self.fan_out(|| GateOp::Commit(epoch)) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let t = Self::sum(replies);
        if t.errors > 0 {
            log::warn!(
                "commit {epoch}: the tap refused {} of {} frames",
                t.errors,
                t.frames
            );
        }
        let us = start.elapsed().as_micros() as u64;
        let stats = CommitStats {
            requests: t.frames,
            bytes: t.bytes,
            submit_to_drain_us: us,
            fdatasync_us: 0,
            total_us: us,
            epochs: epoch.0 - st.last_committed.map_or(epoch.0.saturating_sub(1), |e| e.0),
        };
        st.commits_ok += 1;
        st.last_committed = Some(epoch);
        st.last_commit = Some(stats.clone());
        Reply::Committed { epoch, stats }
    }

    fn abort(&self, st: &GateState) -> Reply {
        match self.fan_out(|| GateOp::Abort) {
            Ok(r) => {
                let t = Self::sum(r);
                Reply::Aborted {
                    cancelled_requests: t.frames,
                    cancelled_bytes: t.bytes,
                    last_committed: st.last_committed,
                }
            }
            Err(e) => e,
        }
    }

    fn announce(&self) -> Reply {
        let Some(w) = self.workers.first() else {
            return Reply::error(ErrorCode::Internal, "no queue worker");
        };
        match w.call(Box::new(NetMsg::Announce(self.mac))) {
            Ok(r) => match r.downcast::<NetReply>().map(|r| *r) {
                Ok(NetReply::Announced(true)) => Reply::Announced { packets: 1 },
                _ => Reply::error(ErrorCode::Internal, "the tap refused the RARP frame"),
            },
            Err(e) => Reply::error(ErrorCode::Internal, e.to_string()),
        }
    }

    fn status(&self, st: &GateState) -> Reply {
        let mut s = DeviceStatus {
            device: self.device.clone(),
            kind: DeviceKind::Net,
            mode: match self.mode {
                FtMode::Off => "off".into(),
                FtMode::Hold => "hold".into(),
            },
            generation: st.fence.newest(),
            open_epoch: Epoch::FIRST,
            last_sealed: None,
            last_committed: st.last_committed,
            held_requests: 0,
            held_bytes: 0,
            epochs: Vec::new(),
            commits_ok: st.commits_ok,
            commits_failed: 0,
            fdatasyncs: 0,
            commit_refused: false,
            last_commit: st.last_commit.clone(),
        };
        if self.mode == FtMode::Hold {
            let replies = match self.fan_out(|| GateOp::Status) {
                Ok(r) => r,
                Err(e) => return e,
            };
            let now = Instant::now();
            let mut epochs = EpochMerge::default();
            for r in replies {
                let NetReply::Status {
                    counters: Some(c),
                    epochs: es,
                } = r
                else {
                    continue;
                };
                s.open_epoch = c.open_epoch;
                s.last_sealed = c.last_sealed;
                s.held_requests += c.held_requests as u64;
                s.held_bytes += c.held_bytes;
                epochs.add(es, now);
            }
            s.epochs = epochs.into_vec();
        }
        Reply::Status(Box::new(s))
    }
}

impl NetControl {
    fn handle_locked(&self, st: &mut GateState, req: Request) -> Reply {
        if let Err(refused) = gate::admit(&mut st.fence, &req) {
            return refused;
        }
        match req {
            Request::Seal { epoch, .. } => self.seal(epoch),
            Request::Commit { epoch, .. } => self.commit(epoch, st),
            Request::Abort { .. } => self.abort(st),
            Request::Announce { .. } => self.announce(),
            Request::Replay { .. } => Reply::error(
                ErrorCode::Unsupported,
                "REPLAY is for block devices: a net daemon has nothing to replay",
            ),
            Request::Status => self.status(st),
        }
    }
}

impl ControlHandler for NetControl {
    /// A panic is caught under the lock, so the lock is never poisoned: that command fails
    /// (`INTERNAL`), the held frames stay in their workers, and later commands work.
    fn handle(&self, req: Request) -> Reply {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *st;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle_locked(st, req)))
        {
            Ok(reply) => reply,
            Err(_) => {
                log::error!("net control handler panicked");
                Reply::error(ErrorCode::Internal, "control handler panicked")
            }
        }
    }
}
