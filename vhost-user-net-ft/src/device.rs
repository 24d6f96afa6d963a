// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-net device served by ft-common's vhost-user server: one [`NetWorker`] per queue
//! pair (RX queue 2i, TX queue 2i+1, tap queue i), each on its own worker thread.
//!
//! - RX: the tap fd is polled by the worker's epoll loop; readable -> [`RxPath`]. When the RX
//!   ring runs dry the tap is unwatched (level-triggered epoll would spin) until the guest kicks
//!   the RX queue with new buffers. RX is never held.
//! - TX, `--ft off`: frames go to the tap at once ([`TapSink`]).
//! - TX, `--ft hold`: frames are copied into the worker's [`TxHold`] under the open epoch and
//!   their descriptors completed at once. When the hold buffer is full the worker stops taking
//!   from the TX ring (backpressure) and raises OUTPUT_PENDING; a commit or abort frees room and
//!   resumes it. The hold buffer outlives frontend connections: frames acknowledged to the guest
//!   must still be committed or aborted.
//! - Control: SEAL/COMMIT/ABORT/ANNOUNCE/STATUS reach a worker as a [`NetMsg`] through
//!   `WorkerHandle::call`, so they run on the thread that owns the rings, tap and hold buffer
//!   (no locks on the data path).
//!
//! Invariant: in hold mode, a TX frame reaches the tap only from [`TxHold::commit`].

use crate::announce::rarp_frame;
use crate::config::{tap_offload_flags, NetConfig};
use crate::mac::MacAddr;
use crate::ring::Ring;
use crate::rx::RxPath;
use crate::stats::NetCounters;
use crate::tap::Tap;
use crate::tap_batch::TapBatch;
use crate::tx::{TapSink, TxPath};
use crate::tx_hold::{HoldSink, Released, TxHold};
use crate::vnet_hdr::{hdr_len_for, VNET_HDR_LEN};
use ft_common::control::{Notifier, QueueState};
use ft_common::epoch::Epoch;
use ft_common::txqueue::{EpochStats, SealSummary, TxCounters, TxError};
use ft_common::vhost_user::{
    DeviceError, GuestMem, QueueWorker, StopStatus, VhostUserDevice, VringHandle, WorkerCtx,
    WorkerHandle,
};
use log::{error, warn};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::DescriptorChain;

const TOKEN_TAP: u64 = 1;

impl Ring for VringHandle {
    type M = Arc<GuestMem>;

    fn pop(&mut self) -> Option<DescriptorChain<Arc<GuestMem>>> {
        VringHandle::pop(self)
    }
    fn unpop(&mut self, head: u16) {
        VringHandle::unpop(self, head)
    }
    fn can_unpop_all(&self) -> bool {
        // With an inflight region, popped heads may be resubmissions, not avail entries.
        !self.inflight_tracked()
    }
    fn add_used(&mut self, head: u16, len: u32) -> bool {
        VringHandle::add_used(self, head, len).is_ok()
    }
    fn enable_notification(&mut self) -> bool {
        VringHandle::enable_notification(self)
    }
    fn disable_notification(&mut self) {
        VringHandle::disable_notification(self)
    }
    fn mem(&self) -> &GuestMem {
        self.memory()
    }
}

/// Gating mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FtMode {
    Off,
    Hold,
}

/// Hold buffer bounds, per queue pair.
#[derive(Clone, Copy, Debug)]
pub struct HoldLimits {
    pub bytes: usize,
    pub packets: usize,
}

/// A request from the control thread to one worker.
#[derive(Debug)]
pub enum NetMsg {
    /// An output-commit operation (needs `--ft hold`).
    Gate(GateOp),
    /// Send a gratuitous RARP for this MAC on the worker's tap queue.
    Announce(MacAddr),
}

#[derive(Clone, Copy, Debug)]
pub enum GateOp {
    Seal(Epoch),
    Commit(Epoch),
    Abort,
    Status,
}

/// A worker's answer.
#[derive(Debug)]
pub enum NetReply {
    Sealed {
        summary: SealSummary,
        /// This pair's RX and TX rings for the SEALED record.
        rings: [QueueState; 2],
    },
    Committed(Released),
    /// What the abort dropped, and the queue's counters after it.
    Aborted(Released, TxCounters),
    Announced(bool),
    Status {
        counters: TxCounters,
        epochs: Vec<EpochStats>,
    },
    Refused(TxError),
    /// The operation needs `--ft hold`.
    NotHolding,
}

