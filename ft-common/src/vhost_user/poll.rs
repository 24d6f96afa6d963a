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
//! The CPU guard (on unless the device turns it off) is what lets polling be on by default:
//! spinning only pays while a CPU would otherwise be idle. When the host has none, the spinning
//! thread takes its time slice from the frontend (the VM's vCPU) and the kernel's io_uring
//! workers, which then answer later; and a poller that is preempted leaves its rings unwatched
//! with notifications off, so a request waits for the poller's next time slice instead of
//! waking it. Every [`CHECK_EVERY`] the guard reads two counters:
//! - the host's CPU pressure (`/proc/pressure/cpu`, `some total`: time during which at least
//!   one runnable task waited for a CPU). Above [`HOST_PRESSURE_SHARE`] of the wall time, the
//!   host has no idle CPU to spin on, whoever is waiting, and polling stops. This is seen
//!   whether or not this thread polls, so on a saturated host polling stays off instead of
//!   being retried (and costing) after every pause.
//! - the worker thread's own run delay (`/proc/thread-self/schedstat`), above
//!   [`CONTENDED_SHARE`]: the thread itself waited (covers kernels without PSI, and CPU sets
//!   smaller than the host).
//!
//! Either one pauses polling (window 0) for a back-off that starts at [`BACKOFF_MIN`] and
//! doubles up to [`BACKOFF_MAX`] while the contention comes back (polling itself may be what
//! causes it), and lasts while the contention does. Polling comes back by itself once a CPU is
//! free again. A counter that cannot be read (no PSI, no `CONFIG_SCHED_INFO`) is ignored; with
//! neither the guard cannot see and stays open.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// First non-zero window, as in QEMU.
const START: Duration = Duration::from_micros(4);
/// How often the CPU guard looks at the run delay.
const CHECK_EVERY: Duration = Duration::from_millis(10);
/// The worker thread's run delay per wall time above which it counts as contended.
const CONTENDED_SHARE: f64 = 0.05;
/// Host CPU pressure (`some`) per wall time above which the host counts as having no idle
/// CPU. Short waits of the host's own background tasks stay well below it on an idle host.
const HOST_PRESSURE_SHARE: f64 = 0.10;
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

/// One reading of the guard's counters; None where a counter cannot be read.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    /// The worker thread's run delay so far, ns.
    run_delay_ns: Option<u64>,
    /// The host's CPU pressure `some total`, µs.
    host_some_us: Option<u64>,
}

/// Watches the host's CPU pressure and the worker thread's run delay; see the module docs.
#[derive(Debug)]
struct CpuGuard {
    /// `/proc/thread-self/schedstat`, opened on the worker thread at its first check; None
    /// before that, `Some(None)` if it cannot be read (the guard then stays open).
    schedstat: Option<Option<File>>,
    /// `/proc/pressure/cpu`, likewise.
    pressure: Option<Option<File>>,
    last_at: Option<Instant>,
    last: Sample,
    /// Polling is paused until then.
    paused_until: Option<Instant>,
    /// The last check that found the thread waiting for a CPU.
    last_contended: Option<Instant>,
    backoff: Duration,
    /// Times polling was paused.
    pauses: u64,
    /// Checks done, and those that found polling allowed (for the exit log).
    checks: u64,
    allowed: u64,
}

impl CpuGuard {
    fn new() -> Self {
        CpuGuard {
            schedstat: None,
            pressure: None,
            last_at: None,
            last: Sample::default(),
            paused_until: None,
            last_contended: None,
            backoff: BACKOFF_MIN,
            pauses: 0,
            checks: 0,
            allowed: 0,
        }
    }

