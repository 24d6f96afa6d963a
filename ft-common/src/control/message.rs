// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The messages of the control protocol between the coordinator and one device daemon.
//!
//! Requests flow coordinator -> daemon ([`Request`]); the daemon answers every request with exactly
//! one [`Reply`], in request order, and may interleave unsolicited [`Notification`]s between
//! replies. [`DaemonMessage`] is what the coordinator reads off the socket: either of the two.
//!
//! Every message is a JSON object whose `"type"` field carries the wire name (`SEAL`, `SEALED`,
//! `COMMIT`, `COMMITTED`, `COMMIT_FAILED`, `ABORT`, `ABORTED`, `ANNOUNCE`, `ANNOUNCED`, `STATUS`,
//! `OUTPUT_PENDING`, `ERROR`). Unknown fields are ignored so that later versions can add optional
//! fields without a version bump; fields added later carry `#[serde(default)]`. Anything that
//! would change the meaning of an existing field needs a new frame version (see `codec`).
//!
//! Invariant served here (ARCHITECTURE.md section 6): every command that can release or cancel
//! output carries the coordinator's [`Generation`], so a daemon can fence a deposed coordinator.

use super::deadline::MonotonicTime;
use crate::epoch::{Epoch, Generation};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A command from the coordinator to a daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Request {
    /// Checkpoint `epoch` is being taken (VM paused): close it, open the next one, and return the
    /// transaction state of the sealed epoch. Accepted when `epoch >= open epoch`.
    Seal {
        generation: Generation,
        epoch: Epoch,
    },
    /// Checkpoint `epoch` was acknowledged: release and make durable all held output of epochs
    /// `<= epoch`. Requires `epoch` sealed and newer than the last committed epoch.
    Commit {
        generation: Generation,
        epoch: Epoch,
        /// Lease arbitration (`ft-coordinator --etcd`): the commit may start only until this
        /// point of the host's `CLOCK_MONOTONIC` (microseconds), else `DEADLINE_PASSED`.
        /// Absent: no limit (coordinators without etcd, and older ones).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline: Option<MonotonicTime>,
    },
    /// This primary is deposed: cancel every held request of uncommitted epochs.
    Abort { generation: Generation },
    /// After failover (net): announce the guest's MAC (gratuitous RARP).
    Announce { generation: Generation },
    /// On a standby, before the restored guest runs (blk): the SEALED `state` of the
    /// checkpoint the VM is restored from; each ring checks it at its first start and
    /// re-executes its outstanding requests first (the `--replay FILE` flag, over the socket).
    Replay {
        generation: Generation,
        state: TransactionState,
    },
    /// Report counters and held-output telemetry. Read-only, so it carries no generation.
    Status,
}

/// Largest generation or epoch a request may carry: 2^53 - 1, the largest integer every JSON
/// implementation reads exactly (IEEE double; `jq`, JavaScript, Python's `json` all agree).
///
/// Why a bound at all: both numbers only ever grow, and the fence is persisted, so a single
/// request with `u64::MAX` would leave no newer generation to fence it with (every later
/// coordinator refused, for good), and `SEAL u64::MAX - 1` would open an epoch that can never be
/// sealed. At one epoch per millisecond the bound lasts 285,000 years, so no coordinator that
/// counts reaches it; one that jumps there is refused (`MALFORMED`) with no effect.
pub const MAX_REQUEST_NUMBER: u64 = (1 << 53) - 1;

impl Request {
    /// Checks that the generation and epoch are at most [`MAX_REQUEST_NUMBER`]; the error says
    /// which field is out of range.
    pub fn check_range(&self) -> Result<(), String> {
        let epoch = match self {
            Request::Seal { epoch, .. } | Request::Commit { epoch, .. } => Some(*epoch),
            _ => None,
        };
        let fields = [
            ("generation", self.generation().map(|g| g.0)),
            ("epoch", epoch.map(|e| e.0)),
        ];
        for (name, v) in fields {
            if let Some(v) = v.filter(|&v| v > MAX_REQUEST_NUMBER) {
                return Err(format!(
                    "{name} {v} is above the protocol's maximum of {MAX_REQUEST_NUMBER}"
                ));
            }
        }
        Ok(())
    }