pub struct NetDevice {
    config: NetConfig,
    features: u64,
    queue_size: u16,
    mode: FtMode,
    limits: HoldLimits,
    taps: Mutex<Vec<Option<Tap>>>,
    counters: Arc<NetCounters>,
    notifier: Notifier,
    workers: OnceLock<Vec<WorkerHandle<NetWorker>>>,
}

impl NetDevice {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        taps: Vec<Tap>,
        mac: MacAddr,
        features: u64,
        queue_size: u16,
        mode: FtMode,
        limits: HoldLimits,
        counters: Arc<NetCounters>,
        notifier: Notifier,
    ) -> NetDevice {
        let pairs = taps.len() as u16;
        NetDevice {
            config: NetConfig::new(mac, pairs),
            features,
            queue_size,
            mode,
            limits,
            taps: Mutex::new(taps.into_iter().map(Some).collect()),
            counters,
            notifier,
            workers: OnceLock::new(),
        }
    }

    /// Gives the device its workers' handles (after the server is built), for SEND_RARP.
    pub fn set_workers(&self, w: Vec<WorkerHandle<NetWorker>>) {
        let _ = self.workers.set(w);
    }

    pub fn mac(&self) -> MacAddr {
        self.config.mac
    }

    pub fn mode(&self) -> FtMode {
        self.mode
    }

    pub fn counters(&self) -> &Arc<NetCounters> {
        &self.counters
    }
}

impl VhostUserDevice for NetDevice {
    type Worker = NetWorker;

