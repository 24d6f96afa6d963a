// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Daemon-independent pieces of a control handler (the "gate"): generation fencing, the mapping
//! of transaction-queue refusals to protocol error codes, and the merge of held-output telemetry
//! into `STATUS` epochs. Both daemons' handlers use these, so the two answer the same request the
//! same way.
//!
//! Invariants: the fence is checked before anything else and an older generation is refused
//! without side effects; every [`TxError`] becomes an `ERROR` reply, never a panic.

use super::message::{EpochHeld, ErrorCode, Reply, Request};
use crate::epoch::{AdmitError, Epoch, Fence};
use crate::txqueue::{EpochStats, TxError};
use std::collections::BTreeMap;
use std::time::Instant;

/// Admits `req` through `fence` (requests without a generation, i.e. `STATUS`, always pass).
/// An older generation yields the `FENCED` reply to send; a newer one the fence cannot store
/// yields `INTERNAL` (and is not admitted).
pub fn admit(fence: &mut Fence, req: &Request) -> Result<(), Reply> {
    match req.generation() {
        Some(g) => fence.admit(g).map_err(|e| match e {
            AdmitError::Fenced(f) => Reply::error(ErrorCode::Fenced, f.to_string()),
            e @ AdmitError::Persist { .. } => {
                log::error!("{e}");
                Reply::error(ErrorCode::Internal, e.to_string())
            }
        }),
        None => Ok(()),
    }
}

/// The error code of a refused seal or commit.
pub fn tx_error_code(e: &TxError) -> ErrorCode {
    match e {
        TxError::Stale { .. } | TxError::EpochOverflow(_) => ErrorCode::StaleEpoch,
        TxError::NotSealed { .. } => ErrorCode::NotSealed,
        TxError::Aborted { .. } => ErrorCode::Aborted,
        TxError::NotHeld(_) => ErrorCode::Internal,
    }
}

/// The `ERROR` reply for a refused seal or commit.
pub fn tx_error_reply(e: TxError) -> Reply {
    Reply::error(tx_error_code(&e), e.to_string())
}

/// Held output per epoch, summed over several transaction queues (or one), for `STATUS`.
#[derive(Debug, Default)]
pub struct EpochMerge {
    epochs: BTreeMap<Epoch, EpochHeld>,
}

impl EpochMerge {
    /// Adds one queue's per-epoch stats; ages are taken at `now`, the oldest wins.
    pub fn add(&mut self, stats: impl IntoIterator<Item = EpochStats>, now: Instant) {
        for e in stats {
            let h = self.epochs.entry(e.epoch).or_insert(EpochHeld {
                epoch: e.epoch,
                ..Default::default()
            });
            h.requests += e.requests as u64;
            h.bytes += e.bytes;
            h.oldest_age_us = h.oldest_age_us.max(e.oldest_age(now).as_micros() as u64);
        }
    }

    /// The merged epochs, oldest first.
    pub fn into_vec(self) -> Vec<EpochHeld> {
        self.epochs.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::Generation;
    use crate::txqueue::{EpochOp, Limits, TxQueue};

    #[test]
    fn fence_refuses_old_generations_and_status_passes() {
        let mut f = Fence::default();
        let commit = |g| Request::Commit {
            generation: Generation(g),
            epoch: Epoch(1),
        };
        assert!(admit(&mut f, &commit(5)).is_ok());
        match admit(&mut f, &commit(4)) {
            Err(Reply::Error { code, .. }) => assert_eq!(code, ErrorCode::Fenced),
            r => panic!("{r:?}"),
        }
        assert!(admit(&mut f, &Request::Status).is_ok());
        assert_eq!(f.newest(), Generation(5));
    }

    #[test]
    fn tx_errors_map_to_codes() {
        let stale = TxError::Stale {
            op: EpochOp::Seal,
            epoch: Epoch(1),
            newest: Epoch(2),
        };
        assert_eq!(tx_error_code(&stale), ErrorCode::StaleEpoch);
        let ns = TxError::NotSealed {
            epoch: Epoch(3),
            last_sealed: Epoch(2),
        };
        assert_eq!(tx_error_code(&ns), ErrorCode::NotSealed);
        match tx_error_reply(ns) {
            Reply::Error { code, message } => {
                assert_eq!(code, ErrorCode::NotSealed);
                assert!(message.contains("epoch 3"));
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn epochs_merge_across_queues() {
        let lim = Limits {
            max_requests: 10,
            max_bytes: 1 << 20,
        };
        let (mut a, mut b) = (TxQueue::new(lim), TxQueue::new(lim));
        a.push((), 10).unwrap();
        b.push((), 20).unwrap();
        b.seal(Epoch(1)).unwrap();
        b.push((), 5).unwrap();
        let mut m = EpochMerge::default();
        let now = Instant::now();
        m.add(a.epochs(), now);
        m.add(b.epochs(), now);
        let v = m.into_vec();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].epoch, v[0].requests, v[0].bytes), (Epoch(1), 2, 30));
        assert_eq!((v[1].epoch, v[1].requests, v[1].bytes), (Epoch(2), 1, 5));
    }
}