    /// The generation the request carries, if it is a fenced command.
    pub fn generation(&self) -> Option<Generation> {
        match self {
            Request::Seal { generation, .. }
            | Request::Commit { generation, .. }
            | Request::Abort { generation }
            | Request::Announce { generation }
            | Request::Replay { generation, .. } => Some(*generation),
            Request::Status => None,
        }
    }
}

/// The answer of a daemon to one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Reply {
    /// `SEAL epoch` done; `state` ships with checkpoint `epoch` (ARCHITECTURE.md section 5).
    Sealed {
        epoch: Epoch,
        state: TransactionState,
    },
    /// Every held output of epochs `<= epoch` is released and durable.
    Committed { epoch: Epoch, stats: CommitStats },
    /// The commit of `epoch` failed; the requests depending on it were failed towards the guest.
    CommitFailed {
        epoch: Epoch,
        error: String,
        #[serde(default)]
        errno: Option<i32>,
    },
    /// Held output of uncommitted epochs was cancelled; none of it was or will be released.
    Aborted {
        cancelled_requests: u64,
        cancelled_bytes: u64,
        /// The newest committed epoch at the time of the abort, for the coordinator's records.
        #[serde(default)]
        last_committed: Option<Epoch>,
    },
    /// The replay record was taken; its requests run when their rings first start.
    ReplayAccepted {
        /// Queues the record covers.
        queues: u32,
        /// Requests it will replay.
        requests: u64,
    },
    /// The announcement was sent.
    Announced {
        /// Announcement packets handed to the tap.
        #[serde(default)]
        packets: u32,
    },
    /// Answer to `STATUS`.
    Status(Box<DeviceStatus>),
    /// The request was refused or could not be understood.
    Error { code: ErrorCode, message: String },
}

impl Reply {
    /// Shorthand for an [`Reply::Error`].
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error {
            code,
            message: message.into(),
        }
    }
}

/// An unsolicited message from a daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Notification {
    /// The first held request landed in the empty open epoch `epoch`: the coordinator should
    /// checkpoint as soon as its minimum interval allows, to bound the latency holding adds.
    OutputPending { epoch: Epoch },
}

/// Why a request was refused. Serialized as `SCREAMING_SNAKE_CASE` strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The frame body was not a valid request (bad JSON, wrong shape, unknown type, empty frame).
    Malformed,
    /// The frame's version byte is not one this daemon speaks.
    UnsupportedVersion,
    /// The frame's length exceeds the protocol bound (the connection is then closed), or a reply
    /// would have.
    TooLarge,
    /// The request's generation is older than one the daemon has already seen.
    Fenced,
    /// The epoch is older than the daemon's state allows (already sealed or already committed).
    StaleEpoch,
    /// `COMMIT E` for an epoch that has not been sealed yet.
    NotSealed,
    /// `COMMIT E` for an epoch whose output an `ABORT` cancelled: there is nothing to release.
    Aborted,
    /// An earlier commit failed and the daemon runs with `--on-commit-error stop`.
    CommitRefused,
    /// The request is valid but this device does not implement it (e.g. `ANNOUNCE` on blk).
    Unsupported,
    /// A `REPLAY` record does not fit the device (queue out of range, a queue or head listed
    /// twice) or comes too late (a ring already ran).
    ReplayRefused,
    /// `COMMIT` arrived after its `deadline` (the coordinator's etcd lease may have expired and
    /// another host may be the primary): nothing was released.
    DeadlinePassed,
    /// The daemon failed internally (a bug or an unexpected system error).
    Internal,
    /// A code this side does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

/// Which kind of device a daemon serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Blk,
    Net,
}

/// Per-virtqueue replay record of a sealed epoch.
///
/// Exact while the ring is stopped (GET_VRING_BASE answered and no start since), as it is at
/// every checkpoint QEMU's migration takes; while the ring runs it is a snapshot of one instant.
/// Invariant of an exact record: `used_idx + outstanding.len() == next_avail` (mod 2^16).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Virtqueue index.
    pub queue: u16,
    /// The ring's next available index: what GET_VRING_BASE returned (the base QEMU's
    /// migration stream records), or, while the ring runs, the next index the daemon will pop.
    /// 0 for a ring that never ran.
    pub next_avail: u16,
    /// Every descriptor head taken off the avail ring and not yet in the used ring, in the
    /// order the daemon took them: held output, reads in flight, completions deferred because
    /// the ring was stopped, a chain parked for backpressure. The standby re-executes them from
    /// restored guest memory before taking new requests.
    #[serde(default)]
    pub outstanding: Vec<u16>,
    /// The used ring's idx as the daemon last wrote it (None: the ring never ran).
    #[serde(default)]
    pub used_idx: Option<u16>,
    /// How many of `outstanding` are held output (not committed yet).
    #[serde(default)]
    pub held: u32,
    /// First-draft records listed only the held heads here. Read (as the outstanding list of a
    /// record that has none), no longer written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_heads: Vec<u16>,
}

