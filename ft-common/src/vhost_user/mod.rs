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
//! - [`memory`]: guest memory table and dirty log.
//! - [`inflight`]: the INFLIGHT_SHMFD region.

pub mod device;
pub mod handler;
pub mod inflight;
pub mod memory;
pub mod server;
pub mod vring;
pub mod worker;

pub use device::{Chain, DeviceError, DeviceMsg, QueueWorker, StopStatus, VhostUserDevice};
pub use memory::GuestMem;
pub use server::{ServerStop, VhostUserServer};
pub use vring::VringHandle;
pub use worker::{WorkerCtx, WorkerGone, WorkerHandle};
