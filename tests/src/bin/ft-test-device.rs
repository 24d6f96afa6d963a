// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ft-test-device: a toy vhost-user device for the server tests.
//!
//! Every request: the readable buffers' bytes are copied, reversed, into the writable buffers;
//! the used length is the number of bytes written. Requests whose data starts with
//! - `H` are held: never completed by this process (they stay in flight; a stop abandons them,
//!   so they are resubmitted after reconnect/restart). With `--release-held` a restarted device
//!   completes resubmitted `H` requests normally.
//! - `D` are delayed: completed 100 ms later from a timerfd (a stop waits for them: Pending).
//!
//! Counters go to stderr as `completed q=Q head=H` lines; SEND_RARP writes the MAC to
//! `--rarp-file`.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use ft_common::vhost_user::{
    Chain, DeviceError, QueueWorker, StopStatus, VhostUserDevice, VhostUserServer, WorkerCtx,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const TIMER_TOKEN: u64 = 7;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// vhost-user socket path
    #[arg(long)]
    socket: PathBuf,
    /// number of queues
    #[arg(long, default_value_t = 2)]
    queues: u16,
    /// put queue pairs in one worker (net style)
    #[arg(long)]
    pairs: bool,
    /// offer RING_EVENT_IDX
    #[arg(long)]
    event_idx: bool,
    /// complete `H` requests instead of holding them
    #[arg(long)]
    release_held: bool,
    /// do not log each completion (benchmarks)
    #[arg(long)]
    quiet: bool,
    /// offer the RARP protocol feature and write SEND_RARP MACs here
    #[arg(long)]
    rarp_file: Option<PathBuf>,
    /// largest queue size accepted
    #[arg(long, default_value_t = 1024)]
    max_queue_size: u16,
}

struct Device {
    args: Args,
}

impl VhostUserDevice for Device {
    type Worker = Worker;

    fn num_queues(&self) -> usize {
        self.args.queues as usize
    }

    fn max_queue_size(&self) -> u16 {
        self.args.max_queue_size
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC;
        if self.args.event_idx {
            f |= VIRTIO_RING_F_EVENT_IDX;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        if self.args.rarp_file.is_some() {
            VhostUserProtocolFeatures::RARP
        } else {
            VhostUserProtocolFeatures::empty()
        }
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        let mut cfg = *b"FTTESTCF\0\0";
        cfg[8..10].copy_from_slice(&self.args.queues.to_le_bytes());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn queue_groups(&self) -> Vec<Vec<u16>> {
        if self.args.pairs {
            (0..self.args.queues)
                .step_by(2)
                .map(|q| (q..(q + 2).min(self.args.queues)).collect())
                .collect()
        } else {
            (0..self.args.queues).map(|q| vec![q]).collect()
        }
    }

    fn create_worker(&self, _group: usize, _queues: &[u16]) -> std::io::Result<Worker> {
        // SAFETY: plain syscall, result checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Worker {
            // SAFETY: fresh fd we own.
            timer: unsafe { OwnedFd::from_raw_fd(fd) },
            delayed: VecDeque::new(),
            held: Vec::new(),
            release_held: self.args.release_held,
            quiet: self.args.quiet,
        })
    }

    fn send_rarp(&self, mac: [u8; 6]) -> Result<(), DeviceError> {
        let Some(path) = &self.args.rarp_file else {
            return Err(DeviceError::Unsupported);
        };
        let s = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        std::fs::write(path, s)?;
        Ok(())
    }
}

struct Worker {
    timer: OwnedFd,
    delayed: VecDeque<(u16, Chain)>,
    held: Vec<(u16, Chain)>,
    release_held: bool,
    quiet: bool,
}