impl QueueState {
    /// The heads to replay on a standby: `outstanding`, or a first-draft record's
    /// `held_heads` (whose count the ring check then judges).
    pub fn replay_heads(&self) -> &[u16] {
        if self.outstanding.is_empty() {
            &self.held_heads
        } else {
            &self.outstanding
        }
    }
}

/// What a daemon returns with `SEALED`: enough to check the restored rings on the standby and
/// replay the requests outstanding at the seal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionState {
    /// Device name as given on the daemon's command line (to match records with daemons).
    pub device: String,
    pub kind: DeviceKind,
    pub queues: Vec<QueueState>,
}

/// Measurements of one successful commit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStats {
    /// Held requests (blk) or packets (net) released by this commit.
    pub requests: u64,
    /// Payload bytes released.
    pub bytes: u64,
    /// From submitting the batch to the last completion.
    pub submit_to_drain_us: u64,
    /// Time in fdatasync (0 for net, or when nothing needed syncing).
    pub fdatasync_us: u64,
    /// From receiving `COMMIT` to replying.
    #[serde(default)]
    pub total_us: u64,
    /// Epochs released by this commit (several when earlier seals were never committed).
    #[serde(default)]
    pub epochs: u64,
}

/// Held output of one epoch, for telemetry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochHeld {
    pub epoch: Epoch,
    pub requests: u64,
    pub bytes: u64,
    /// Age of the oldest held request of this epoch, microseconds.
    pub oldest_age_us: u64,
}

/// Answer to `STATUS`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub device: String,
    pub kind: DeviceKind,
    /// Gating mode (`off`, `hold`, later `buffer`).
    pub mode: String,
    /// Newest generation the daemon has admitted.
    pub generation: Generation,
    pub open_epoch: Epoch,
    pub last_sealed: Option<Epoch>,
    pub last_committed: Option<Epoch>,
    /// Held output over all uncommitted epochs.
    pub held_requests: u64,
    pub held_bytes: u64,
    /// Held output per uncommitted epoch, oldest first.
    #[serde(default)]
    pub epochs: Vec<EpochHeld>,
    pub commits_ok: u64,
    pub commits_failed: u64,
    pub fdatasyncs: u64,
    /// True after a failed commit under `--on-commit-error stop`: commits are refused.
    #[serde(default)]
    pub commit_refused: bool,
    /// Stats of the newest successful commit.
    #[serde(default)]
    pub last_commit: Option<CommitStats>,
    /// Disk replication to the standby (`--replicate-to`), if configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<crate::replica::ReplicaStatus>,
    /// The dirty-block log for failback (`--dirty-log`), if configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_log: Option<crate::replica::dirty::DirtyLogStatus>,
}

/// Anything a daemon sends: a reply or a notification. The `"type"` tags of the two sets are
/// disjoint, so the tag alone decides which one a frame holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonMessage {
    Reply(Reply),
    Notification(Notification),
}

/// Wire names of [`Notification`] variants; must match its serde names.
const NOTIFICATION_TYPES: &[&str] = &["OUTPUT_PENDING"];

impl Serialize for DaemonMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DaemonMessage::Reply(r) => r.serialize(s),
            DaemonMessage::Notification(n) => n.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for DaemonMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Peek at the tag, then decode with the matching enum so that errors stay precise (an
        // untagged enum would only say "did not match any variant").
        let value = serde_json::Value::deserialize(d)?;
        let is_notification = value
            .get("type")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|t| NOTIFICATION_TYPES.contains(&t));
        if is_notification {
            Notification::deserialize(value)
                .map(DaemonMessage::Notification)
                .map_err(de::Error::custom)
        } else {
            Reply::deserialize(value)
                .map(DaemonMessage::Reply)
                .map_err(de::Error::custom)
        }
    }
}

impl From<Reply> for DaemonMessage {
    fn from(r: Reply) -> Self {
        DaemonMessage::Reply(r)
    }
}