    fn num_queues(&self) -> usize {
        2 * self.config.max_virtqueue_pairs as usize
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::RARP
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        let all = self.config.to_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (offset as usize)
                .checked_add(i)
                .and_then(|o| all.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn queue_groups(&self) -> Vec<Vec<u16>> {
        (0..self.config.max_virtqueue_pairs)
            .map(|p| vec![2 * p, 2 * p + 1])
            .collect()
    }

    fn create_worker(&self, group: usize, queues: &[u16]) -> std::io::Result<NetWorker> {
        let tap = self
            .taps
            .lock()
            .map_err(|_| std::io::Error::other("tap list poisoned"))?
            .get_mut(group)
            .and_then(Option::take)
            .ok_or_else(|| std::io::Error::other(format!("no tap queue for pair {group}")))?;
        let (&rx_q, &tx_q) = match queues {
            [rx, tx] => (rx, tx),
            _ => return Err(std::io::Error::other("a net queue group is an RX/TX pair")),
        };
        Ok(NetWorker {
            rx_q,
            tx_q,
            tap,
            rx: RxPath::new(),
            tx: TxPath::new(),
            hold: (self.mode == FtMode::Hold)
                .then(|| TxHold::new(self.limits.bytes, self.limits.packets)),
            batch: if self.mode == FtMode::Hold {
                TapBatch::new()
            } else {
                TapBatch::without_io_uring()
            },
            counters: self.counters.clone(),
            notifier: self.notifier.clone(),
            tap_watched: true,
            features: None,
            hdr_len: VNET_HDR_LEN,
            tx_blocked: false,
        })
    }

    fn send_rarp(&self, mac: [u8; 6]) -> Result<(), DeviceError> {
        let w = self
            .workers
            .get()
            .and_then(|w| w.first())
            .ok_or(DeviceError::Unsupported)?;
        match w.call(NetMsg::Announce(MacAddr(mac))) {
            Ok(NetReply::Announced(true)) => Ok(()),
            Ok(_) => Err(DeviceError::Io(std::io::Error::other("RARP not sent"))),
            Err(e) => Err(DeviceError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

/// One queue pair: its tap queue, copy paths and hold buffer.
pub struct NetWorker {
    rx_q: u16,
    tx_q: u16,
    tap: Tap,
    rx: RxPath,
    tx: TxPath,
    hold: Option<TxHold>,
    /// Batched tap writes for commits.
    batch: TapBatch,
    counters: Arc<NetCounters>,
    notifier: Notifier,
    tap_watched: bool,
    features: Option<u64>,
    hdr_len: usize,
    tx_blocked: bool,
}

impl NetWorker {
    fn apply_features(&mut self, ctx: &mut WorkerCtx, acked: u64) {
        if self.features == Some(acked) {
            return;
        }
        self.features = Some(acked);
        self.hdr_len = hdr_len_for(acked);
        // A parked frame was read with the old header layout: drop it, and give back the
        // chains taken for it if its ring runs (they would leak otherwise).
        match ctx.queue(self.rx_q) {
            Some(ring) => self.rx.abandon(ring, &self.counters),
            None => self.rx.reset(&self.counters),
        }
        self.rx
            .set_features(self.hdr_len, acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0);
        self.tx.set_features(self.hdr_len, acked);
        if let Err(e) = self.tap.set_vnet_hdr_size(self.hdr_len) {
            error!(
                "tap {}: TUNSETVNETHDRSZ {}: {e}",
                self.tap.name(),
                self.hdr_len
            );
        }
        if let Err(e) = self.tap.set_offload(tap_offload_flags(acked)) {
            error!("tap {}: TUNSETOFFLOAD: {e}", self.tap.name());
        }
    }

    fn watch_tap(&mut self, ctx: &WorkerCtx, on: bool) {
        if on == self.tap_watched {
            return;
        }
        let fd = self.tap.as_raw_fd();
        let r = if on {
            ctx.watch_fd(fd, TOKEN_TAP, libc::EPOLLIN as u32)
        } else {
            ctx.unwatch_fd(fd)
        };
        match r {
            Ok(()) => self.tap_watched = on,
            Err(e) => error!("tap {}: epoll: {e}", self.tap.name()),
        }
    }

    fn run_rx(&mut self, ctx: &mut WorkerCtx) {
        let Some(ring) = ctx.queue(self.rx_q) else {
            // No RX ring: stop polling the tap (frames wait in the tap queue) until it starts.
            self.watch_tap(ctx, false);
            return;
        };
        let res = self.rx.process(&mut &self.tap, ring, &self.counters);
        ring.signal_used();
        match res {
            Ok(pass) => self.watch_tap(ctx, !pass.blocked),
            Err(e) => {
                // A broken tap (e.g. the interface was deleted) stays readable for epoll: stop
                // polling it instead of spinning; the next RX kick tries again.
                warn!(
                    "tap {}: read: {e}; RX paused until the next kick",
                    self.tap.name()
                );
                self.watch_tap(ctx, false);
            }
        }
    }

    fn run_tx(&mut self, ctx: &mut WorkerCtx) {
        let Some(ring) = ctx.queue(self.tx_q) else {
            return;
        };
        let pass = match self.hold.as_mut() {
            None => self
                .tx
                .process(ring, &mut TapSink(&self.tap), &self.counters),
            Some(hold) => {
                // One handle per pass (not per frame): frames are held only from intact memory.
                let mem = Arc::clone(ring.memory());
                let mut sink = HoldSink {
                    hold,
                    mem: Some(&mem),
                };
                self.tx.process(ring, &mut sink, &self.counters)
            }
        };
        ring.signal_used();
        if let Some(hold) = self.hold.as_mut() {
            if let Some(e) = hold.take_output_pending() {
                self.notifier.output_pending(e);
            }
            if pass.blocked {
                if !self.tx_blocked {
                    self.counters
                        .backpressure_stalls
                        .fetch_add(1, Ordering::Relaxed);
                }
                // Full: the coordinator should checkpoint now to free room.
                self.notifier.output_pending(hold.open_epoch());
            }
        }
        self.tx_blocked = pass.blocked;
    }

    fn write_to_tap(tap: &Tap, frame: &[u8]) -> std::io::Result<()> {
        let n = tap.write(frame)?;
        if n != frame.len() {
            return Err(std::io::Error::other("short tap write"));
        }
        Ok(())
    }

    fn handle(&mut self, ctx: &mut WorkerCtx, msg: NetMsg) -> NetReply {
        match msg {
            NetMsg::Announce(mac) => {
                let f = rarp_frame(mac, self.hdr_len);
                NetReply::Announced(Self::write_to_tap(&self.tap, &f).is_ok())
            }
            NetMsg::Gate(op) => self.gate(ctx, op),
        }
    }

    fn gate(&mut self, ctx: &mut WorkerCtx, op: GateOp) -> NetReply {
        let Some(hold) = self.hold.as_mut() else {
            return NetReply::NotHolding;
        };
        let reply = match op {
            GateOp::Seal(e) => match hold.seal(e) {
                Ok(summary) => NetReply::Sealed {
                    summary,
                    rings: [
                        ring_record(ctx, self.rx_q, self.rx.taken_heads()),
                        // TX never keeps a chain: each is completed or put back in its pass.
                        ring_record(ctx, self.tx_q, Vec::new()),
                    ],
                },
                Err(e) => NetReply::Refused(e),
            },
            GateOp::Commit(e) => {
                let (tap, batch) = (&self.tap, &mut self.batch);
                // SAFETY: the iovecs point into the hold arena, untouched until commit returns.
                match hold.commit(e, |iovs| unsafe { batch.write_all(tap, iovs) }.errors) {
                    Ok(r) => {
                        self.counters
                            .committed_frames
                            .fetch_add(r.frames, Ordering::Relaxed);
                        NetReply::Committed(r)
                    }
                    Err(e) => NetReply::Refused(e),
                }
            }
            GateOp::Abort => {
                let r = hold.abort();
                self.counters
                    .aborted_frames
                    .fetch_add(r.frames, Ordering::Relaxed);
                NetReply::Aborted(r, hold.queue().counters())
            }
            GateOp::Status => NetReply::Status {
                counters: hold.queue().counters(),
                epochs: hold.queue().epochs().collect(),
            },
        };
        // Room may have been freed: resume a TX ring stopped by backpressure.
        if self.tx_blocked {
            self.run_tx(ctx);
        }
        reply
    }
}

/// One ring of the SEALED record: where it stands (as of its stop while stopped, which is when
/// a checkpoint is taken; a stopped ring's `next_avail` is what GET_VRING_BASE returned) and
/// the heads taken off it and not used yet.
fn ring_record(ctx: &WorkerCtx, queue: u16, outstanding: Vec<u16>) -> QueueState {
    let pos = ctx.ring_position(queue);
    QueueState {
        queue,
        next_avail: pos.map_or(0, |p| p.next_avail),
        used_idx: pos.map(|p| p.used_idx),
        outstanding,
        ..Default::default()
    }
}

impl QueueWorker for NetWorker {
    type Msg = NetMsg;
    type Reply = NetReply;

    fn fds(&self) -> Vec<(std::os::fd::RawFd, u64)> {
        vec![(self.tap.as_raw_fd(), TOKEN_TAP)]
    }

    fn queue_started(&mut self, ctx: &mut WorkerCtx, queue: u16) {
        let acked = ctx.acked_features();
        self.apply_features(ctx, acked);
        self.handle_kick(ctx, queue);
    }

    fn handle_kick(&mut self, ctx: &mut WorkerCtx, queue: u16) {
        if queue == self.rx_q {
            // New RX buffers: deliver a parked frame and resume polling the tap.
            self.run_rx(ctx);
        } else if queue == self.tx_q {
            self.run_tx(ctx);
        }
    }

    fn handle_fd(&mut self, ctx: &mut WorkerCtx, token: u64, _events: u32) {
        if token == TOKEN_TAP {
            self.run_rx(ctx);
        }
    }

    fn stop_queue(&mut self, ctx: &mut WorkerCtx, queue: u16) -> StopStatus {
        if queue == self.rx_q {
            // A ring stop is usually a VM pause (every checkpoint): chains taken for a parked
            // frame go back on the avail ring and the frame waits for the ring to run again.
            if let Some(ring) = ctx.queue(self.rx_q) {
                self.rx.shelve(ring, &self.counters);
                ring.signal_used();
            } else {
                self.rx.reset(&self.counters);
            }
            self.watch_tap(ctx, false);
        } else if queue == self.tx_q {
            // TX never keeps a chain: each is completed or put back before a pass returns.
            self.tx_blocked = false;
        }
        StopStatus::Done
    }

    fn reset(&mut self, ctx: &mut WorkerCtx) {
        self.rx.reset(&self.counters);
        self.tx_blocked = false;
        self.features = None;
        self.watch_tap(ctx, false);
    }

    fn handle_message(&mut self, ctx: &mut WorkerCtx, msg: NetMsg) -> NetReply {
        self.handle(ctx, msg)
    }
}
