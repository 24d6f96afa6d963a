// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Prometheus text exposition over HTTP/1.0 on a loopback address: a tiny hand-rolled
//! responder (GET /metrics only) on a std `TcpListener`, plus the renderer.
//!
//! Invariants: only loopback addresses are accepted (the endpoint has no authentication);
//! requests are read with a size bound and a timeout; one connection at a time, closed after
//! the answer.

use super::cycle::CycleStatus;
use super::handle::{CoordinatorHandle, Op};
use super::telemetry::{Latency, Telemetry};
use crate::control::message::DeviceStatus;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest request head read.
const MAX_HEAD: usize = 8192;

/// Refuses non-loopback addresses.
pub fn check_loopback(a: SocketAddr) -> io::Result<()> {
    if a.ip().is_loopback() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("metrics address {a} is not a loopback address"),
        ))
    }
}

/// One device as the renderer sees it.
#[derive(Clone, Debug)]
pub struct DeviceView {
    pub name: String,
    pub connected: bool,
    pub status: Option<DeviceStatus>,
}

/// The HTTP endpoint; dropping it stops the thread.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(addr: SocketAddr, handle: CoordinatorHandle) -> io::Result<MetricsServer> {
        check_loopback(addr)?;
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ft-metrics".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    let mut p = libc::pollfd {
                        fd: listener.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
                        continue;
                    }
                    if let Ok((conn, _)) = listener.accept() {
                        if let Err(e) = respond(conn, &handle) {
                            log::debug!("metrics connection: {e}");
                        }
                    }
                }
            })?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(mut conn: TcpStream, h: &CoordinatorHandle) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 || head.len() + n > MAX_HEAD {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method != "GET" {
        ("405 Method Not Allowed", "only GET\n".to_string())
    } else if path != "/metrics" && path != "/" {
        ("404 Not Found", "try /metrics\n".to_string())
    } else {
        match h.op(Op::Metrics) {
            Ok(serde_json::Value::String(s)) => ("200 OK", s),
            Ok(_) => ("500 Internal Server Error", "bad metrics\n".into()),
            Err(e) => ("503 Service Unavailable", format!("{e}\n")),
        }
    };
    let resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes())
}

pub(crate) fn summary(
    out: &mut String,
    name: &str,
    help: &str,
    labels: &str,
    l: &Latency,
    header: bool,
) {
    let s = l.summary();
    if header {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} summary");
    }
    let sep = if labels.is_empty() { "" } else { "," };
    for (q, v) in [("0.5", s.p50_us), ("0.9", s.p90_us), ("0.99", s.p99_us)] {
        let _ = writeln!(
            out,
            "{name}{{{labels}{sep}quantile=\"{q}\"}} {}",
            v as f64 / 1e6
        );
    }
    let lb = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{lb} {}", s.sum_us / 1e6);
    let _ = writeln!(out, "{name}_count{lb} {}", s.count);
}

