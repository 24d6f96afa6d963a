// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control protocol between the coordinator and each device daemon (one unix socket per
//! daemon, `--control PATH`, mode 0600). Specification: `docs/control-protocol.md`.
//!
//! - [`message`]: the requests, replies and notifications and their JSON wire form.
//! - [`codec`]: length-prefixed, versioned, size-bounded framing; blocking and incremental.
//! - [`server`]: the daemon's control thread, its handler trait and the queue threads' notifier.
//! - [`client`]: the coordinator's connection.
//! - The handler both daemons run on it is the gate, [`crate::gate`].
//! - [`deadline`]: `COMMIT`'s lease deadline (`CLOCK_MONOTONIC`) and the admission check.
//! - `fuzzing`: entry points for fuzz targets of the codec and the server.
//!
//! Protocol invariants: one reply per request, in order; every fenced command carries a
//! generation; no frame exceeds [`codec::MAX_FRAME_LEN`]; bad input is an error reply or a clean
//! close, never a panic or an unbounded allocation.

pub mod client;
pub mod codec;
pub mod deadline;
#[doc(hidden)]
pub mod fuzzing;
pub mod message;
pub mod server;

pub use client::{ClientError, ControlClient};
pub use codec::{CodecError, FrameDecoder, MAX_FRAME_LEN, PROTOCOL_VERSION};
pub use message::{
    CommitStats, DaemonMessage, DeviceKind, DeviceStatus, EpochHeld, ErrorCode, Notification,
    QueueState, Reply, Request, TransactionState,
};
pub use server::{ControlHandler, ControlServer, ControlServerHandle, Notifier};
