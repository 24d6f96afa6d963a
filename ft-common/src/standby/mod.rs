// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The standby: receives a real checkpoint of the VM (QEMU's migration stream plus every
//! device's SEALED record) every epoch and keeps the newest one durable, so that the
//! coordinator can acknowledge an epoch, and a takeover can restore from it.
//!
//! - [`store`]: the on-disk contract (`ckpt-<epoch>/{vmstate,manifest.json}`), atomic publish,
//!   validation on read ([`store::CheckpointStore::newest_valid`]).
//! - [`protocol`]: the checkpointer <-> standby conversation and the addresses;
//!   [`client`]: the checkpointer's end of it.
//! - [`server`]: the `ft-standby` process.
//!
//! The invariant served (ARCHITECTURE.md sections 1 and 5): the standby answers `DURABLE E`
//! only when checkpoint `E` is on stable storage and would be found by `newest_valid`; the
//! coordinator commits `E` (releases its output) only after that answer.

pub mod client;
pub mod protocol;
pub mod server;
pub mod store;

pub use protocol::{StandbyAddr, StandbyReply, StandbyRequest};
pub use server::{StandbyConfig, StandbyServer};
pub use store::{CheckpointStore, Manifest, PublishedCheckpoint};
