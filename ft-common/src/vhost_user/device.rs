// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device trait: what a vhost-user device (block, net, the test device) implements so the
//! server in this module can serve it.
//!
//! Split of responsibilities:
//! - The server owns the protocol (features, memory table, vring setup, inflight region, dirty
//!   log, reconnect) and one worker thread per queue group.
//! - A [`VhostUserDevice`] describes the device (features, config space, queues) and creates one
//!   [`QueueWorker`] per queue group. The device object lives as long as the server, across
//!   frontend connections; workers live as long as their thread (also across connections).
//! - A [`QueueWorker`] runs on its group's worker thread and is the only code that touches that
//!   group's rings. It pops descriptor chains, completes them and signals the guest through the
//!   [`WorkerCtx`] and [`VringHandle`] it is given on every call.
//!
//! Threading contract: the worker thread never blocks on the connection thread; the connection
//! thread waits for the worker only through the worker's command channel, holding no lock the
//! worker needs. Other threads (a control thread doing SEAL/COMMIT) talk to a worker with
//! [`WorkerHandle::call`](super::worker::WorkerHandle::call), which runs
//! [`QueueWorker::handle_message`] on the worker thread and waits for its reply. Messages are
//! typed: each worker names its [`QueueWorker::Msg`] and [`QueueWorker::Reply`], and the
//! handles the server gives out are typed by the device's worker, so a message of the wrong
//! type does not compile.
//!
//! Stopping: GET_VRING_BASE, RESET_DEVICE/RESET_OWNER, frontend disconnect and server shutdown
//! call [`QueueWorker::stop_queue`]. It may cancel or drain asynchronously and return
//! [`StopStatus::Pending`]; the worker keeps polling its fds (delivering `handle_fd` events) and
//! calls `stop_queue` again after each wakeup until it returns [`StopStatus::Done`]. Only then is
//! the ring's `last_avail_idx` reported to the frontend. A request that was popped and not
//! completed when `Done` is returned stays marked in flight in the INFLIGHT_SHMFD region, so a
//! later connection (or a restarted daemon) resubmits it: cancel-and-resubmit is correct,
//! complete-twice is not.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_queue::DescriptorChain;

use super::memory::GuestMem;
pub use super::vring::VringHandle;
pub use super::worker::{WorkerCtx, WorkerHandle};

/// A descriptor chain over the connection's guest memory, as handed to workers.
pub type Chain = DescriptorChain<Arc<GuestMem>>;

/// Errors a device reports to the server; the server turns them into protocol error replies.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The request is not supported by this device (e.g. SEND_RARP on a block device).
    #[error("operation not supported by the device")]
    Unsupported,
    /// The request carried invalid parameters.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An I/O error inside the device.
    #[error("device I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of [`QueueWorker::stop_queue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopStatus {
    /// The queue is quiescent: no request of it is in the device's hands any more (each popped
    /// request was either completed with `add_used` or abandoned and is still marked in flight).
    Done,
    /// Cancels or completions are outstanding; call again after the next event.
    Pending,
}

