// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adaptive busy polling of a worker's queues (QEMU's `poll-max-ns` algorithm, plus a CPU
//! guard).
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
//!
//! The CPU guard (on unless the device turns it off): spinning only pays while a CPU would
//! otherwise be idle. When the host has none, the spinning thread takes its time slice from
//! the frontend (the VM's vCPU) and the kernel's io_uring workers, which then answer later.
//! The sign of that is the worker thread's own run delay (`/proc/thread-self/schedstat`, the
//! time it spent runnable but waiting for a CPU): it is checked every [`CHECK_EVERY`], and
//! when the thread waited for a CPU more than [`CONTENDED_SHARE`] of that period, polling stops
//! (window 0) for a back-off that starts at [`BACKOFF_MIN`] and doubles up to [`BACKOFF_MAX`]
//! while the contention lasts. Sleeping threads accumulate run delay only when woken, so the
//! check keeps working while polling is off, and polling comes back by itself once a CPU is
//! free again. Without schedstat (kernel without `CONFIG_SCHED_INFO`) the guard cannot see and
//! stays open.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// First non-zero window, as in QEMU.
const START: Duration = Duration::from_micros(4);
/// How often the CPU guard looks at the run delay.
const CHECK_EVERY: Duration = Duration::from_millis(10);
/// Run delay per wall time above which the host counts as having no idle CPU.
const CONTENDED_SHARE: f64 = 0.05;
/// First and longest pause of polling under CPU contention.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The adaptive window of one worker.
#[derive(Debug)]
pub(crate) struct AdaptivePoll {
    max: Duration,
    window: Duration,
    guard: Option<CpuGuard>,
}

/// Watches the worker thread's run delay; see the module docs.
#[derive(Debug)]
struct CpuGuard {
    /// `/proc/thread-self/schedstat`, opened on the worker thread at its first check; None
    /// before that, `Some(None)` if it cannot be read (the guard then stays open).
    schedstat: Option<Option<File>>,
    last_at: Option<Instant>,
    last_delay_ns: u64,
    /// Polling is paused until then.
    paused_until: Option<Instant>,
    /// The last check that found the thread waiting for a CPU.
    last_contended: Option<Instant>,
    backoff: Duration,
    /// Times polling was paused (tests).
    pauses: u64,
}

impl CpuGuard {
    fn new() -> Self {
        CpuGuard {
            schedstat: None,
            last_at: None,
            last_delay_ns: 0,
            paused_until: None,
            last_contended: None,
            backoff: BACKOFF_MIN,
            pauses: 0,
        }
    }

    /// The thread's run delay in ns so far, or None if it cannot be read.
    fn run_delay_ns(&mut self) -> Option<u64> {
        let file = self
            .schedstat
            .get_or_insert_with(|| File::open("/proc/thread-self/schedstat").ok())
            .as_ref()?;
        let mut buf = [0u8; 96];
        let n = file.read_at(&mut buf, 0).ok()?;
        // "<on-cpu ns> <run delay ns> <timeslices>"
        std::str::from_utf8(&buf[..n])
            .ok()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Whether polling is allowed at `now`; `delay_ns` reads the thread's run delay (None:
    /// unknown), at most once per [`CHECK_EVERY`].
    fn allows(&mut self, now: Instant, delay_ns: impl FnOnce(&mut Self) -> Option<u64>) -> bool {
        let due = self
            .last_at
            .is_none_or(|t| now.saturating_duration_since(t) >= CHECK_EVERY);
        if due {
            let d = delay_ns(self);
            if let (Some(d), Some(t)) = (d, self.last_at) {
                let wall = now.saturating_duration_since(t).as_nanos() as f64;
                let waited = d.saturating_sub(self.last_delay_ns) as f64;
                let paused = self.paused_until.is_some_and(|p| now < p);
                if waited > CONTENDED_SHARE * wall {
                    if !paused {
                        // Contended again soon after a pause ended: polling itself may be what
                        // takes the CPU, so pause longer each time.
                        if self
                            .last_contended
                            .is_some_and(|c| now.saturating_duration_since(c) < 2 * BACKOFF_MAX)
                        {
                            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                        }
                        self.pauses += 1;
                    }
                    // A pause lasts while the contention does.
                    self.paused_until = Some(now + self.backoff);
                    self.last_contended = Some(now);
                } else if self
                    .last_contended
                    .is_some_and(|c| now.saturating_duration_since(c) >= 2 * BACKOFF_MAX)
                {
                    self.backoff = BACKOFF_MIN;
                }
            }
            self.last_at = Some(now);
            self.last_delay_ns = d.unwrap_or(self.last_delay_ns);
        }
        self.paused_until.is_none_or(|p| now >= p)
    }
}

impl AdaptivePoll {
    /// Polling for at most `max` per idle period; `max == 0` disables polling. The CPU guard
    /// is on; see [`AdaptivePoll::with_cpu_guard`].
    pub(crate) fn new(max: Duration) -> Self {
        AdaptivePoll {
            max,
            window: Duration::ZERO,
            guard: Some(CpuGuard::new()),
        }
    }

    /// `false` polls whatever the host's load (for tests that must exercise polling on a busy
    /// machine, and for hosts with CPUs reserved for the device).
    pub(crate) fn with_cpu_guard(mut self, on: bool) -> Self {
        self.guard = on.then(CpuGuard::new);
        self
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
        if !self.enabled() {
            return;
        }
        let allowed = match self.guard.as_mut() {
            Some(g) => g.allows(Instant::now(), CpuGuard::run_delay_ns),
            None => true,
        };
        self.adjust(block, allowed);
    }

