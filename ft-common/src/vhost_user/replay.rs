// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Replay records: what a standby daemon must re-execute on a VM restored from a checkpoint.
//!
//! QEMU's migration stream records only each ring's last avail index. Requests the primary's
//! daemon had taken off a ring and not put on the used ring when the checkpoint was sealed are
//! "consumed" as far as QEMU knows, and the guest waits for them. The primary's SEALED record
//! ([`QueueState`]) lists them, per queue, in the order they were taken, with the ring's base.
//! A daemon given that record before the guest runs ([`ReplayStore::install`]) checks it
//! against each restored ring when the ring starts and then hands those heads out first
//! ([`VringHandle::pop`](super::vring::VringHandle::pop)), each exactly once, before any new
//! avail entry.
//!
//! Invariants:
//! - A record is used only on a ring's first start in this daemon, and only if the ring's
//!   inflight region is fresh (or absent): a used region belongs to the same VM continuing
//!   (reconnect, daemon restart) and is authoritative.
//! - It is used only if SET_VRING_BASE equals the recorded base and the restored used idx plus
//!   the number of outstanding heads equals it too; otherwise the ring does not start and the
//!   error names the numbers. Nothing is guessed.
//! - Heads are validated (in range of the ring, no duplicates) before anything is popped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::control::{QueueState, TransactionState};

/// The replay record of one ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingReplay {
    /// The ring's base at the seal (GET_VRING_BASE on the primary).
    pub base: u16,
    /// Heads taken and not completed at the seal, in the order the primary took them.
    pub heads: Vec<u16>,
}

impl RingReplay {
    /// The record of one queue of a SEALED record.
    pub fn from_queue_state(q: &QueueState) -> RingReplay {
        RingReplay {
            base: q.next_avail,
            heads: q.replay_heads().to_vec(),
        }
    }

    /// Checks the record against the restored ring `queue` of `size` entries whose
    /// SET_VRING_BASE is `base` and whose used ring idx is `used_idx`.
    pub fn check(&self, queue: u16, size: u16, base: u16, used_idx: u16) -> Result<(), String> {
        let n = self.heads.len();
        if base != self.base {
            return Err(format!(
                "queue {queue}: SET_VRING_BASE is {base} but the replay record's base is {}; \
                 refusing to start the ring (record and checkpoint do not match)",
                self.base
            ));
        }
        if n > usize::from(size) || used_idx.wrapping_add(n as u16) != base {
            return Err(format!(
                "queue {queue}: the used ring's idx {used_idx} plus the replay record's {n} \
                 outstanding request(s) is {}, but the base is {base}; refusing to start the ring \
                 (record and checkpoint do not match)",
                u32::from(used_idx) + n as u32
            ));
        }
        if let Some(h) = self.heads.iter().find(|&&h| h >= size) {
            return Err(format!(
                "queue {queue}: replay record head {h} is outside the ring of {size} entries; \
                 refusing to start the ring"
            ));
        }
        Ok(())
    }
}

/// Why a record was not installed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    /// The record names a queue the device does not have.
    #[error("replay record for queue {queue}, but the device has {num_queues} queue(s)")]
    QueueOutOfRange { queue: u16, num_queues: u16 },
    /// The record lists a queue twice.
    #[error("replay record lists queue {0} twice")]
    DuplicateQueue(u16),
    /// The record lists a head twice for one queue.
    #[error("replay record lists head {head} of queue {queue} twice")]
    DuplicateHead { queue: u16, head: u16 },
    /// The ring already ran in this daemon: the guest is past the checkpoint.
    #[error("queue {0} already ran; a replay record applies only before the guest runs")]
    AlreadyStarted(u16),
}

#[derive(Debug, Default)]
struct Inner {
    pending: HashMap<u16, RingReplay>,
    started: HashSet<u16>,
}

/// Replay records waiting for their ring's first start. Shared by the server (which consumes
/// them) and whoever installs them (`--replay FILE`, a control request). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReplayStore {
    inner: Arc<Mutex<Inner>>,
    num_queues: u16,
}

/// What [`ReplayStore::install`] took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Queues with a record.
    pub queues: usize,
    /// Requests to replay over all queues.
    pub requests: usize,
}

