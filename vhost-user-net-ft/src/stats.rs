// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Data-path counters and a rate-limited logger.
//!
//! The data path never panics on guest input: bad frames are dropped, counted here, and logged at
//! most once per [`LOG_INTERVAL`] per kind so that a misbehaving guest cannot flood the log.
//! Counters are relaxed atomics: they are read by status reporting from another thread and only
//! need to be eventually consistent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Minimum time between two log lines of the same kind.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// TX chain shorter than the virtio-net header.
    ShortHeader,
    /// TX header with unknown flags/GSO type, or offsets outside the frame.
    BadHeader,
    /// Frame larger than the maximum frame size (TX) or than the guest's buffer (RX, no MRG_RXBUF).
    Oversized,
    /// Frame shorter than an Ethernet header.
    Runt,
    /// Descriptor with the wrong direction or outside guest memory.
    BadDescriptor,
    /// The tap refused the frame.
    TapError,
    /// The hold buffer could not take the frame (larger than the whole buffer), or the guest
    /// memory under it was truncated by the frontend while it was copied.
    HoldRefused,
    /// An RX frame was waiting for buffers when its ring was stopped or the device reset.
    Reset,
}

const KINDS: usize = 8;

impl DropReason {
    fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ShortHeader => "short virtio-net header",
            DropReason::BadHeader => "invalid virtio-net header",
            DropReason::Oversized => "oversized frame",
            DropReason::Runt => "frame shorter than an Ethernet header",
            DropReason::BadDescriptor => "bad descriptor",
            DropReason::TapError => "tap write failed",
            DropReason::HoldRefused => "hold buffer refused the frame",
            DropReason::Reset => "ring stopped while the frame waited for buffers",
        }
    }
}

/// Per-direction counters.
#[derive(Debug, Default)]
pub struct DirCounters {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    dropped: [AtomicU64; KINDS],
}

impl DirCounters {
    pub fn count_frame(&self, bytes: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_drop(&self, why: DropReason) {
        self.dropped[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, why: DropReason) -> u64 {
        self.dropped[why.index()].load(Ordering::Relaxed)
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}

/// Counters of one daemon (all queues).
#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx: DirCounters,
    pub rx: DirCounters,
    /// Frames released to the tap by commits.
    pub committed_frames: AtomicU64,
    /// Frames discarded by ABORT.
    pub aborted_frames: AtomicU64,
    /// Times the TX path stopped because the hold buffer was full.
    pub backpressure_stalls: AtomicU64,
    log: RateLimitedLog,
}

impl NetCounters {
    /// Counts a dropped frame and logs it, rate limited.
    pub fn drop_tx(&self, why: DropReason, detail: std::fmt::Arguments<'_>) {
        self.tx.count_drop(why);
        self.log.warn("tx", why, detail);
    }

    pub fn drop_rx(&self, why: DropReason, detail: std::fmt::Arguments<'_>) {
        self.rx.count_drop(why);
        self.log.warn("rx", why, detail);
    }
}

/// Logs at most one line per kind per [`LOG_INTERVAL`], reporting how many were suppressed.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    state: Mutex<[(Option<Instant>, u64); KINDS]>,
}

impl RateLimitedLog {
    pub fn warn(&self, dir: &str, why: DropReason, detail: std::fmt::Arguments<'_>) {
        // Only reached on the (rare) drop path, so a mutex is fine here.
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (last, suppressed) = &mut state[why.index()];
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < LOG_INTERVAL) {
            *suppressed += 1;
            return;
        }
        let n = std::mem::take(suppressed);
        *last = Some(now);
        drop(state);
        if n > 0 {
            log::warn!(
                "{dir}: dropped frame: {}: {detail} ({n} similar suppressed)",
                why.as_str()
            );
        } else {
            log::warn!("{dir}: dropped frame: {}: {detail}", why.as_str());
        }
    }

    #[cfg(test)]
    fn suppressed(&self, why: DropReason) -> u64 {
        self.state.lock().unwrap()[why.index()].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_counted_and_logs_rate_limited() {
        let c = NetCounters::default();
        for _ in 0..10 {
            c.drop_tx(DropReason::Oversized, format_args!("x"));
        }
        c.drop_tx(DropReason::ShortHeader, format_args!("y"));
        assert_eq!(c.tx.dropped(DropReason::Oversized), 10);
        assert_eq!(c.tx.dropped_total(), 11);
        // First one logged, the other nine suppressed within the interval.
        assert_eq!(c.log.suppressed(DropReason::Oversized), 9);
        assert_eq!(c.log.suppressed(DropReason::ShortHeader), 0);
    }
}