impl From<Notification> for DaemonMessage {
    fn from(n: Notification) -> Self {
        DaemonMessage::Notification(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_names_are_the_protocol_names() {
        let seal = Request::Seal {
            generation: Generation(2),
            epoch: Epoch(7),
        };
        assert_eq!(
            serde_json::to_value(&seal).unwrap(),
            json!({"type": "SEAL", "generation": 2, "epoch": 7})
        );
        assert_eq!(
            serde_json::to_value(Request::Status).unwrap(),
            json!({"type": "STATUS"})
        );
        let failed = Reply::CommitFailed {
            epoch: Epoch(3),
            error: "EIO".into(),
            errno: Some(5),
        };
        assert_eq!(
            serde_json::to_value(&failed).unwrap()["type"],
            "COMMIT_FAILED"
        );
        let pending = Notification::OutputPending { epoch: Epoch(9) };
        assert_eq!(
            serde_json::to_value(&pending).unwrap(),
            json!({"type": "OUTPUT_PENDING", "epoch": 9})
        );
        let err = Reply::error(ErrorCode::NotSealed, "x");
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            json!({"type": "ERROR", "code": "NOT_SEALED", "message": "x"})
        );
    }

    #[test]
    fn notification_types_match_serde_names() {
        let n = Notification::OutputPending { epoch: Epoch(1) };
        let v = serde_json::to_value(&n).unwrap();
        assert!(NOTIFICATION_TYPES.contains(&v["type"].as_str().unwrap()));
    }

    #[test]
    fn daemon_message_dispatches_on_tag() {
        let n: DaemonMessage =
            serde_json::from_str(r#"{"type":"OUTPUT_PENDING","epoch":4}"#).unwrap();
        assert_eq!(
            n,
            DaemonMessage::Notification(Notification::OutputPending { epoch: Epoch(4) })
        );
        let r: DaemonMessage = serde_json::from_str(r#"{"type":"ANNOUNCED","packets":3}"#).unwrap();
        assert_eq!(r, DaemonMessage::Reply(Reply::Announced { packets: 3 }));
        // The error names the real problem, not "no variant matched".
        let e = serde_json::from_str::<DaemonMessage>(r#"{"type":"OUTPUT_PENDING"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("epoch"), "{e}");
    }

    #[test]
    fn commit_deadline_is_optional_on_the_wire() {
        // An older coordinator's COMMIT (no deadline) still decodes; without a deadline the
        // field is not sent, so older daemons see the same bytes as before.
        let old: Request =
            serde_json::from_str(r#"{"type":"COMMIT","generation":2,"epoch":5}"#).unwrap();
        let plain = Request::Commit {
            generation: Generation(2),
            epoch: Epoch(5),
            deadline: None,
        };
        assert_eq!(old, plain);
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            json!({"type": "COMMIT", "generation": 2, "epoch": 5})
        );
        let with = Request::Commit {
            generation: Generation(2),
            epoch: Epoch(5),
            deadline: Some(MonotonicTime(1_500_000)),
        };
        let v = serde_json::to_value(&with).unwrap();
        assert_eq!(
            v,
            json!({"type": "COMMIT", "generation": 2, "epoch": 5, "deadline": 1_500_000})
        );
        assert_eq!(serde_json::from_value::<Request>(v).unwrap(), with);
        assert_eq!(
            serde_json::to_value(ErrorCode::DeadlinePassed).unwrap(),
            "DEADLINE_PASSED"
        );
    }

    #[test]
    fn unknown_fields_are_ignored_unknown_codes_tolerated() {
        let r: Request =
            serde_json::from_str(r#"{"type":"ABORT","generation":1,"reason":"failover"}"#).unwrap();
        assert_eq!(
            r,
            Request::Abort {
                generation: Generation(1)
            }
        );
        let e: Reply =
            serde_json::from_str(r#"{"type":"ERROR","code":"SOMETHING_NEW","message":""}"#)
                .unwrap();
        assert_eq!(e, Reply::error(ErrorCode::Unknown, ""));
    }

    #[test]
    fn wrong_shapes_are_errors() {
        for bad in [
            r#"{"type":"SEAL","epoch":1}"#,
            r#"{"type":"SEAL","generation":-1,"epoch":1}"#,
            r#"{"type":"SEALED"}"#,
            r#"{"type":"NOPE"}"#,
            r#"{"epoch":1}"#,
            r#"[1,2,3]"#,
            r#""SEAL""#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
