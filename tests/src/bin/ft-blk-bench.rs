// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ft-blk-bench: VM-less benchmark of any vhost-user-blk backend.
//!
//! One thread drives every queue with asynchronous requests (fixed queue depth per queue),
//! drains all completions on each wakeup and resubmits at once, so the client stays cheap
//! next to the backend (its CPU use is reported next to the backend's when `--backend-pid` is
//! given). Latency is measured per request from submission to the drain that saw it, into an
//! HdrHistogram. Read workloads run on a region pre-filled with non-zero data, so they hit
//! allocated blocks.

use std::io;
use std::time::{Duration, Instant};

use clap::Parser;
use ft_tests::blk_client::{BlkClient, BufId, ClientOptions, DEFAULT_FEATURES};
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "ft-blk-bench",
    about = "Benchmark a vhost-user-blk backend without a VM",
    long_about = "Connects to a vhost-user-blk socket and runs fio-like workloads from one \
                  thread. Workloads: randread4k-qd1, randwrite4k-qd1, randread4k-qd32, \
                  randwrite4k-qd32, seqread128k-qd8, seqwrite128k-qd8, randwrite4k-flush-qd1 \
                  (write, then FLUSH once it completed; the pair is one op). Queue depth is per \
                  queue. Build with --release for measurements."
)]
struct Args {
    /// vhost-user-blk Unix socket of the backend.
    #[arg(long)]
    socket: String,
    /// Comma-separated workloads to run, in order ("all" for every one).
    #[arg(long, default_value = "all")]
    workloads: String,
    /// Measured seconds per workload (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Unmeasured warm-up seconds at the start of each workload.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Number of virtqueues; each runs the workload at the full queue depth.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Descriptors per virtqueue (a request takes 3, so >= 3 x queue depth).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Region of the disk to use, from offset 0 (suffixes K, M, G; default: whole disk up to 1G).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Do not pre-fill the region before read workloads.
    #[arg(long)]
    no_prefill: bool,
    /// Busy-poll the used rings instead of sleeping on the call eventfds.
    #[arg(long)]
    poll: bool,
    /// Process id of the backend, to report its CPU use next to the client's.
    #[arg(long)]
    backend_pid: Option<u32>,
    /// Label written into the JSON output (e.g. the backend name).
    #[arg(long, default_value = "")]
    label: String,
    /// Seed of the offset generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        Some('t' | 'T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    Random,
    Sequential,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    write: bool,
    pattern: Pattern,
    block_size: usize,
    depth: usize,
    /// Each op is a write followed by a FLUSH once the write completed (the commit pattern);
    /// latency and IOPS count the pair.
    flush: bool,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "randread4k-qd1",
        write: false,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 1,
        flush: false,
    },
    Workload {
        name: "randwrite4k-qd1",
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 1,
        flush: false,
    },
    Workload {
        name: "randread4k-qd32",
        write: false,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 32,
        flush: false,
    },
    Workload {
        name: "randwrite4k-qd32",
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 32,
        flush: false,
    },
    Workload {
        name: "seqread128k-qd8",
        write: false,
        pattern: Pattern::Sequential,
        block_size: 128 << 10,
        depth: 8,
        flush: false,
    },
    Workload {
        name: "seqwrite128k-qd8",
        write: true,
        pattern: Pattern::Sequential,
        block_size: 128 << 10,
        depth: 8,
        flush: false,
    },
    Workload {
        name: "randwrite4k-flush-qd1",
        write: true,
        pattern: Pattern::Random,
        block_size: 4096,
        depth: 1,
        flush: true,
    },
];

#[derive(Serialize, Debug)]
struct LatencyUs {
    mean: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Serialize, Debug)]
struct WorkloadResult {
    name: String,
    block_size: usize,
    depth_per_queue: usize,
    queues: usize,
    seconds: f64,
    ops: u64,
    errors: u64,
    iops: f64,
    mb_per_s: f64,
    lat_us: LatencyUs,
    /// Flush workloads: latency of the FLUSH alone (its submission to its completion), the
    /// number to compare with the host's `fdatasync` (fio `--fdatasync=1` reports it as `sync`).
    #[serde(skip_serializing_if = "Option::is_none")]
    flush_lat_us: Option<LatencyUs>,
    /// Percent of one CPU used by this client during the measured period.
    client_cpu_pct: f64,
    /// Percent of one CPU used by the backend (all threads), if `--backend-pid` was given.
    backend_cpu_pct: Option<f64>,
}