pub(crate) fn scalar(out: &mut String, name: &str, kind: &str, help: &str, rows: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in rows {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

/// Label value escaping per the exposition format.
fn st(d: &DeviceView) -> Option<&DeviceStatus> {
    d.status.as_ref()
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders everything in Prometheus text format (seconds for latencies).
pub fn render(c: &CycleStatus, t: &Telemetry, devices: &[DeviceView]) -> String {
    let mut o = String::with_capacity(4096);
    let one = |v: f64| vec![(String::new(), v)];
    scalar(
        &mut o,
        "ft_coordinator_generation",
        "gauge",
        "Fencing generation in use.",
        &one(c.generation.0 as f64),
    );
    scalar(
        &mut o,
        "ft_epochs_sealed_total",
        "counter",
        "Epochs sealed.",
        &one(c.epochs_sealed as f64),
    );
    scalar(
        &mut o,
        "ft_epochs_committed_total",
        "counter",
        "Epochs committed on every device.",
        &one(c.epochs_committed as f64),
    );
    scalar(
        &mut o,
        "ft_epochs_dropped_total",
        "counter",
        "Epochs never committed (seal or checkpoint failed, timed out, aborted).",
        &one(c.epochs_dropped as f64),
    );
    scalar(
        &mut o,
        "ft_checkpoint_failures_total",
        "counter",
        "Checkpoints that failed or timed out.",
        &one(t.checkpoint_failures as f64),
    );
    scalar(
        &mut o,
        "ft_epochs_awaiting_ack",
        "gauge",
        "Captured epochs waiting for acknowledgement.",
        &one(c.awaiting_ack as f64),
    );
    scalar(
        &mut o,
        "ft_cycle_halted",
        "gauge",
        "1 while the cycle is stopped by a failure.",
        &one(c.halted.is_some() as u8 as f64),
    );
    scalar(
        &mut o,
        "ft_cycle_paused",
        "gauge",
        "1 while the operator paused the cycle.",
        &one(c.paused as u8 as f64),
    );
    scalar(
        &mut o,
        "ft_coordinator_deposed",
        "gauge",
        "1 after ftctl abort.",
        &one(c.deposed as u8 as f64),
    );
    summary(
        &mut o,
        "ft_seal_seconds",
        "Pause to all devices sealed.",
        "",
        &t.seal,
        true,
    );
    summary(
        &mut o,
        "ft_checkpoint_seconds",
        "Checkpoint start to acknowledgement.",
        "",
        &t.checkpoint,
        true,
    );
    summary(
        &mut o,
        "ft_commit_seconds",
        "COMMIT sent to all devices committed.",
        "",
        &t.commit,
        true,
    );
    summary(
        &mut o,
        "ft_seal_to_commit_seconds",
        "Seal to commit of an epoch.",
        "",
        &t.seal_to_commit,
        true,
    );
    let lab = |d: &DeviceView| format!("device=\"{}\"", esc(&d.name));
    let rows = |f: &dyn Fn(usize, &DeviceView) -> f64| -> Vec<(String, f64)> {
        devices
            .iter()
            .enumerate()
            .map(|(i, d)| (lab(d), f(i, d)))
            .collect()
    };
    let dt = |i: usize| t.devices.get(i);
    scalar(
        &mut o,
        "ft_device_connected",
        "gauge",
        "1 while the control connection is up.",
        &rows(&|_, d| d.connected as u8 as f64),
    );
    scalar(
        &mut o,
        "ft_device_failed",
        "gauge",
        "1 while the device stops the cycle.",
        &rows(&|i, _| c.devices.get(i).is_some_and(|x| x.failure.is_some()) as u8 as f64),
    );
    scalar(
        &mut o,
        "ft_device_held_requests",
        "gauge",
        "Requests held (all uncommitted epochs).",
        &rows(&|_, d| st(d).map_or(0.0, |s| s.held_requests as f64)),
    );
    scalar(
        &mut o,
        "ft_device_held_bytes",
        "gauge",
        "Bytes held (all uncommitted epochs).",
        &rows(&|_, d| st(d).map_or(0.0, |s| s.held_bytes as f64)),
    );
    scalar(
        &mut o,
        "ft_device_oldest_held_age_seconds",
        "gauge",
        "Age of the oldest held request.",
        &rows(&|_, d| {
            st(d)
                .and_then(|s| s.epochs.iter().map(|e| e.oldest_age_us).max())
                .unwrap_or(0) as f64
                / 1e6
        }),
    );
    scalar(
        &mut o,
        "ft_device_commits_total",
        "counter",
        "COMMITTED replies.",
        &rows(&|i, _| dt(i).map_or(0.0, |x| x.commits_ok as f64)),
    );
    scalar(
        &mut o,
        "ft_device_commits_failed_total",
        "counter",
        "COMMIT_FAILED or refused commits.",
        &rows(&|i, _| c.devices.get(i).map_or(0.0, |x| x.commits_failed as f64)),
    );
    scalar(
        &mut o,
        "ft_device_disconnects_total",
        "counter",
        "Control connections lost.",
        &rows(&|i, _| dt(i).map_or(0.0, |x| x.disconnects as f64)),
    );
    scalar(
        &mut o,
        "ft_device_committed_bytes_total",
        "counter",
        "Bytes released by commits.",
        &rows(&|i, _| dt(i).map_or(0.0, |x| x.bytes_committed as f64)),
    );
    let _ = writeln!(
        o,
        "# HELP ft_device_fdatasync_seconds fdatasync latency per commit."
    );
    let _ = writeln!(o, "# TYPE ft_device_fdatasync_seconds summary");
    for (i, d) in devices.iter().enumerate() {
        if let Some(x) = dt(i) {
            summary(
                &mut o,
                "ft_device_fdatasync_seconds",
                "",
                &lab(d),
                &x.fdatasync,
                false,
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP ft_device_epoch_held_requests Held requests per uncommitted epoch."
    );
    let _ = writeln!(o, "# TYPE ft_device_epoch_held_requests gauge");
    for d in devices {
        for e in st(d).map(|s| s.epochs.as_slice()).unwrap_or(&[]) {
            let _ = writeln!(
                o,
                "ft_device_epoch_held_requests{{{},epoch=\"{}\"}} {}",
                lab(d),
                e.epoch,
                e.requests
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP ft_device_epoch_held_bytes Held bytes per uncommitted epoch."
    );
    let _ = writeln!(o, "# TYPE ft_device_epoch_held_bytes gauge");
    for d in devices {
        for e in st(d).map(|s| s.epochs.as_slice()).unwrap_or(&[]) {
            let _ = writeln!(
                o,
                "ft_device_epoch_held_bytes{{{},epoch=\"{}\"}} {}",
                lab(d),
                e.epoch,
                e.bytes
            );
        }
    }
    o
}