impl Worker {
    fn complete(&self, ctx: &mut WorkerCtx, q: u16, chain: Chain) {
        let head = chain.head_index();
        let mem = chain.memory().clone();
        let mut data = Vec::new();
        let written = match (chain.clone().reader(&mem), chain.writer(&mem)) {
            (Ok(mut r), Ok(mut w)) => {
                let _ = r.read_to_end(&mut data);
                data.reverse();
                let n = data.len().min(w.available_bytes());
                w.write_all(&data[..n]).map(|_| n as u32).unwrap_or(0)
            }
            _ => 0,
        };
        if let Some(vr) = ctx.queue(q) {
            if let Err(e) = vr.add_used(head, written) {
                eprintln!("add_used q={q} head={head}: {e:?}");
                return;
            }
        }
        if !self.quiet {
            eprintln!("completed q={q} head={head} len={written}");
        }
    }

    fn arm_timer(&self) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            },
        };
        // SAFETY: valid timerfd and spec.
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }
}

fn first_byte(chain: &Chain) -> u8 {
    let mem = chain.memory();
    chain
        .clone()
        .reader(mem)
        .ok()
        .and_then(|mut r| {
            let mut b = [0u8; 1];
            r.read_exact(&mut b).ok().map(|_| b[0])
        })
        .unwrap_or(0)
}

impl QueueWorker for Worker {
    type Msg = usize;
    type Reply = usize;

    fn fds(&self) -> Vec<(RawFd, u64)> {
        vec![(self.timer.as_raw_fd(), TIMER_TOKEN)]
    }

    fn handle_kick(&mut self, ctx: &mut WorkerCtx, q: u16) {
        loop {
            let Some(vr) = ctx.queue(q) else { return };
            vr.disable_notification();
            let mut chains = Vec::new();
            while let Some(c) = vr.pop() {
                chains.push(c);
            }
            for c in chains {
                match first_byte(&c) {
                    b'H' if !self.release_held => {
                        eprintln!("held q={q} head={}", c.head_index());
                        self.held.push((q, c));
                    }
                    b'D' => {
                        eprintln!("delayed q={q} head={}", c.head_index());
                        self.delayed.push_back((q, c));
                        self.arm_timer();
                    }
                    _ => self.complete(ctx, q, c),
                }
            }
            let Some(vr) = ctx.queue(q) else { return };
            vr.signal_used();
            if !vr.enable_notification() {
                break;
            }
        }
    }

    fn handle_fd(&mut self, ctx: &mut WorkerCtx, token: u64, _events: u32) {
        if token != TIMER_TOKEN {
            return;
        }
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes from our timerfd into a local.
        unsafe { libc::read(self.timer.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        while let Some((q, c)) = self.delayed.pop_front() {
            self.complete(ctx, q, c);
        }
        ctx.signal_all();
    }

    fn stop_queue(&mut self, ctx: &mut WorkerCtx, q: u16) -> StopStatus {
        // Held requests are abandoned if the inflight region tracks them (they are
        // resubmitted later), else completed now; delayed ones must finish first.
        let tracked = ctx.queue(q).is_some_and(|vr| vr.inflight_tracked());
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(hq, _)| *hq == q);
        self.held = others;
        if !tracked {
            for (_, c) in mine {
                self.complete(ctx, q, c);
            }
        }
        if self.delayed.iter().any(|(dq, _)| *dq == q) {
            StopStatus::Pending
        } else {
            StopStatus::Done
        }
    }

    fn reset(&mut self, _ctx: &mut WorkerCtx) {
        self.held.clear();
    }

    /// A typed message: the number of held chains plus `msg`.
    fn handle_message(&mut self, _ctx: &mut WorkerCtx, msg: usize) -> usize {
        self.held.len() + msg
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let dev = Arc::new(Device { args: args.clone() });
    let server = match VhostUserServer::new(dev, &args.socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ft-test-device: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = server
        .stop_handle()
        .on_signals(&[libc::SIGINT, libc::SIGTERM])
    {
        eprintln!("ft-test-device: {e}");
        std::process::exit(1);
    }
    eprintln!("ready");
    if let Err(e) = server.run() {
        eprintln!("ft-test-device: {e}");
        std::process::exit(1);
    }
    eprintln!("stopped");
}
