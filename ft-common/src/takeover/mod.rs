// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Takeover: the standby becomes the primary (ARCHITECTURE.md section 5, `ftctl takeover`).
//!
//! - [`vm_record`]: `vm.json`, the primary's QEMU and daemon command lines, recorded in the
//!   standby's store from the running processes (`ftctl record-vm`).
//! - [`checkpoint`]: the newest valid checkpoint in the store and its devices' SEALED records.
//! - [`qemu_args`]: the restore command line (same devices, `-S -incoming defer`, own QMP).
//! - [`run`]: the takeover steps: generation G+1 persisted first, fence, daemons with replay
//!   records, QEMU restored from the checkpoint, `cont`, announce; timings for the report.
//!
//! Invariant served: the new primary resumes exactly from the newest checkpoint the standby
//! holds durably; nothing of a later (unacknowledged) epoch ever left the old primary, and the
//! old primary's daemons, where reachable, are fenced before the new one runs.

pub mod checkpoint;
pub mod qemu_args;
pub mod run;
pub mod vm_record;

pub use run::{takeover, TakeoverConfig, TakeoverError, TakeoverOutcome};
pub use vm_record::VmRecord;