    /// Reads both counters (opening the files on first use, on the calling thread).
    fn sample(&mut self) -> Sample {
        Sample {
            run_delay_ns: Self::read_field(
                &mut self.schedstat,
                "/proc/thread-self/schedstat",
                |t| {
                    // "<on-cpu ns> <run delay ns> <timeslices>"
                    t.split_whitespace().nth(1)?.parse().ok()
                },
            ),
            host_some_us: Self::read_field(&mut self.pressure, "/proc/pressure/cpu", |t| {
                // "some avg10=0.00 avg60=0.00 avg300=0.00 total=12345\nfull ..."
                t.lines()
                    .next()?
                    .strip_prefix("some ")?
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("total="))?
                    .parse()
                    .ok()
            }),
        }
    }

    fn read_field(
        file: &mut Option<Option<File>>,
        path: &str,
        parse: impl FnOnce(&str) -> Option<u64>,
    ) -> Option<u64> {
        let file = file.get_or_insert_with(|| File::open(path).ok()).as_ref()?;
        let mut buf = [0u8; 160];
        let n = file.read_at(&mut buf, 0).ok()?;
        parse(std::str::from_utf8(&buf[..n]).ok()?)
    }

    /// Whether polling is allowed at `now`; `sample` reads the counters, at most once per
    /// [`CHECK_EVERY`].
    fn allows(&mut self, now: Instant, sample: impl FnOnce(&mut Self) -> Sample) -> bool {
        let due = self
            .last_at
            .is_none_or(|t| now.saturating_duration_since(t) >= CHECK_EVERY);
        if due {
            let cur = sample(self);
            if let Some(t) = self.last_at {
                let wall_ns = now.saturating_duration_since(t).as_nanos() as f64;
                let share = |a: Option<u64>, b: Option<u64>, unit_ns: f64| match (a, b) {
                    (Some(a), Some(b)) => a.saturating_sub(b) as f64 * unit_ns / wall_ns,
                    _ => 0.0,
                };
                let own = share(cur.run_delay_ns, self.last.run_delay_ns, 1.0);
                let host = share(cur.host_some_us, self.last.host_some_us, 1000.0);
                let paused = self.paused_until.is_some_and(|p| now < p);
                if own > CONTENDED_SHARE || host > HOST_PRESSURE_SHARE {
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
            self.checks += 1;
            self.allowed += u64::from(self.paused_until.is_none_or(|p| now >= p));
            self.last_at = Some(now);
            self.last = Sample {
                run_delay_ns: cur.run_delay_ns.or(self.last.run_delay_ns),
                host_some_us: cur.host_some_us.or(self.last.host_some_us),
            };
        }
        self.paused_until.is_none_or(|p| now >= p)
    }
}

impl Drop for AdaptivePoll {
    /// Says at exit how much of the time the guard let the worker poll (the benchmarks'
    /// evidence of which regime the host was in).
    fn drop(&mut self) {
        if let (true, Some(g)) = (self.enabled(), self.guard.as_ref()) {
            log::info!(
                "polling (max {:?}): allowed at {} of {} CPU checks, paused {} times",
                self.max,
                g.allowed,
                g.checks,
                g.pauses
            );
        }
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
            Some(g) => g.allows(Instant::now(), CpuGuard::sample),
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

    /// Feeds the guard a run delay that grows by `share` of the wall time (host pressure
    /// unknown), one check every 10 ms from `t`; returns whether polling was allowed at each
    /// check.
    fn feed(g: &mut CpuGuard, t: &mut Instant, delay: &mut u64, share: f64, n: usize) -> Vec<bool> {
        (0..n)
            .map(|_| {
                *t += CHECK_EVERY;
                *delay += (CHECK_EVERY.as_nanos() as f64 * share) as u64;
                let d = *delay;
                g.allows(*t, |_| Sample {
                    run_delay_ns: Some(d),
                    host_some_us: None,
                })
            })
            .collect()
    }

    /// As [`feed`], with the host's CPU pressure growing by `share` of the wall time and the
    /// thread's own run delay unknown.
    fn feed_host(
        g: &mut CpuGuard,
        t: &mut Instant,
        some_us: &mut u64,
        share: f64,
        n: usize,
    ) -> Vec<bool> {
        (0..n)
            .map(|_| {
                *t += CHECK_EVERY;
                *some_us += (CHECK_EVERY.as_micros() as f64 * share) as u64;
                let s = *some_us;
                g.allows(*t, |_| Sample {
                    run_delay_ns: None,
                    host_some_us: Some(s),
                })
            })
            .collect()
    }

    #[test]
    fn guard_stays_off_while_the_host_has_no_idle_cpu() {
        let mut g = CpuGuard::new();
        let (mut t, mut some) = (Instant::now(), 0u64);
        // Idle host: background waits well under the threshold; polling allowed.
        assert!(feed_host(&mut g, &mut t, &mut some, 0.03, 10)
            .iter()
            .all(|&a| a));
        // Saturated (others wait 90% of the time, whether or not this thread polls): polling
        // stays off for as long as it lasts, as one pause, with no retries in between.
        let busy = feed_host(&mut g, &mut t, &mut some, 0.9, 500);
        assert!(busy.iter().all(|&a| !a));
        assert_eq!(g.pauses, 1);
        // The host calms down: polling resumes after the pause.
        let idle = feed_host(&mut g, &mut t, &mut some, 0.0, 6);
        assert_eq!(idle, [false, false, false, false, true, true]);
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
                Sample {
                    run_delay_ns: Some(0),
                    host_some_us: Some(0),
                }
            }));
        }
        assert_eq!(reads, 1);
        // No counters: never paused.
        let mut blind = CpuGuard::new();
        for i in 0..10u32 {
            assert!(blind.allows(t0 + i * 20 * MS, |_| Sample::default()));
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
    fn reads_this_threads_run_delay_and_the_host_pressure() {
        // Every Linux with schedstat / PSI has the files; where one is missing the guard
        // ignores that counter.
        let s = CpuGuard::new().sample();
        let has = |p: &str| std::fs::read_to_string(p).is_ok();
        assert_eq!(s.run_delay_ns.is_some(), has("/proc/thread-self/schedstat"));
        assert_eq!(s.host_some_us.is_some(), has("/proc/pressure/cpu"));
    }
}
