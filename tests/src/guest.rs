// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Boot a small Linux guest under QEMU (TCG) against vhost-user backends and collect its verdict.
//!
//! The pieces:
//! - [`image`]: locate or build the cached guest kernel + initramfs (`tests/guest/build-guest.sh`)
//!   and the host tools (`scripts/setup.sh`); both scripts are idempotent.
//! - [`backend`]: start a vhost-user backend process (qemu-storage-daemon today, our own daemons
//!   later) and wait for its socket; killed on drop.
//! - [`vm`]: run QEMU with vhost-user-blk / vhost-user-net devices, capture the serial console,
//!   wait for the guest's `FT-RESULT:` line or a timeout; killed on drop.
//! - [`qemu`]: which QEMU runs the guest (the host's 7.2 or QEMU 10 from a cached Debian 13
//!   tree) and what differs between them.
//! - [`serial_file`]: the console of a QEMU the harness did not start (restored by a takeover).
//! - [`scratch`]: per-test scratch directories.
//! - [`disk`]: host-side reading of a guest's raw disk image (which blocks it wrote).
//!
//! Invariants: QEMU always runs with `-accel tcg` (nested KVM hangs on the test machines), with
//! memfd-backed shared guest memory (vhost-user needs it), and never outlives its [`vm::Guest`];
//! a backend never outlives its [`backend::Backend`]. A guest that prints no result line counts as
//! failed, never as passed.

pub mod backend;
pub mod disk;
pub mod error;
pub mod image;
pub mod qemu;
pub mod scratch;
pub mod serial_file;
pub mod vm;

pub use backend::{Backend, BackendCommand};
pub use disk::nonzero_blocks;
pub use error::HarnessError;
pub use image::{ensure_host_tools, GuestImage};
pub use qemu::QemuFlavor;
pub use scratch::ScratchDir;
pub use serial_file::SerialFile;
pub use vm::{Guest, GuestConfig, GuestOutcome, GuestResult};
