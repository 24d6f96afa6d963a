//! Adaptive busy polling of a worker's queues (QEMU's `poll-max-ns` algorithm).
//!
//! Why: waking a sleeping thread is the most expensive thing a request does on a virtual
//! machine host. A worker that sleeps in `epoll_wait` after every batch pays a wakeup for the
//! next kick, and the frontend pays one for the next call, so request and reply go in lockstep
//! and both sides idle half the time. Spinning on the rings for a few microseconds after a
//! batch catches the next request without either wakeup, and with ring notifications left
//! disabled meanwhile the frontend does not even kick.
//!
//! Spinning costs a CPU, so the window adapts to what polling achieves, as in QEMU's
//! `aio_poll` (util/aio-posix.c, `adjust_polling_time`): `block` is how long a loop iteration
//! waited for work, polling plus sleeping.
//! - `block <= window`: polling found the work in time; keep the window.
//! - `block > max`: even the longest window would have missed; stop polling (window 0).
//! - otherwise the work came a little too late: grow the window (4 µs, then doubling, up to
//!   `max`).
//!
//! So a busy queue polls, an idle one (next request more than `max` away) sleeps at once, and
//! the CPU spent spinning per idle period is bounded by `max`.

use std::time::Duration;

/// First non-zero window, as in QEMU.
const START: Duration = Duration::from_micros(4);

/// The adaptive window of one worker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdaptivePoll {
    max: Duration,
    window: Duration,
}

impl AdaptivePoll {
    /// Polling for at most `max` per idle period; `max == 0` disables polling.
    pub(crate) fn new(max: Duration) -> Self {
        AdaptivePoll {
            max,
            window: Duration::ZERO,
        }
    }

    /// Whether polling is configured at all.
    pub(crate) fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// How long to poll before sleeping this time (0: sleep at once).
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// One loop iteration waited `block` for its work (polling and sleeping).
    pub(crate) fn record(&mut self, block: Duration) {
        if !self.enabled() || block <= self.window {
            return;
        }
        if block > self.max {
            self.window = Duration::ZERO;
        } else if self.window < self.max {
            self.window = if self.window.is_zero() {
                START
            } else {
                self.window * 2
            }
            .min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn disabled_never_polls() {
        let mut p = AdaptivePoll::new(Duration::ZERO);
        for b in [0, 1, 5, 100] {
            p.record(b * US);
            assert_eq!(p.window(), Duration::ZERO);
        }
    }

    #[test]
    fn grows_from_4us_doubling_up_to_max() {
        let mut p = AdaptivePoll::new(32 * US);
        let mut seen = vec![];
        for _ in 0..6 {
            // Work came just within max but after the window: grow.
            p.record(30 * US);
            seen.push(p.window().as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn keeps_window_when_polling_succeeds() {
        let mut p = AdaptivePoll::new(32 * US);
        p.record(10 * US);
        p.record(10 * US);
        assert_eq!(p.window(), 8 * US);
        p.record(3 * US);
        p.record(8 * US);
        assert_eq!(p.window(), 8 * US);
    }

    #[test]
    fn resets_when_the_wait_exceeds_max() {
        let mut p = AdaptivePoll::new(32 * US);
        for _ in 0..4 {
            p.record(20 * US);
        }
        assert_eq!(p.window(), 32 * US);
        p.record(33 * US);
        assert_eq!(p.window(), Duration::ZERO);
        p.record(Duration::from_secs(1));
        assert_eq!(p.window(), Duration::ZERO);
    }
}
