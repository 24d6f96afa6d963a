// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Output commit for the block device (`--ft hold`, Kemari style): writes, flushes, discards and
//! write-zeroes are held in the device's transaction queue, tagged with the open epoch, and are
//! executed only when the coordinator commits that epoch. Reads run at once.
//!
//! - [`hold`]: the device-wide held state shared by the queue workers and the control thread
//!   (one `TxQueue` under one lock, so SEAL is atomic with respect to all queues), and the
//!   messages the control thread sends workers.
//! - [`commit`]: the commit engine: one io_uring batch for all committed requests (overlapping
//!   ones in guest order, disjoint ones in parallel), drain, one `fdatasync`.
//! - [`worker`]: one queue worker's part: the heads it owes the guest, the request parked for
//!   room, completions deferred while its ring is stopped, the pop order for SEALED records,
//!   and the cancel of its held requests on reset or disconnect.
//! - [`control`]: the device's side of ft-common's gate (SEAL/COMMIT/ABORT/STATUS/REPLAY);
//!   fencing, the retried-SEAL rule and `--on-commit-error` are the shared gate core's.
//! - [`replicate`]: the commit's hook for disk replication (`--replicate-to`): ship the batch,
//!   complete it towards the guest only after the replica's acknowledgement.
//!
//! Invariants (ARCHITECTURE.md section 1):
//! 1. No held request reaches the image before `COMMIT` of its epoch: held requests live only in
//!    the transaction queue until `take_committable`; cancel (ABORT, reset, disconnect) drops
//!    them before they were ever submitted.
//! 2. `COMMITTED E` is sent only after every committed write completed and one `fdatasync` of
//!    the image returned 0; guest completions of held requests are delivered after that.
//! 3. A failed write or `fdatasync` fails the requests that depended on it (IOERR; a FLUSH
//!    depends on every write before it in guest order) and is reported as `COMMIT_FAILED`.
//! 4. A held request is completed to the guest at most once: its head is "owed" by the worker
//!    from pop until completion, and a head the server resubmits from the inflight region
//!    while still owed (ring restart on the same connection) is ignored.
//! 5. With replication, no held request completes towards the guest before the replica
//!    acknowledged its epoch (applied and synced on the standby's image).

pub mod commit;
pub mod control;
pub mod hold;
pub mod replicate;
pub mod worker;
