// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user-blk-ft: a virtio-blk vhost-user backend built for output commit.
//!
//! - [`image`]: the backing file or block device.
//! - [`limits`]: the request size limits, advertised by `config` and enforced by `request`.
//! - [`config`]: feature bits and the virtio-blk config space.
//! - [`request`]: descriptor chain -> validated, self-contained [`request::BlkRequest`].
//! - [`segments`]: the pooled iovec tables requests point to (small moves, no allocation).
//! - [`engine`]: io_uring submission/completion with a fixed slot pool, one per queue thread.
//! - [`queue`]: the per-queue worker (pop, parse, submit, complete).
//! - [`used`]: answering a request (status byte, used ring).
//! - [`device`]: the device for ft-common's vhost-user server.
//! - [`gate`]: the whole output-commit path (`--ft hold`): held requests, each queue worker's
//!   part (owed heads, parked and deferred requests, cancel on reset), commit engine, the
//!   device's side of ft-common's gate.
//! - [`fuzzing`]: the chain parser's fuzz entry point (`fuzz/`, regression tests).
//!
//! Parsing and submission are separate on purpose: a parsed request can wait in the transaction
//! queue (output commit) and be submitted later from an engine slot.

pub mod config;
pub mod device;
pub mod engine;
pub mod fuzzing;
pub mod gate;
pub mod image;
pub mod limits;
pub mod queue;
pub mod request;
pub mod segments;
pub mod used;
