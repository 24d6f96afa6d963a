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
//! waking it. The question is "would another task want the CPU this thread spins on"; every
//! [`CHECK_EVERY`] the guard reads three counters and answers it with [`Load::contended`]:
//! - the worker thread's own run delay (`/proc/thread-self/schedstat`), above
//!   [`CONTENDED_SHARE`]: the thread itself waited for a CPU (covers kernels without PSI, and
//!   CPU sets smaller than the host);
//! - the host's CPU pressure (`/proc/pressure/cpu`, `some total`: time during which at least
//!   one runnable task waited for a CPU), above [`HOST_PRESSURE_SHARE`] of the wall time,
//! - together with the spare CPU time below [`SPARE_CPUS_MIN`]: the host's idle time
//!   (`/proc/uptime`, all CPUs) plus this thread's own run time (what it spins would be idle
//!   if it slept), per wall time.
//!
//! Pressure alone is the wrong answer on a small host: the frontend and this worker wake each
//! other for every request at queue depth 1, and the two of them alone kept an otherwise quiet
//! 2-CPU host at 9-10% `some` with polling off (docs/benchmarks.md, round 3), most likely
//! wakeups placed on a CPU that was still busy while the other stood idle. Waiting while CPUs
//! stand idle is placement, not a shortage; waiting with no idle CPU is a shortage, whoever
//! waits. Both are seen whether or not this thread polls, so on a saturated host polling stays
//! off instead of being retried (and costing) after every pause.
//!
//! Contention pauses polling (window 0) for a back-off that starts at [`BACKOFF_MIN`] and
//! doubles up to [`BACKOFF_MAX`] while the contention comes back (polling itself may be what
//! causes it), and lasts while the contention does. Polling comes back by itself once a CPU is
//! free again. A counter that cannot be read (no PSI, no `CONFIG_SCHED_INFO`) is ignored; with
//! none the guard cannot see and stays open.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// First non-zero window, as in QEMU.
const START: Duration = Duration::from_micros(4);
/// How often the CPU guard reads its counters. The idle time has 10 ms resolution (for all
/// CPUs together), so a shorter interval would blur it.
const CHECK_EVERY: Duration = Duration::from_millis(50);
/// The worker thread's run delay per wall time above which it counts as contended.
const CONTENDED_SHARE: f64 = 0.05;
/// Host CPU pressure (`some`) per wall time above which the host may have no idle CPU (it
/// has none if, besides, less than [`SPARE_CPUS_MIN`] was spare). Short waits of the host's
/// own background tasks stay well below it on an idle host.
const HOST_PRESSURE_SHARE: f64 = 0.10;
/// Spare CPU time (idle, or this thread's own) per wall time, in CPUs, below which the
/// waiting that the pressure counts is taken as a host without a CPU to spare. A poller spins
/// a whole CPU: it needs about one that is idle or already its own. Counting its own time
/// keeps a poller that has a core to itself (idle time about 0.5 CPU beside a frontend on the
/// other core of 2) from mistaking itself for contention; on a host that is saturated, the
/// thread gets at most a share of a CPU and nothing is idle.
const SPARE_CPUS_MIN: f64 = 0.9;
/// First and longest pause of polling under CPU contention.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
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
    /// The worker thread's time on a CPU so far, ns.
    run_ns: Option<u64>,
    /// The worker thread's run delay so far, ns.
    run_delay_ns: Option<u64>,
    /// The host's CPU pressure `some total`, µs.
    host_some_us: Option<u64>,
    /// Idle time of all the host's CPUs together since boot (`/proc/uptime`), 10 ms units.
    host_idle_cs: Option<u64>,
}

/// What the guard saw over one check interval; None where a counter cannot be read.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Load {
    /// The worker thread's run delay per wall time.
    pub own_delay: Option<f64>,
    /// The host's CPU pressure (`some`) per wall time.
    pub host_pressure: Option<f64>,
    /// Idle time of all CPUs plus the worker thread's run time, per wall time: how many CPUs
    /// were idle or this thread's on average.
    pub spare_cpus: Option<f64>,
}

impl Load {
    /// The shares between two samples `wall` apart.
    fn between(prev: &Sample, cur: &Sample, wall: Duration) -> Load {
        let wall_ns = wall.as_nanos().max(1) as f64;
        let share = |a: Option<u64>, b: Option<u64>, unit_ns: f64| match (a, b) {
            (Some(a), Some(b)) => Some(a.saturating_sub(b) as f64 * unit_ns / wall_ns),
            _ => None,
        };
        Load {
            own_delay: share(cur.run_delay_ns, prev.run_delay_ns, 1.0),
            host_pressure: share(cur.host_some_us, prev.host_some_us, 1e3),
            spare_cpus: share(cur.host_idle_cs, prev.host_idle_cs, 1e7)
                .map(|idle| idle + share(cur.run_ns, prev.run_ns, 1.0).unwrap_or(0.0)),
        }
    }

