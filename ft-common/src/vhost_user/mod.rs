// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user device server shared by the block and net daemons.
//!
//! Built on the vhost crate's protocol layer (message parsing, `BackendListener`), virtio-queue
//! for rings and vm-memory for guest memory, with the protocol behaviour ft-vhost needs that
//! vhost-user-backend lacks (early SET_VRING_ENABLE, INFLIGHT_SHMFD, SEND_RARP, reconnect on
//! the same listener, errors that do not end the connection, stops that wait for the device).
//!
//! - [`device`]: the traits a device implements ([`VhostUserDevice`], [`QueueWorker`]).
//! - [`server`]: listener, accept/reconnect loop, stop handle.
//! - [`handler`]: per-connection protocol state.
//! - [`vring`]: a running ring as a worker sees it.
//! - [`worker`]: one epoll thread per queue group.
//! - `poll`: the adaptive busy-polling window of a worker (QEMU's `poll-max-ns`).
//! - [`memory`]: guest memory table and dirty log.
//! - [`inflight`]: the INFLIGHT_SHMFD region.
//! - [`replay`]: replay records for a VM restored from a checkpoint.
//! - [`sigbus`]: a frontend shrinking a shared file costs its connection, not the process.
//!
//! Using it from a daemon:
//! ```ignore
//! let dev = Arc::new(MyDevice::new(..));
//! let server = VhostUserServer::new(dev, Path::new("/run/blk.sock"))?;
//! let workers = server.worker_handles();      // typed by MyDevice's worker: for a control
//!                                             // thread (SEAL/COMMIT)
//! server.stop_handle().on_signals(&[libc::SIGINT, libc::SIGTERM])?;
//! server.run()?;                              // serves frontends one after another
//! ```
//! and a worker's kick handler, EVENT_IDX style, one notification per batch:
//! ```ignore
//! fn handle_kick(&mut self, ctx: &mut WorkerCtx, q: u16) {
//!     let Some(vr) = ctx.queue(q) else { return };
//!     loop {
//!         vr.disable_notification();
//!         while let Some(chain) = vr.pop() {   // resubmitted inflight heads come first
//!             let head = chain.head_index();
//!             // ... process; for writes into guest memory not done via vm-memory:
//!             // vr.mark_dirty(gpa, len);
//!             vr.add_used(head, written).ok();
//!         }
//!         if !vr.enable_notification() { break; }
//!     }
//!     vr.signal_used();
//! }
//! ```
//!
//! Protocol coverage: features with PROTOCOL_FEATURES and LOG_ALL added; protocol features MQ,
//! REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS, INFLIGHT_SHMFD, LOG_SHMFD, RESET_DEVICE plus device
//! extras (RARP). Not supported: BACKEND_REQ (no backend-initiated messages), postcopy,
//! SET_DEVICE_STATE_FD, shared objects, GPU, packed rings in the inflight region, polling
//! mode (SET_VRING_KICK without fd).

pub mod device;
#[doc(hidden)]
pub mod fuzzing;
pub mod handler;
pub mod inflight;
pub mod memory;
mod poll;
pub mod replay;
pub mod server;
pub mod sigbus;
pub mod vring;
pub mod worker;

pub use device::{Chain, DeviceError, QueueWorker, StopStatus, VhostUserDevice};
pub use memory::GuestMem;
pub use replay::{ReplayError, ReplayStore, ReplaySummary, RingReplay};
pub use server::{ServerStop, VhostUserServer};
pub use vring::VringHandle;
pub use worker::{Asked, RingPosition, WorkerCtx, WorkerGone, WorkerHandle};