    /// QEMU's window rule, with polling forced off while the guard does not allow it.
    fn adjust(&mut self, block: Duration, allowed: bool) {
        if !allowed {
            self.window = Duration::ZERO;
            return;
        }
        if block <= self.window {
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
    const MS: Duration = Duration::from_millis(1);

    /// The window rule alone (the guard always allows).
    fn rule(max: Duration) -> AdaptivePoll {
        AdaptivePoll::new(max).with_cpu_guard(false)
    }

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
        let mut p = rule(32 * US);
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
        let mut p = rule(32 * US);
        p.record(10 * US);
        p.record(10 * US);
        assert_eq!(p.window(), 8 * US);
        p.record(3 * US);
        p.record(8 * US);
        assert_eq!(p.window(), 8 * US);
    }

    #[test]
    fn resets_when_the_wait_exceeds_max() {
        let mut p = rule(32 * US);
        for _ in 0..4 {
            p.record(20 * US);
        }
        assert_eq!(p.window(), 32 * US);
        p.record(33 * US);
        assert_eq!(p.window(), Duration::ZERO);
        p.record(Duration::from_secs(1));
        assert_eq!(p.window(), Duration::ZERO);
    }

    /// Feeds the guard a run delay that grows by `share` of the wall time, one check every
    /// 10 ms from `t`; returns whether polling was allowed at each check.
    fn feed(g: &mut CpuGuard, t: &mut Instant, delay: &mut u64, share: f64, n: usize) -> Vec<bool> {
        (0..n)
            .map(|_| {
                *t += CHECK_EVERY;
                *delay += (CHECK_EVERY.as_nanos() as f64 * share) as u64;
                let d = *delay;
                g.allows(*t, |_| Some(d))
            })
            .collect()
    }

    #[test]
    fn guard_pauses_polling_while_the_thread_waits_for_a_cpu() {
        let mut g = CpuGuard::new();
        let (mut t, mut delay) = (Instant::now(), 0u64);
        // An idle host: the thread never waits for a CPU; polling stays allowed.
        assert!(feed(&mut g, &mut t, &mut delay, 0.0, 5).iter().all(|&a| a));
        assert_eq!(g.pauses, 0);
        // Saturated: it waits 30% of the time. Paused from the first check for as long as it
        // lasts: one pause.
        let busy = feed(&mut g, &mut t, &mut delay, 0.3, 300);
        assert!(busy.iter().all(|&a| !a), "{busy:?}");
        assert_eq!(g.pauses, 1);
        // Free again: allowed once the pause (BACKOFF_MIN) is over.
        let idle = feed(&mut g, &mut t, &mut delay, 0.0, 6);
        assert_eq!(idle, [false, false, false, false, true, true]);
        // A little waiting (under the threshold) does not pause it.
        assert!(feed(&mut g, &mut t, &mut delay, 0.02, 20)
            .iter()
            .all(|&a| a));
    }

    #[test]
    fn guard_backs_off_when_polling_itself_brings_the_contention_back() {
        let mut g = CpuGuard::new();
        let (mut t, mut delay) = (Instant::now(), 0u64);
        feed(&mut g, &mut t, &mut delay, 0.0, 1);
        // Each time polling resumes, the next check finds the thread waiting again.
        let mut pauses = vec![];
        for _ in 0..6 {
            feed(&mut g, &mut t, &mut delay, 0.3, 1);
            let mut n = 0;
            while !feed(&mut g, &mut t, &mut delay, 0.0, 1)[0] {
                n += 1;
            }
            pauses.push(n);
        }
        // 50 ms, then doubling up to 1 s (in 10 ms checks, the last one allowed excluded).
        assert_eq!(pauses, [4, 9, 19, 39, 79, 99]);
        // Two seconds without contention reset the back-off.
        feed(&mut g, &mut t, &mut delay, 0.0, 200);
        feed(&mut g, &mut t, &mut delay, 0.3, 1);
        let mut n = 0;
        while !feed(&mut g, &mut t, &mut delay, 0.0, 1)[0] {
            n += 1;
        }
        assert_eq!(n, 4);
    }

    #[test]
    fn guard_checks_at_most_every_10ms_and_stays_open_when_blind() {
        let mut g = CpuGuard::new();
        let t0 = Instant::now();
        let mut reads = 0;
        for i in 0..100u32 {
            // 100 records within 1 ms: one read (the first).
            assert!(g.allows(t0 + i * 10 * US, |_| {
                reads += 1;
                Some(0)
            }));
        }
        assert_eq!(reads, 1);
        // No schedstat: never paused.
        let mut blind = CpuGuard::new();
        for i in 0..10u32 {
            assert!(blind.allows(t0 + i * 20 * MS, |_| None));
        }
    }

    #[test]
    fn a_paused_guard_turns_the_window_off() {
        let mut p = rule(32 * US);
        p.adjust(20 * US, true);
        assert_eq!(p.window(), 4 * US);
        p.adjust(20 * US, false);
        assert_eq!(p.window(), Duration::ZERO);
        p.adjust(20 * US, true);
        assert_eq!(p.window(), 4 * US);
    }

    #[test]
    fn reads_this_threads_run_delay() {
        // Every Linux with schedstat has the file; where it is missing the guard stays open.
        let mut g = CpuGuard::new();
        if std::path::Path::new("/proc/thread-self/schedstat").exists() {
            assert!(g.run_delay_ns().is_some());
        } else {
            assert!(g.run_delay_ns().is_none());
        }
    }
}
