// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A tiny rate limiter for log lines about guest or frontend input.
//!
//! Anything a guest or frontend controls can happen millions of times a second; a log line per
//! occurrence fills the disk (100 MB/s of ERROR lines were seen from one spinning ring). Every
//! such log goes through a [`RateLimit`]: at most [`BURST`] lines per interval per call site,
//! and the next line that gets through says how many were suppressed.
//!
//! Lock-free (two atomics), usable in a `static`:
//! ```
//! use ft_common::ratelimit::RateLimit;
//! static BAD_RING: RateLimit = RateLimit::new();
//! if let Some(suppressed) = BAD_RING.check() {
//!     log::warn!("bad ring ({suppressed} similar suppressed)");
//! }
//! ```
//! or with the [`guest_warn!`](crate::guest_warn) macro, which declares the static itself.

#[doc(hidden)]
pub use log as __log;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Default interval between two lines of one call site.
pub const INTERVAL_MS: u64 = 1000;

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // +1 so that 0 means "never logged".
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// At most [`BURST`] events per [`INTERVAL_MS`] pass; the others are counted.
#[derive(Debug, Default)]
pub struct RateLimit {
    window_ms: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

/// Lines one call site may log per interval (a normal frontend's few errors in a row all show).
pub const BURST: u64 = 10;

impl RateLimit {
    /// A limiter that lets the first events through.
    pub const fn new() -> Self {
        RateLimit {
            window_ms: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Some(number suppressed since the last line that passed) if this event may be logged,
    /// else None. Approximate under concurrent callers (never more than a few extra lines).
    pub fn check(&self) -> Option<u64> {
        let now = now_ms();
        let start = self.window_ms.load(Ordering::Relaxed);
        if start == 0 || now.saturating_sub(start) >= INTERVAL_MS {
            if self
                .window_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.count.store(1, Ordering::Relaxed);
                return Some(self.suppressed.swap(0, Ordering::Relaxed));
            }
        } else if self.count.fetch_add(1, Ordering::Relaxed) < BURST {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// `log::warn!` for events caused by guest or frontend input, rate limited per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(n) = LIMIT.check() {
            if n > 0 {
                $crate::ratelimit::__log::warn!("{} ({n} similar suppressed)", format_args!($($arg)+));
            } else {
                $crate::ratelimit::__log::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_interval_and_counts_the_rest() {
        let l = RateLimit::new();
        for _ in 0..BURST {
            assert_eq!(l.check(), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.check(), None);
        }
        // Pretend the interval passed (0 means "never": also lets the next one through).
        l.window_ms
            .store(now_ms().saturating_sub(INTERVAL_MS), Ordering::Relaxed);
        assert_eq!(l.check(), Some(1000));
        assert_eq!(l.check(), Some(0));
    }
}
