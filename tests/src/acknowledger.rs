// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A stand-in checkpoint coordinator for tests and benchmarks: every `interval` it seals the
//! next epoch on every control socket and commits it at once, as if each checkpoint were
//! acknowledged immediately. It takes no checkpoint; it only exercises the daemons' output
//! gating with a realistic cadence (the real coordinator lives elsewhere).
//!
//! Invariants:
//! - Epochs grow by one per round, starting at the newest open epoch over all daemons (read
//!   with STATUS), one generation for the whole run.
//! - `SEAL E` goes to every daemon before any reply is awaited, then `COMMIT E` likewise
//!   (protocol section 9); any refusal, failed commit or transport error stops the loop and is
//!   reported by [`Acknowledger::stop`], never ignored.
//! - [`Acknowledger::stop`] runs one last SEAL/COMMIT round after the loop ends, so everything
//!   the guest sent up to then has been released when it returns successfully.

use ft_common::control::{ClientError, ControlClient, Reply, Request};
use ft_common::epoch::{Epoch, Generation};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Per-call timeout: a daemon that takes longer is broken for our purposes.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds slower than this are logged (warn).
const SLOW_ROUND: Duration = Duration::from_millis(50);

/// What the acknowledger did, summed over all daemons.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckStats {
    /// SEAL+COMMIT rounds completed (the final one included).
    pub rounds: u64,
    /// First and last epoch committed (`None` before the first round).
    pub first_epoch: Option<Epoch>,
    pub last_epoch: Option<Epoch>,
    /// Frames (net) or requests (blk) released by commits, from the COMMITTED stats.
    pub committed_requests: u64,
    pub committed_bytes: u64,
    /// Rounds that released something.
    pub nonempty_commits: u64,
    /// Slowest SEAL+COMMIT round, microseconds.
    pub max_round_us: u64,
}

/// Why the acknowledger stopped early or could not run.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("control {path}: {source}")]
    Client {
        path: PathBuf,
        #[source]
        source: ClientError,
    },
    #[error("control {path}: {request} answered {reply:?}")]
    Refused {
        path: PathBuf,
        request: String,
        reply: Box<Reply>,
    },
    #[error("acknowledger thread panicked")]
    Panicked,
}

struct Daemon {
    path: PathBuf,
    client: ControlClient,
}

impl Daemon {
    fn client_err(&self, source: ClientError) -> AckError {
        AckError::Client {
            path: self.path.clone(),
            source,
        }
    }
}

/// A running acknowledger thread.
pub struct Acknowledger {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(AckStats, Result<(), AckError>)>,
}

impl Acknowledger {
    /// Connects to every control socket (failing if one cannot be reached or read) and starts
    /// the loop on its own thread.
    pub fn start(
        sockets: &[PathBuf],
        interval: Duration,
        generation: Generation,
    ) -> Result<Acknowledger, AckError> {
        let mut daemons = Vec::with_capacity(sockets.len());
        let mut next = Epoch::FIRST;
        for path in sockets {
            let client_err = |source| AckError::Client {
                path: path.clone(),
                source,
            };
            let mut client = ControlClient::connect(path, CALL_TIMEOUT).map_err(client_err)?;
            // One round trip also proves the daemon accepted the connection.
            match client.call(&Request::Status).map_err(client_err)? {
                Reply::Status(s) => next = next.max(s.open_epoch),
                reply => {
                    return Err(AckError::Refused {
                        path: path.clone(),
                        request: "STATUS".into(),
                        reply: Box::new(reply),
                    })
                }
            }
            daemons.push(Daemon {
                path: path.clone(),
                client,
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ft-ack".into())
            .spawn(move || run(daemons, interval, generation, next, &flag))
            .expect("spawning the acknowledger thread");
        Ok(Acknowledger { stop, thread })
    }

    /// Whether the loop is still going (it ends early only on an error).
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Ends the loop, runs a final SEAL/COMMIT round and returns the totals; the error, if the
    /// loop or the final round failed (the stats then cover what succeeded).
    pub fn stop(self) -> (AckStats, Result<(), AckError>) {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .unwrap_or_else(|_| (AckStats::default(), Err(AckError::Panicked)))
    }
}

fn run(
    mut daemons: Vec<Daemon>,
    interval: Duration,
    generation: Generation,
    first: Epoch,
    stop: &AtomicBool,
) -> (AckStats, Result<(), AckError>) {
    let mut stats = AckStats::default();
    let mut epoch = first;
    // Fixed deadlines: a slow round shortens the next sleep instead of shifting the cadence.
    let mut deadline = Instant::now() + interval;
    let result = loop {
        if stop.load(Ordering::Acquire) {
            // The final round: whatever was sent until now gets released.
            break round(&mut daemons, generation, epoch, &mut stats);
        }
        let now = Instant::now();
        if now < deadline {
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
            continue;
        }
        deadline += interval;
        if deadline < now {
            deadline = now + interval;
        }
        let started = Instant::now();
        if let Err(e) = round(&mut daemons, generation, epoch, &mut stats) {
            break Err(e);
        }
        // A stalled round delays every frame of its epoch: say when it happened.
        let took = started.elapsed();
        if took > SLOW_ROUND {
            log::warn!("SEAL/COMMIT of epoch {epoch} took {} ms", took.as_millis());
        }
        epoch = epoch.next();
    };
    (stats, result)
}

/// One checkpoint: SEAL `epoch` everywhere, then COMMIT it everywhere.
fn round(
    daemons: &mut [Daemon],
    generation: Generation,
    epoch: Epoch,
    stats: &mut AckStats,
) -> Result<(), AckError> {
    let start = Instant::now();
    let seal = Request::Seal { generation, epoch };
    fan_out(
        daemons,
        &seal,
        |_| {},
        |r| matches!(r, Reply::Sealed { epoch: e, .. } if *e == epoch),
    )?;
    let commit = Request::Commit {
        generation,
        epoch,
        deadline: None,
    };
    let mut released = (0, 0);
    fan_out(
        daemons,
        &commit,
        |r| {
            if let Reply::Committed { stats, .. } = r {
                released.0 += stats.requests;
                released.1 += stats.bytes;
            }
        },
        |r| matches!(r, Reply::Committed { epoch: e, .. } if *e == epoch),
    )?;
    stats.rounds += 1;
    stats.first_epoch.get_or_insert(epoch);
    stats.last_epoch = Some(epoch);
    stats.committed_requests += released.0;
    stats.committed_bytes += released.1;
    if released.0 > 0 {
        stats.nonempty_commits += 1;
    }
    stats.max_round_us = stats
        .max_round_us
        .max(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
    Ok(())
}

/// Sends `req` to every daemon, then collects and checks every reply.
fn fan_out(
    daemons: &mut [Daemon],
    req: &Request,
    mut account: impl FnMut(&Reply),
    ok: impl Fn(&Reply) -> bool,
) -> Result<(), AckError> {
    for d in daemons.iter_mut() {
        d.client.send(req).map_err(|e| d.client_err(e))?;
    }
    for d in daemons.iter_mut() {
        let reply = d.client.recv_reply().map_err(|e| d.client_err(e))?;
        // OUTPUT_PENDING only says "checkpoint soon": we checkpoint on a timer anyway.
        d.client.take_notifications();
        if !ok(&reply) {
            return Err(AckError::Refused {
                path: d.path.clone(),
                request: format!("{req:?}"),
                reply: Box::new(reply),
            });
        }
        account(&reply);
    }
    Ok(())
}