/// A vhost-user device served by [`VhostUserServer`](super::server::VhostUserServer).
///
/// All methods are called from the connection thread (or at server construction) and must not
/// block for long. Getters must not fail: the protocol gives them no way to report an error.
pub trait VhostUserDevice: Send + Sync + 'static {
    /// The worker of one queue group (see [`create_worker`](Self::create_worker)).
    type Worker: QueueWorker;

    /// Number of virtqueues (the maximum; the frontend may use fewer).
    fn num_queues(&self) -> usize;

    /// Largest queue size the device accepts.
    fn max_queue_size(&self) -> u16;

    /// Device virtio feature bits (VERSION_1, device-specific bits, RING_EVENT_IDX and
    /// RING_INDIRECT_DESC if the device wants them). The server adds PROTOCOL_FEATURES and
    /// LOG_ALL itself.
    fn features(&self) -> u64;

    /// Device-specific protocol features on top of the ones the server implements (MQ,
    /// REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS, INFLIGHT_SHMFD, LOG_SHMFD, RESET_DEVICE):
    /// e.g. RARP for a net device. Default: none.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }

    /// Whether the device has a config space served over vhost-user (protocol feature
    /// CONFIG). Default true. A net device may return false: QEMU's vhost-user-net warns
    /// when the backend offers CONFIG.
    fn has_config(&self) -> bool {
        true
    }

    /// Fill `buf` with config space bytes starting at `offset`. Bytes beyond the config space
    /// are left zero. Must not fail.
    fn read_config(&self, offset: u32, buf: &mut [u8]);

    /// Guest write to config space (e.g. virtio-blk `wce`). Default: read-only config.
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        let _ = (offset, data);
        Err(DeviceError::Unsupported)
    }

    /// Partition of the queues into groups; each group gets one worker thread. Default: one
    /// group per queue. A net device returns `[[0, 1], [2, 3], ...]` (RX/TX pairs).
    fn queue_groups(&self) -> Vec<Vec<u16>> {
        (0..self.num_queues() as u16).map(|q| vec![q]).collect()
    }

    /// The frontend acknowledged these features (SET_FEATURES). Called on every SET_FEATURES;
    /// workers also see them in [`WorkerCtx::acked_features`].
    fn set_acked_features(&self, features: u64) {
        let _ = features;
    }

    /// Create the worker for queue group `group` (its queues are `queues`). Called once per
    /// group when the server is built.
    fn create_worker(&self, group: usize, queues: &[u16]) -> std::io::Result<Self::Worker>;

    /// SEND_RARP (protocol feature RARP): announce `mac` after a migration or failover.
    fn send_rarp(&self, mac: [u8; 6]) -> Result<(), DeviceError> {
        let _ = mac;
        Err(DeviceError::Unsupported)
    }
}

