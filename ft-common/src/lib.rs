// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ft-common: the parts both ft-vhost daemons share.
//!
//! - [`durable`]: small state files replaced atomically and durably.
//! - [`epoch`]: epoch and generation numbers.
//! - [`fence`]: the generation fence and the persisted generation (`GenerationStore`).
//! - [`aiocb`]: AIOCB handles (queued, in flight, completed or cancelled) with real cancel.
//! - [`txqueue`]: the per-device transaction queue holding output by epoch until commit.
//! - [`control`]: the coordinator <-> daemon control protocol (messages, framing, socket ends).
//! - [`ratelimit`]: rate-limited logging of guest and frontend input ([`guest_warn!`]).
//! - [`vhost_user`]: the vhost-user device server both daemons run.
//! - [`unix_socket`]: listening sockets whose file appears only once they listen.
//! - [`killpoint`]: test-only stop points for failover tests (inert unless configured).
//! - [`takeover`]: the standby becomes the primary (`ftctl record-vm`, `ftctl takeover`).
//! - [`coordinator`]: the coordinator that seals epochs across devices, drives a checkpointer and
//!   commits in epoch order (binaries `ft-coordinator` and `ftctl`).
//! - [`replica`]: disk replication to the standby's own image, one acknowledged epoch at a
//!   time (`vhost-user-blk-ft --replicate-to`, `ft-standby --replica-image`).
//! - [`arbiter`]: arbitration of the primary role on etcd (a leased key per VM, the commit
//!   deadline, the generation stored in etcd).
//! - [`standby`]: the checkpoint store and the standby process that receives checkpoints
//!   (binary `ft-standby`).
//!
//! The one invariant everything here serves (ARCHITECTURE.md section 1): no byte of an epoch later
//! than the last committed one reaches the backing file or the tap.

pub mod aiocb;
pub mod arbiter;
pub mod control;
pub mod coordinator;
pub mod durable;
pub mod epoch;
pub mod fence;
pub mod gate;
pub mod killpoint;
pub mod ratelimit;
pub mod replica;
pub mod standby;
pub mod takeover;
pub mod txqueue;
pub mod unix_socket;
pub mod vhost_user;