    /// Whether another task would want the CPU a poller spins on: the decision of the guard.
    ///
    /// - The worker itself waited for a CPU (above [`CONTENDED_SHARE`]): yes.
    /// - Some task waited (host pressure above [`HOST_PRESSURE_SHARE`]) while less than
    ///   [`SPARE_CPUS_MIN`] of a CPU was idle or this thread's: yes, the host has no CPU to
    ///   spare.
    /// - Tasks waited although CPUs stood idle: no. These are the short waits of wakeups that
    ///   the scheduler places on a busy CPU (the worker waking the frontend on its own CPU
    ///   and going on for a few µs): the frontend and this daemon alone keep an otherwise idle
    ///   2-CPU host at 9-10% pressure without polling. Counted, they would forbid polling
    ///   exactly where it pays.
    /// - Without the pressure counter, spare CPU time alone decides; with neither, never.
    pub(crate) fn contended(&self) -> bool {
        if self.own_delay.is_some_and(|d| d > CONTENDED_SHARE) {
            return true;
        }
        let no_idle_cpu = self.spare_cpus.map(|i| i < SPARE_CPUS_MIN);
        match (self.host_pressure, no_idle_cpu) {
            (Some(p), Some(no_idle)) => p > HOST_PRESSURE_SHARE && no_idle,
            (Some(p), None) => p > HOST_PRESSURE_SHARE,
            (None, Some(no_idle)) => no_idle,
            (None, None) => false,
        }
    }
}

/// Watches the host's CPU pressure and idle time and the worker thread's run delay; see the
/// module docs.
#[derive(Debug)]
struct CpuGuard {
    /// `/proc/thread-self/schedstat`, opened on the worker thread at its first check; None
    /// before that, `Some(None)` if it cannot be read (the guard then ignores it).
    schedstat: Option<Option<File>>,
    /// `/proc/pressure/cpu`, likewise.
    pressure: Option<Option<File>>,
    /// `/proc/uptime`, likewise.
    uptime: Option<Option<File>>,
    last_at: Option<Instant>,
    last: Sample,
    /// Polling is paused until then.
    paused_until: Option<Instant>,
    /// The last check that found the host contended.
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
            uptime: None,
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

    /// Reads the counters (opening the files on first use, on the calling thread).
    fn sample(&mut self) -> Sample {
        let own = Self::read_field(&mut self.schedstat, "/proc/thread-self/schedstat", |t| {
            // "<on-cpu ns> <run delay ns> <timeslices>"
            let mut f = t.split_whitespace().map(|v| v.parse::<u64>().ok());
            Some((f.next()??, f.next()??))
        });
        Sample {
            run_ns: own.map(|o| o.0),
            run_delay_ns: own.map(|o| o.1),
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
            host_idle_cs: Self::read_field(&mut self.uptime, "/proc/uptime", parse_uptime_idle),
        }
    }

    fn read_field<T>(
        file: &mut Option<Option<File>>,
        path: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
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
                let load = Load::between(&self.last, &cur, now.saturating_duration_since(t));
                let paused = self.paused_until.is_some_and(|p| now < p);
                if load.contended() {
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
                run_ns: cur.run_ns.or(self.last.run_ns),
                run_delay_ns: cur.run_delay_ns.or(self.last.run_delay_ns),
                host_some_us: cur.host_some_us.or(self.last.host_some_us),
                host_idle_cs: cur.host_idle_cs.or(self.last.host_idle_cs),
            };
        }
        self.paused_until.is_none_or(|p| now >= p)
    }
}