/// Per-queue-group request processing, run on the group's worker thread.
///
/// `ctx` gives access to the group's rings that are currently running (started and enabled)
/// and to the connection's memory and dirty log. Between connections `ctx` has no rings.
pub trait QueueWorker: Send + 'static {
    /// What other threads send this worker through
    /// [`WorkerHandle::call`](super::worker::WorkerHandle::call)
    /// ([`std::convert::Infallible`] for a worker that takes none).
    type Msg: Send + 'static;
    /// The answer to a [`Msg`](Self::Msg).
    type Reply: Send + 'static;

    /// Extra file descriptors to poll (io_uring eventfd, tap fd, ...), each with a token the
    /// worker chooses; readiness is reported to [`handle_fd`](Self::handle_fd). Polled
    /// level-triggered for input: drain the fd in `handle_fd`. Queried once when the worker
    /// thread starts; use [`WorkerCtx::watch_fd`] to change the set later.
    fn fds(&self) -> Vec<(RawFd, u64)> {
        Vec::new()
    }

    /// Ring `queue` became runnable (kick fd, addresses, memory set and ring enabled), after a
    /// connection start or a restart. The default treats it as a kick, so requests already on
    /// the ring (and inflight requests to resubmit) are processed.
    fn queue_started(&mut self, ctx: &mut WorkerCtx, queue: u16) {
        self.handle_kick(ctx, queue);
    }

    /// The guest kicked `queue` (the kick eventfd was already drained by the server).
    fn handle_kick(&mut self, ctx: &mut WorkerCtx, queue: u16);

    /// An fd from [`fds`](Self::fds) / [`WorkerCtx::watch_fd`] is ready.
    fn handle_fd(&mut self, ctx: &mut WorkerCtx, token: u64, events: u32) {
        let _ = (ctx, token, events);
    }

    /// Stop processing `queue`: cancel or drain what the device holds for it. Return `Pending`
    /// while completions or cancels are outstanding; the server calls again after the next
    /// event (and at least every few milliseconds). While stopping, the queue is still
    /// reachable through `ctx` (to `add_used` drained requests) but kicks are no longer
    /// delivered. Requests may be abandoned (not completed) only if
    /// [`VringHandle::inflight_tracked`] is true; the device must then forget them entirely,
    /// as they will be resubmitted by `pop` on the next start.
    fn stop_queue(&mut self, ctx: &mut WorkerCtx, queue: u16) -> StopStatus;

    /// The connection ended or the device was reset; every queue of the group has been stopped
    /// already. Drop per-connection state.
    fn reset(&mut self, ctx: &mut WorkerCtx) {
        let _ = ctx;
    }

    /// Adaptive polling (see `vhost_user::poll`): the longest the worker thread may spin on
    /// [`poll`](Self::poll) after a batch before it sleeps in `epoll_wait`. Zero (the default)
    /// disables polling: the worker then only reacts to kicks and fd events.
    fn poll_max(&self) -> Duration {
        Duration::ZERO
    }

    /// Whether polling pauses while the host has no idle CPU (the worker thread keeps
    /// waiting for a CPU: spinning would take it from the frontend; see `vhost_user::poll`).
    /// On by default; off polls whatever the load (CPUs reserved for the device, tests).
    fn poll_cpu_guard(&self) -> bool {
        true
    }

    /// Look for work without blocking (new avail entries on a ring, completions of the
    /// device's own I/O) and do it as a kick or fd event would; return true if anything was
    /// done. Called in a loop while the worker polls. Return false for work that cannot be
    /// taken now (e.g. a ring stalled on backpressure), or the worker never sleeps.
    ///
    /// While the worker polls, [`WorkerCtx::polling`] is true and it has disabled the
    /// notifications of every running ring: leave them disabled (skip the usual
    /// `enable_notification` recheck at the end of a batch). Before sleeping the worker
    /// re-enables them and calls `poll` once more, with `polling()` false; while a ring of the
    /// group is being stopped it calls [`handle_kick`](Self::handle_kick) for the others
    /// instead, so a stopping ring is never popped.
    fn poll(&mut self, ctx: &mut WorkerCtx) -> bool {
        let _ = ctx;
        false
    }

    /// A message from another thread via [`WorkerHandle::call`]; the return value is the reply.
    fn handle_message(&mut self, ctx: &mut WorkerCtx, msg: Self::Msg) -> Self::Reply;
}

/// [`VhostUserDevice`] without its worker type: what the connection thread asks of a device,
/// as a trait object (the server's protocol code is not generic over the device).
pub(crate) trait DeviceOps: Send + Sync + 'static {
    fn num_queues(&self) -> usize;
    fn max_queue_size(&self) -> u16;
    fn features(&self) -> u64;
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    fn has_config(&self) -> bool;
    fn read_config(&self, offset: u32, buf: &mut [u8]);
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError>;
    fn set_acked_features(&self, features: u64);
    fn send_rarp(&self, mac: [u8; 6]) -> Result<(), DeviceError>;
}

impl<D: VhostUserDevice> DeviceOps for D {
    fn num_queues(&self) -> usize {
        VhostUserDevice::num_queues(self)
    }
    fn max_queue_size(&self) -> u16 {
        VhostUserDevice::max_queue_size(self)
    }
    fn features(&self) -> u64 {
        VhostUserDevice::features(self)
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserDevice::protocol_features(self)
    }
    fn has_config(&self) -> bool {
        VhostUserDevice::has_config(self)
    }
    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        VhostUserDevice::read_config(self, offset, buf)
    }
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        VhostUserDevice::write_config(self, offset, data)
    }
    fn set_acked_features(&self, features: u64) {
        VhostUserDevice::set_acked_features(self, features)
    }
    fn send_rarp(&self, mac: [u8; 6]) -> Result<(), DeviceError> {
        VhostUserDevice::send_rarp(self, mac)
    }
}
