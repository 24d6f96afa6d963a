// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The commit deadline of lease arbitration (`COMMIT`'s optional `deadline`, see
//! `docs/architecture.md`, "Arbitration on etcd").
//!
//! A coordinator that holds the primary's key in etcd sends every `COMMIT` with a deadline
//! derived from its lease: a point on this host's `CLOCK_MONOTONIC`, in microseconds. The
//! daemons run on the coordinator's host (the control socket is a unix socket), so both ends
//! read the same clock: no wall clock and no cross-host clock comparison is involved.
//!
//! Invariant: a daemon *starts* a commit only while `now <= deadline`; a `COMMIT` that arrives
//! (or is dequeued) later is answered `ERROR DEADLINE_PASSED` and releases nothing. A `COMMIT`
//! without a deadline (a coordinator without `--etcd`, or an older one) is not limited. The
//! check is the gate core's (`GateCore::admit_commit`), the one place a COMMIT is admitted.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// A point on `CLOCK_MONOTONIC`, microseconds since the clock's (boot-time) origin. Shared by
/// every process of one host and never stepped by NTP or the operator; it stops while the host
/// is suspended, which can only make a deadline later than the lease (see the timing argument).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MonotonicTime(pub u64);

impl MonotonicTime {
    /// The current `CLOCK_MONOTONIC` time.
    pub fn now() -> MonotonicTime {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass and nothing else; CLOCK_MONOTONIC
        // always exists on Linux, so it cannot fail.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        MonotonicTime((ts.tv_sec as u64).saturating_mul(1_000_000) + ts.tv_nsec as u64 / 1_000)
    }

    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> MonotonicTime {
        MonotonicTime(
            self.0
                .saturating_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        )
    }

    /// `self - d`, saturating at the clock's origin.
    pub fn minus(self, d: Duration) -> MonotonicTime {
        MonotonicTime(
            self.0
                .saturating_sub(u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        )
    }

    /// How long from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: MonotonicTime) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for MonotonicTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:06} s (CLOCK_MONOTONIC)",
            self.0 / 1_000_000,
            self.0 % 1_000_000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward() {
        let a = MonotonicTime::now();
        std::thread::sleep(Duration::from_millis(2));
        let b = MonotonicTime::now();
        assert!(b.since(a) >= Duration::from_millis(2), "{a} {b}");
        assert_eq!(a.since(b), Duration::ZERO);
        assert_eq!(
            a.plus(Duration::from_secs(1)).minus(Duration::from_secs(1)),
            a
        );
    }
}
