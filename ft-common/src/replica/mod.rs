// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared-nothing disk replication: the primary's block daemon ships each committed epoch's
//! writes to a replica service on the standby host, which applies them to the standby's own
//! image (docs/architecture.md, "Disk replication").
//!
//! - [`protocol`]: the binary wire format (`HELLO`, `EPOCH` with WRITE / DISCARD /
//!   WRITE_ZEROES / FLUSH ops, `ACK`, `REFUSED`).
//! - [`apply`]: applying an epoch to the image with one `fdatasync`; idempotent on retry.
//! - [`server`]: the replica service run by `ft-standby --replica-image --replica-listen`, with
//!   its fence against a takeover.
//! - [`client`]: the primary's end: one epoch in flight, re-sent after a reconnect.
//! - [`dirty`]: the persistent dirty-block log (bitmap + activity log) that lets a failback
//!   copy only the blocks that differ.
//!
//! The invariant served: **a held request completes towards the guest only after the replica
//! acknowledged its epoch** (applied and synced). So when checkpoint `E` is acknowledged, every
//! write the guest saw complete before capture `E` is on the replica's image, and every other
//! request taken before capture `E` is outstanding in checkpoint `E`, which a takeover replays.

pub mod apply;
pub mod client;
pub mod dirty;
pub mod protocol;
pub mod server;

pub use client::{ReplicaLink, ReplicaStatus, SyncProgress};
pub use server::{ReplicaConfig, ReplicaServer};