/// The idle time of `/proc/uptime` ("<uptime s> <idle s>", both with two decimals: the idle
/// time of all CPUs together) in 10 ms units.
fn parse_uptime_idle(t: &str) -> Option<u64> {
    let idle = t.split_whitespace().nth(1)?;
    let (s, frac) = idle.split_once('.').unwrap_or((idle, "0"));
    let cs: u64 = frac.get(..2).unwrap_or(frac).parse().ok()?;
    let cs = if frac.len() == 1 { cs * 10 } else { cs };
    s.parse::<u64>().ok()?.checked_mul(100)?.checked_add(cs)
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

    /// Feeds the guard a run delay that grows by `share` of the wall time (host counters
    /// unknown), one check every [`CHECK_EVERY`] from `t`; returns whether polling was allowed
    /// at each check.
    fn feed(g: &mut CpuGuard, t: &mut Instant, delay: &mut u64, share: f64, n: usize) -> Vec<bool> {
        (0..n)
            .map(|_| {
                *t += CHECK_EVERY;
                *delay += (CHECK_EVERY.as_nanos() as f64 * share) as u64;
                let d = *delay;
                g.allows(*t, |_| Sample {
                    run_delay_ns: Some(d),
                    ..Sample::default()
                })
            })
            .collect()
    }

    /// The host's counters at one moment: CPU pressure (`some`, µs) and idle time (10 ms
    /// units), both cumulative.
    #[derive(Default)]
    struct Host {
        some_us: u64,
        idle_cs: u64,
    }

    /// As [`feed`], with the host's CPU pressure growing by `pressure` of the wall time and
    /// `idle_cpus` CPUs idle on average, the thread's own run time and delay unknown.
    fn feed_host(
        g: &mut CpuGuard,
        t: &mut Instant,
        h: &mut Host,
        pressure: f64,
        idle_cpus: f64,
        n: usize,
    ) -> Vec<bool> {
        (0..n)
            .map(|_| {
                *t += CHECK_EVERY;
                h.some_us += (CHECK_EVERY.as_micros() as f64 * pressure) as u64;
                h.idle_cs += (CHECK_EVERY.as_millis() as f64 / 10.0 * idle_cpus).round() as u64;
                let (s, i) = (h.some_us, h.idle_cs);
                g.allows(*t, |_| Sample {
                    host_some_us: Some(s),
                    host_idle_cs: Some(i),
                    ..Sample::default()
                })
            })
            .collect()
    }

    /// The decision alone, over the shares the guard derives from its counters.
    #[test]
    fn contended_means_some_task_would_want_the_cpu() {
        let load = |own: Option<f64>, pressure: Option<f64>, spare: Option<f64>| Load {
            own_delay: own,
            host_pressure: pressure,
            spare_cpus: spare,
        };
        // An idle 2-CPU host running only the benchmark's client and this daemon, polling
        // off: wakeups placed on a busy CPU make 9-12% pressure while 1.4 CPUs stand idle
        // (and this thread runs 0.3 of one).
        assert!(!load(Some(0.01), Some(0.12), Some(1.7)).contended());
        // The same while this thread spins a CPU (half of the other one idle), even if
        // tasks waited meanwhile.
        assert!(!load(Some(0.0), Some(0.15), Some(1.5)).contended());
        // A host whose CPUs are all busy, nobody waiting (a vCPU spinning beside us): free.
        assert!(!load(Some(0.0), Some(0.02), Some(0.0)).contended());
        // Saturated (`stress-ng --cpu 2` on 2 CPUs), polling or not: no idle CPU, waiting, and
        // this thread gets a share of a CPU at most.
        assert!(load(Some(0.0), Some(0.95), Some(0.3)).contended());
        assert!(load(None, Some(0.95), Some(0.8)).contended());
        assert!(load(None, Some(0.6), Some(0.2)).contended());
        // The thread itself waits for a CPU: contended whatever the host says.
        assert!(load(Some(0.3), Some(0.0), Some(1.5)).contended());
        assert!(!load(Some(0.04), None, None).contended());
        // One counter missing: the other decides.
        assert!(load(None, Some(0.2), None).contended());
        assert!(!load(None, Some(0.05), None).contended());
        assert!(load(None, None, Some(0.1)).contended());
        assert!(!load(None, None, Some(1.2)).contended());
        // Blind: never contended.
        assert!(!Load::default().contended());
    }

    #[test]
    fn load_is_the_counters_growth_per_wall_time() {
        let prev = Sample {
            run_ns: Some(2_000_000),
            run_delay_ns: Some(1_000_000),
            host_some_us: Some(5_000),
            host_idle_cs: Some(700),
        };
        let cur = Sample {
            run_ns: Some(32_000_000),
            run_delay_ns: Some(6_000_000),
            host_some_us: Some(25_000),
            host_idle_cs: Some(714),
        };
        let l = Load::between(&prev, &cur, Duration::from_millis(100));
        assert_eq!(l.own_delay, Some(0.05));
        assert_eq!(l.host_pressure, Some(0.2));
        // 1.4 CPUs idle plus 0.3 of one run by this thread.
        assert!((l.spare_cpus.unwrap() - 1.7).abs() < 1e-9, "{l:?}");
        // Without the thread's run time, the idle time alone.
        let no_run = Sample {
            run_ns: None,
            ..cur
        };
        assert!(
            (Load::between(&prev, &no_run, Duration::from_millis(100))
                .spare_cpus
                .unwrap()
                - 1.4)
                .abs()
                < 1e-9
        );
        let blind = Load::between(&Sample::default(), &cur, Duration::from_millis(100));
        assert_eq!(blind, Load::default());
    }

    #[test]
    fn parses_the_idle_time_of_proc_uptime() {
        assert_eq!(parse_uptime_idle("21802.31 42587.09\n"), Some(4_258_709));
        assert_eq!(parse_uptime_idle("1.00 3.5\n"), Some(350));
        assert_eq!(parse_uptime_idle("1.00 7\n"), Some(700));
        assert_eq!(parse_uptime_idle("1.00\n"), None);
        assert_eq!(parse_uptime_idle("1.00 x.y\n"), None);
    }

    #[test]
    fn guard_stays_off_while_the_host_has_no_idle_cpu() {
        let mut g = CpuGuard::new();
        let (mut t, mut h) = (Instant::now(), Host::default());
        // Idle host: background waits well under the threshold; polling allowed.
        assert!(feed_host(&mut g, &mut t, &mut h, 0.03, 1.8, 10)
            .iter()
            .all(|&a| a));
        // Saturated (others wait 90% of the time and no CPU is idle, whether or not this
        // thread polls): polling stays off for as long as it lasts, as one pause, with no
        // retries in between.
        let busy = feed_host(&mut g, &mut t, &mut h, 0.9, 0.0, 100);
        assert!(busy.iter().all(|&a| !a));
        assert_eq!(g.pauses, 1);
        // The host calms down: polling resumes after the pause (BACKOFF_MIN).
        let idle = feed_host(&mut g, &mut t, &mut h, 0.0, 1.0, 4);
        assert_eq!(idle, [false, true, true, true]);
    }

    /// The regression of the first guard: the benchmark's own client and daemon make 9-12%
    /// pressure on an idle 2-CPU host, which paused polling for good.
    #[test]
    fn guard_polls_when_tasks_wait_beside_an_idle_cpu() {
        let mut g = CpuGuard::new();
        let (mut t, mut h) = (Instant::now(), Host::default());
        let allowed = feed_host(&mut g, &mut t, &mut h, 0.12, 1.4, 100);
        assert!(allowed.iter().all(|&a| a));
        assert_eq!(g.pauses, 0);
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
        let busy = feed(&mut g, &mut t, &mut delay, 0.3, 60);
        assert!(busy.iter().all(|&a| !a), "{busy:?}");
        assert_eq!(g.pauses, 1);
        // Free again: allowed once the pause (BACKOFF_MIN) is over.
        let idle = feed(&mut g, &mut t, &mut delay, 0.0, 4);
        assert_eq!(idle, [false, true, true, true]);
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
        for _ in 0..5 {
            feed(&mut g, &mut t, &mut delay, 0.3, 1);
            let mut n = 0;
            while !feed(&mut g, &mut t, &mut delay, 0.0, 1)[0] {
                n += 1;
            }
            pauses.push(n);
        }
        // 100 ms, then doubling up to 1 s (in 50 ms checks, the last one allowed excluded).
        assert_eq!(pauses, [1, 3, 7, 15, 19]);
        // Two seconds without contention reset the back-off.
        feed(&mut g, &mut t, &mut delay, 0.0, 40);
        feed(&mut g, &mut t, &mut delay, 0.3, 1);
        let mut n = 0;
        while !feed(&mut g, &mut t, &mut delay, 0.0, 1)[0] {
            n += 1;
        }
        assert_eq!(n, 1);
    }

    #[test]
    fn guard_checks_at_most_every_check_interval_and_stays_open_when_blind() {
        let mut g = CpuGuard::new();
        let t0 = Instant::now();
        let mut reads = 0;
        for i in 0..100u32 {
            // 100 records within 1 ms: one read (the first).
            assert!(g.allows(t0 + i * 10 * US, |_| {
                reads += 1;
                Sample {
                    run_ns: Some(0),
                    run_delay_ns: Some(0),
                    host_some_us: Some(0),
                    host_idle_cs: Some(0),
                }
            }));
        }
        assert_eq!(reads, 1);
        // No counters: never paused.
        let mut blind = CpuGuard::new();
        for i in 0..10u32 {
            assert!(blind.allows(t0 + i * 60 * MS, |_| Sample::default()));
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
    fn reads_this_threads_run_delay_and_the_host_pressure_and_idle_time() {
        // Every Linux with schedstat / PSI has the files; where one is missing the guard
        // ignores that counter.
        let s = CpuGuard::new().sample();
        let has = |p: &str| std::fs::read_to_string(p).is_ok();
        assert_eq!(s.run_delay_ns.is_some(), has("/proc/thread-self/schedstat"));
        assert_eq!(s.run_ns.is_some(), s.run_delay_ns.is_some());
        assert_eq!(s.host_some_us.is_some(), has("/proc/pressure/cpu"));
        assert_eq!(s.host_idle_cs.is_some(), has("/proc/uptime"));
    }
}
