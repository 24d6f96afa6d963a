// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user-net-ft: a vhost-user virtio-net backend on a tap device whose TX output can be held
//! per checkpoint epoch and released only when the checkpoint is acknowledged (output commit,
//! ARCHITECTURE.md sections 1 and 4).
//!
//! Invariant served by the whole crate: in `hold` mode no TX frame of an epoch later than the
//! last committed one reaches the tap; RX is never held.

pub mod announce;
pub mod config;
pub mod device;
pub mod fuzzing;
pub mod gate;
pub mod mac;
pub mod open_tap;
pub mod ring;
pub mod rx;
pub mod stats;
pub mod tap;
pub mod tap_batch;
pub mod tx;
pub mod tx_hold;
pub mod vnet_hdr;