impl ReplayStore {
    pub(crate) fn new(num_queues: usize) -> ReplayStore {
        ReplayStore {
            inner: Arc::default(),
            num_queues: u16::try_from(num_queues).unwrap_or(u16::MAX),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every operation is a single step that cannot leave the maps inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the records of every queue in `state` (replacing earlier ones not used yet). All
    /// or nothing: refused if a queue is out of range or listed twice, a head is listed twice,
    /// or a queue's ring already ran.
    pub fn install(&self, state: &TransactionState) -> Result<ReplaySummary, ReplayError> {
        let mut inner = self.lock();
        let mut seen = HashSet::new();
        let mut records = Vec::with_capacity(state.queues.len());
        for q in &state.queues {
            if q.queue >= self.num_queues {
                return Err(ReplayError::QueueOutOfRange {
                    queue: q.queue,
                    num_queues: self.num_queues,
                });
            }
            if !seen.insert(q.queue) {
                return Err(ReplayError::DuplicateQueue(q.queue));
            }
            if inner.started.contains(&q.queue) {
                return Err(ReplayError::AlreadyStarted(q.queue));
            }
            let r = RingReplay::from_queue_state(q);
            let mut heads = HashSet::new();
            if let Some(&head) = r.heads.iter().find(|&&h| !heads.insert(h)) {
                return Err(ReplayError::DuplicateHead {
                    queue: q.queue,
                    head,
                });
            }
            records.push((q.queue, r));
        }
        let requests = records.iter().map(|(_, r)| r.heads.len()).sum();
        let queues = records.len();
        inner.pending.extend(records);
        Ok(ReplaySummary { queues, requests })
    }

    /// Requests still waiting to be replayed (their ring has not started yet).
    pub fn pending_requests(&self) -> usize {
        self.lock().pending.values().map(|r| r.heads.len()).sum()
    }

    /// The record for `queue`'s next start, if any (kept until the start succeeds).
    pub(crate) fn peek(&self, queue: u16) -> Option<RingReplay> {
        self.lock().pending.get(&queue).cloned()
    }

    /// `queue`'s ring started: its record (if any) is used up, and no later one is accepted.
    pub(crate) fn started(&self, queue: u16) {
        let mut inner = self.lock();
        inner.pending.remove(&queue);
        inner.started.insert(queue);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::DeviceKind;

    fn state(queues: Vec<QueueState>) -> TransactionState {
        TransactionState {
            device: "vda".into(),
            kind: DeviceKind::Blk,
            queues,
        }
    }

    fn qs(queue: u16, next_avail: u16, outstanding: Vec<u16>) -> QueueState {
        QueueState {
            queue,
            next_avail,
            used_idx: Some(next_avail.wrapping_sub(outstanding.len() as u16)),
            outstanding,
            ..Default::default()
        }
    }

    #[test]
    fn check_names_both_numbers() {
        let r = RingReplay {
            base: 10,
            heads: vec![4, 2],
        };
        assert!(r.check(0, 256, 10, 8).is_ok());
        let e = r.check(0, 256, 11, 9).unwrap_err();
        assert!(
            e.contains("SET_VRING_BASE is 11") && e.contains("base is 10"),
            "{e}"
        );
        let e = r.check(0, 256, 10, 7).unwrap_err();
        assert!(
            e.contains("idx 7") && e.contains("is 9") && e.contains("base is 10"),
            "{e}"
        );
        let e = r.check(0, 4, 10, 8).unwrap_err();
        assert!(e.contains("head 4"), "{e}");
        // Wrapping indices.
        let w = RingReplay {
            base: 1,
            heads: vec![0, 1, 2],
        };
        assert!(w.check(0, 8, 1, u16::MAX - 1).is_ok());
    }

    #[test]
    fn install_is_all_or_nothing_and_only_before_the_ring_runs() {
        let s = ReplayStore::new(2);
        assert_eq!(
            s.install(&state(vec![qs(0, 5, vec![1]), qs(2, 0, vec![])])),
            Err(ReplayError::QueueOutOfRange {
                queue: 2,
                num_queues: 2
            })
        );
        assert_eq!(s.pending_requests(), 0);
        assert_eq!(
            s.install(&state(vec![qs(1, 5, vec![3, 1, 3])])),
            Err(ReplayError::DuplicateHead { queue: 1, head: 3 })
        );
        assert_eq!(
            s.install(&state(vec![qs(1, 5, vec![]), qs(1, 5, vec![])])),
            Err(ReplayError::DuplicateQueue(1))
        );
        let sum = s
            .install(&state(vec![qs(0, 5, vec![1, 0]), qs(1, 9, vec![7])]))
            .unwrap();
        assert_eq!((sum.queues, sum.requests), (2, 3));
        assert_eq!(s.peek(0).unwrap().heads, vec![1, 0]);
        s.started(0);
        assert_eq!(s.peek(0), None);
        assert_eq!(s.pending_requests(), 1);
        assert_eq!(
            s.install(&state(vec![qs(0, 5, vec![])])),
            Err(ReplayError::AlreadyStarted(0))
        );
    }

    #[test]
    fn first_draft_records_replay_their_held_heads() {
        let old: QueueState =
            serde_json::from_str(r#"{"queue":0,"next_avail":7,"held_heads":[3,4]}"#).unwrap();
        assert_eq!(
            RingReplay::from_queue_state(&old),
            RingReplay {
                base: 7,
                heads: vec![3, 4]
            }
        );
    }
}
