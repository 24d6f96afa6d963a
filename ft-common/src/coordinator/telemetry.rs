// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Coordinator telemetry: latency histograms (HdrHistogram, microseconds) for the phases of
//! the epoch cycle and per device `fdatasync`, plus counters. Updated by the cycle's I/O shell,
//! read by `ftctl status`, the Prometheus endpoint and the benchmark.
//!
//! Invariant: recording never fails or allocates after construction (values beyond the
//! histogram's range are clamped to its top, so an outlier is still counted).

use super::cycle::Sample;
use crate::control::message::CommitStats;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Duration;

/// Largest latency tracked exactly: one hour, in microseconds.
const MAX_US: u64 = 3_600_000_000;

/// One latency distribution in microseconds.
#[derive(Clone, Debug)]
pub struct Latency(Histogram<u64>);

/// A latency distribution's summary.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    pub sum_us: f64,
}

impl Default for Latency {
    fn default() -> Self {
        // 3 significant figures over 1 us .. 1 h: a few tens of KiB per histogram. The bounds
        // are constants that satisfy hdrhistogram's preconditions, so this cannot fail.
        Latency(Histogram::new_with_bounds(1, MAX_US, 3).expect("constant, valid bounds"))
    }
}

impl Latency {
    pub fn record(&mut self, d: Duration) {
        self.record_us(d.as_micros().min(MAX_US as u128) as u64);
    }

    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, MAX_US));
    }

    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
            mean_us: h.mean(),
            sum_us: h.mean() * h.len() as f64,
        }
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }
}

/// Per device counters from the COMMITTED replies.
#[derive(Clone, Debug, Default)]
pub struct DeviceTelemetry {
    pub fdatasync: Latency,
    /// The commit's writes, submit of the first to drain of the last (non-empty commits).
    pub writes: Latency,
    /// The daemon's whole commit (admission to reply), all commits.
    pub commit_total: Latency,
    pub commits_ok: u64,
    pub requests_committed: u64,
    pub bytes_committed: u64,
    pub disconnects: u64,
}

/// All coordinator telemetry.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    pub seal: Latency,
    pub checkpoint: Latency,
    pub commit: Latency,
    pub seal_to_commit: Latency,
    /// Cut to next cut (the whole epoch cycle).
    pub cut_to_cut: Latency,
    pub seal_failures: u64,
    pub checkpoint_failures: u64,
    pub devices: Vec<DeviceTelemetry>,
}

impl Telemetry {
    pub fn new(devices: usize) -> Telemetry {
        Telemetry {
            devices: vec![DeviceTelemetry::default(); devices],
            ..Telemetry::default()
        }
    }

    pub fn sample(&mut self, s: Sample) {
        match s {
            Sample::Seal(d) => self.seal.record(d),
            Sample::Checkpoint(d) => self.checkpoint.record(d),
            Sample::Commit(d) => self.commit.record(d),
            Sample::SealToCommit(d) => self.seal_to_commit.record(d),
            Sample::CutToCut(d) => self.cut_to_cut.record(d),
        }
    }

    pub fn committed(&mut self, device: usize, stats: &CommitStats) {
        if let Some(d) = self.devices.get_mut(device) {
            d.commits_ok += 1;
            d.requests_committed += stats.requests;
            d.bytes_committed += stats.bytes;
            // A commit that released nothing did no fdatasync worth measuring.
            if stats.requests > 0 {
                d.fdatasync.record_us(stats.fdatasync_us);
                d.writes.record_us(stats.submit_to_drain_us);
            }
            d.commit_total.record_us(stats.total_us);
        }
    }

    pub fn disconnected(&mut self, device: usize) {
        if let Some(d) = self.devices.get_mut(device) {
            d.disconnects += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_clamping() {
        let mut l = Latency::default();
        assert_eq!(l.summary().count, 0);
        for us in 1..=100 {
            l.record_us(us);
        }
        l.record(Duration::from_secs(100_000));
        let s = l.summary();
        assert_eq!(s.count, 101);
        assert!((49..=51).contains(&s.p50_us), "{s:?}");
        assert!(s.max_us >= MAX_US / 2, "{s:?}");
    }
}