#[derive(Serialize, Debug)]
struct Report {
    label: String,
    socket: String,
    capacity_bytes: u64,
    region_bytes: u64,
    features: String,
    queue_size: u16,
    prefilled: bool,
    poll: bool,
    results: Vec<WorkloadResult>,
}

/// CPU time (user + system) of a process, in seconds, from /proc/PID/stat.
fn cpu_seconds(pid: Option<u32>) -> io::Result<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path)?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f
        .get(11)
        .zip(f.get(12))
        .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
        .ok_or_else(|| io::Error::other("malformed stat"))?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

struct CpuSample {
    at: Instant,
    client: f64,
    backend: Option<f64>,
}

impl CpuSample {
    fn take(backend_pid: Option<u32>) -> io::Result<Self> {
        Ok(Self {
            at: Instant::now(),
            client: cpu_seconds(None)?,
            backend: backend_pid.map(|p| cpu_seconds(Some(p))).transpose()?,
        })
    }
}

/// Per-queue, per-slot bookkeeping of one workload run.
struct Runner<'a> {
    client: &'a mut BlkClient,
    wl: Workload,
    /// One registered arena per queue, `depth` slots of `block_size`.
    arenas: &'a [BufId],
    region: u64,
    rng: fastrand::Rng,
    seq_next: Vec<u64>,
    /// Submission time per tag (tag = queue * depth + slot).
    started: Vec<Instant>,
    /// Per tag: the write of a write+flush op is done and its FLUSH is in flight.
    flushing: Vec<bool>,
    /// Per tag: when its FLUSH was submitted.
    flush_started: Vec<Instant>,
    poll: bool,
}

impl Runner<'_> {
    fn next_offset(&mut self, q: usize) -> u64 {
        let bs = self.wl.block_size as u64;
        let blocks = self.region / bs;
        match self.wl.pattern {
            Pattern::Random => self.rng.u64(0..blocks) * bs,
            Pattern::Sequential => {
                let off = self.seq_next[q];
                self.seq_next[q] = if off + 2 * bs > blocks * bs {
                    0
                } else {
                    off + bs
                };
                off
            }
        }
    }

    fn submit(&mut self, q: usize, slot: usize, now: Instant) -> Result<(), String> {
        let off = self.next_offset(q);
        let bs = self.wl.block_size;
        let buf = self.arenas[q].slice(slot * bs, bs);
        let tag = (q * self.wl.depth + slot) as u64;
        self.started[tag as usize] = now;
        let r = if self.wl.write {
            self.client.submit_write(q, off, buf, tag)
        } else {
            self.client.submit_read(q, off, buf, tag)
        };
        r.map_err(|e| format!("submit on queue {q}: {e}"))
    }

    /// Runs for `warmup + runtime`; records completions of the measured part only.
    fn run(
        &mut self,
        warmup: Duration,
        runtime: Duration,
        backend_pid: Option<u32>,
    ) -> Result<WorkloadResult, String> {
        let nq = self.client.num_queues();
        let depth = self.wl.depth;
        let new_hist =
            || Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3).map_err(|e| e.to_string());
        let mut hist = new_hist()?;
        let mut flush_hist = new_hist()?;
        let start = Instant::now();
        for q in 0..nq {
            for slot in 0..depth {
                self.submit(q, slot, start)?;
            }
            self.client.kick(q).map_err(|e| e.to_string())?;
        }
        let measure_from = start + warmup;
        let end = measure_from + runtime;
        let mut cpu0: Option<CpuSample> = None;
        let (mut ops, mut errors) = (0u64, 0u64);
        let mut done: Vec<(usize, u64, u8)> = Vec::with_capacity(depth);
        let mut stopping = false;
        loop {
            let mut drained = 0;
            for q in 0..nq {
                done.clear();
                self.client
                    .drain_completions(q, |c| done.push((q, c.tag, c.status)));
                if done.is_empty() {
                    continue;
                }
                drained += done.len();
                let now = Instant::now();
                if cpu0.is_none() && now >= measure_from {
                    cpu0 = Some(CpuSample::take(backend_pid).map_err(|e| e.to_string())?);
                }
                let measuring = now >= measure_from && now < end;
                for &(q, tag, status) in &done {
                    let t = tag as usize;
                    if self.wl.flush && !self.flushing[t] && status == 0 && now < end {
                        // Write done: the op continues with its FLUSH.
                        self.flushing[t] = true;
                        self.flush_started[t] = now;
                        self.client
                            .submit_flush(q, tag)
                            .map_err(|e| format!("submit on queue {q}: {e}"))?;
                        continue;
                    }
                    if self.flushing[t] && measuring {
                        let lat = now.duration_since(self.flush_started[t]);
                        flush_hist.saturating_record(lat.as_nanos().max(1) as u64);
                    }
                    self.flushing[t] = false;
                    if measuring {
                        let lat = now.duration_since(self.started[tag as usize]);
                        hist.saturating_record(lat.as_nanos().max(1) as u64);
                        ops += 1;
                        if status != 0 {
                            errors += 1;
                        }
                    }
                    if now < end {
                        self.submit(q, tag as usize % depth, now)?;
                    }
                }
                if now < end {
                    self.client.kick(q).map_err(|e| e.to_string())?;
                } else {
                    stopping = true;
                }
            }
            if stopping || Instant::now() >= end {
                stopping = true;
                if (0..nq).all(|q| self.client.inflight(q) == 0) {
                    break;
                }
            }
            if drained == 0 && !self.poll {
                let wait = Duration::from_millis(if stopping { 100 } else { 50 });
                self.client
                    .wait_any(Some(wait))
                    .map_err(|e| e.to_string())?;
                if stopping && Instant::now() > end + Duration::from_secs(30) {
                    return Err("requests still in flight 30 s after the end".into());
                }
            }
        }
        let cpu1 = CpuSample::take(backend_pid).map_err(|e| e.to_string())?;
        let cpu0 = cpu0.ok_or("no completion during the measured period")?;
        let secs = runtime.as_secs_f64();
        let wall = cpu1.at.duration_since(cpu0.at).as_secs_f64().max(1e-9);
        let iops = ops as f64 / secs;
        let lat_us = |h: &Histogram<u64>| {
            let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
            LatencyUs {
                mean: h.mean() / 1000.0,
                p50: q(0.5),
                p99: q(0.99),
                p999: q(0.999),
                max: h.max() as f64 / 1000.0,
            }
        };
        Ok(WorkloadResult {
            name: self.wl.name.to_string(),
            block_size: self.wl.block_size,
            depth_per_queue: depth,
            queues: nq,
            seconds: secs,
            ops,
            errors,
            iops,
            mb_per_s: iops * self.wl.block_size as f64 / 1e6,
            lat_us: lat_us(&hist),
            flush_lat_us: self.wl.flush.then(|| lat_us(&flush_hist)),
            client_cpu_pct: (cpu1.client - cpu0.client) / wall * 100.0,
            backend_cpu_pct: cpu1
                .backend
                .zip(cpu0.backend)
                .map(|(b1, b0)| (b1 - b0) / wall * 100.0),
        })
    }
}

