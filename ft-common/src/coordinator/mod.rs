// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The coordinator: drives every device daemon through the epoch cycle (SEAL, checkpoint,
//! COMMIT) so that no output leaves the primary before its checkpoint is acknowledged.
//!
//! - [`cycle`]: the epoch cycle as a pure state machine (pipelining, in-order commits,
//!   failure policy, timeouts); all decisions live here.
//! - [`runtime`]: the I/O shell running the state machine on one thread, which also owns
//!   every daemon's control socket (one `ppoll`, no thread between a reply and the next
//!   command).
//! - [`handle`]: operator requests ([`Op`]) and the [`CoordinatorHandle`] that sends them.
//! - [`device_link`]: one daemon's control connection as a non-blocking state machine
//!   (pipelined requests, timeouts, reconnects).
//! - [`checkpointer`]: `sim`, `exec:CMD`, `qmp:SOCK` and [`migrate`] (`migrate:SOCK,standby=ADDR`:
//!   real checkpoints to an `ft-standby`) behind one trait; [`checkpointer_spec`]: the
//!   `--checkpointer` argument, which builds one of them; [`qmp`]: QMP client.
//! - [`api`]: the `ftctl` socket; [`metrics`]: Prometheus text over HTTP on loopback;
//!   [`telemetry`]: latency histograms and counters.
//!
//! Invariants (ARCHITECTURE.md sections 1 and 6): nothing is committed for an epoch whose
//! checkpoint was not acknowledged; commits go out in epoch order; the generation is persisted
//! before any command is sent and only grows, so a restarted or deposed coordinator is fenced.

pub mod api;
pub mod checkpointer;
pub mod checkpointer_spec;
pub mod cycle;
pub mod device_link;
pub mod handle;
pub mod metrics;
pub mod migrate;
pub mod qmp;
pub mod runtime;
pub mod telemetry;

pub use checkpointer::Checkpointer;
pub use checkpointer_spec::CheckpointerSpec;
pub use cycle::{CycleConfig, FailurePolicy};
pub use device_link::LinkConfig;
pub use handle::{CoordinatorHandle, Op};
pub use runtime::{Coordinator, CoordinatorConfig, DeviceSpec};