/// Writes the region with non-zero data (128 KiB requests, 8 in flight per queue 0) and flushes.
fn prefill(client: &mut BlkClient, arena: BufId, region: u64) -> Result<(), String> {
    const BS: u64 = 128 << 10;
    const DEPTH: usize = 8;
    let mut next = 0u64;
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let mut failed = 0u64;
    loop {
        while next < region {
            let Some(slot) = free.pop() else { break };
            let len = BS.min(region - next) as usize;
            client
                .submit_write(0, next, arena.slice(slot * BS as usize, len), slot as u64)
                .map_err(|e| format!("prefill: {e}"))?;
            next += len as u64;
        }
        client.kick(0).map_err(|e| e.to_string())?;
        if client.inflight(0) == 0 {
            break;
        }
        let n = client.drain_completions(0, |c| {
            free.push(c.tag as usize);
            if !c.is_ok() {
                failed += 1;
            }
        });
        if n == 0 {
            client
                .wait_any(Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
        }
    }
    if failed > 0 {
        return Err(format!("prefill: {failed} writes failed"));
    }
    client.flush(0).map_err(|e| format!("prefill flush: {e}"))
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("ft-blk-bench: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), String> {
    let args = Args::parse();
    let selected: Vec<Workload> = if args.workloads == "all" {
        WORKLOADS.to_vec()
    } else {
        args.workloads
            .split(',')
            .map(|n| {
                WORKLOADS
                    .iter()
                    .find(|w| w.name == n.trim())
                    .copied()
                    .ok_or_else(|| {
                        let names: Vec<_> = WORKLOADS.iter().map(|w| w.name).collect();
                        format!("unknown workload {n:?}; known: {}", names.join(","))
                    })
            })
            .collect::<Result<_, _>>()?
    };
    let bad = |x: f64| !(0.0..=1e6).contains(&x);
    if bad(args.runtime) || args.runtime == 0.0 || bad(args.warmup) {
        return Err("--runtime must be in (0, 1e6] and --warmup in [0, 1e6]".into());
    }
    let max_depth = selected.iter().map(|w| w.depth).max().unwrap_or(1);
    if (args.queue_size as usize) < 3 * max_depth.max(8) {
        return Err(format!(
            "--queue-size {} too small: need >= {} (3 descriptors per request)",
            args.queue_size,
            3 * max_depth.max(8)
        ));
    }

    let mut client = BlkClient::connect_with(
        &args.socket,
        ClientOptions {
            num_queues: args.queues,
            queue_size: args.queue_size,
            features: DEFAULT_FEATURES,
            ..ClientOptions::default()
        },
    )
    .map_err(|e| format!("connect {}: {e}", args.socket))?;
    let capacity = client.config().capacity_bytes();
    let region = args.size.unwrap_or(capacity.min(1 << 30));
    if region > capacity || region < (1 << 20) {
        return Err(format!(
            "region {region} must be within the disk ({capacity} bytes) and >= 1 MiB"
        ));
    }
    let region = region & !((128 << 10) - 1);

    // One arena per queue, big enough for the largest depth x block size; filled with
    // non-zero random bytes so writes carry real data.
    let arena_len = selected
        .iter()
        .map(|w| w.depth * w.block_size)
        .max()
        .unwrap_or(4096)
        .max(8 * (128 << 10));
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut arenas = Vec::new();
    for _ in 0..args.queues {
        let id = client
            .alloc_buffer(arena_len)
            .map_err(|e| format!("alloc buffer: {e}"))?;
        client.buf_mut(id).fill_with(|| rng.u8(1..));
        arenas.push(id);
    }

    let prefilled = !args.no_prefill && selected.iter().any(|w| !w.write);
    if prefilled {
        let t = Instant::now();
        prefill(&mut client, arenas[0], region)?;
        if !args.json {
            eprintln!(
                "prefilled {} MiB in {:.1} s",
                region >> 20,
                t.elapsed().as_secs_f64()
            );
        }
    }

    let mut results = Vec::new();
    for wl in selected {
        let mut runner = Runner {
            client: &mut client,
            wl,
            arenas: &arenas,
            region,
            rng: fastrand::Rng::with_seed(args.seed ^ wl.block_size as u64),
            seq_next: (0..args.queues)
                .map(|q| (region / args.queues as u64 * q as u64) & !(wl.block_size as u64 - 1))
                .collect(),
            started: vec![Instant::now(); args.queues * wl.depth],
            flushing: vec![false; args.queues * wl.depth],
            flush_started: vec![Instant::now(); args.queues * wl.depth],
            poll: args.poll,
        };
        let r = runner.run(
            Duration::from_secs_f64(args.warmup),
            Duration::from_secs_f64(args.runtime),
            args.backend_pid,
        )?;
        if wl.write {
            // Unmeasured: the next workload should not share the disk with the writeback of
            // this one's dirty pages (nor its first FLUSH pay for them).
            client
                .flush(0)
                .map_err(|e| format!("settling flush: {e}"))?;
        }
        if !args.json {
            print_row(&r, results.is_empty());
        }
        results.push(r);
    }

    if args.json {
        let report = Report {
            label: args.label,
            socket: args.socket,
            capacity_bytes: capacity,
            region_bytes: region,
            features: format!("{:#x}", client.features()),
            queue_size: args.queue_size,
            prefilled,
            poll: args.poll,
            results,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    }
    Ok(())
}

fn print_row(r: &WorkloadResult, header: bool) {
    if header {
        println!(
            "{:<18} {:>10} {:>9} {:>9} {:>9} {:>10} {:>7} {:>8} {:>7}",
            "workload",
            "IOPS",
            "MB/s",
            "p50 us",
            "p99 us",
            "p99.9 us",
            "errors",
            "cli CPU",
            "be CPU"
        );
    }
    println!(
        "{:<18} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>7} {:>7.0}% {:>7}",
        r.name,
        r.iops,
        r.mb_per_s,
        r.lat_us.p50,
        r.lat_us.p99,
        r.lat_us.p999,
        r.errors,
        r.client_cpu_pct,
        r.backend_cpu_pct
            .map_or("-".to_string(), |b| format!("{b:.0}%"))
    );
    if let Some(f) = &r.flush_lat_us {
        println!(
            "{:<18} {:>10} {:>9} {:>9.1} {:>9.1} {:>10.1}",
            "  (FLUSH alone)", "", "", f.p50, f.p99, f.p999
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("8K"), Ok(8192));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn workloads_fit_the_default_queue() {
        for w in WORKLOADS {
            assert!(3 * w.depth <= 256, "{}", w.name);
            assert_eq!(w.block_size % 4096, 0);
        }
    }
}
