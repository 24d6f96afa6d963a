// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Checkpointers behind one trait: `sim` (acknowledges after a fixed delay; tests and
//! benchmarks), `exec:CMD` (runs a command per checkpoint; exit 0 = acknowledged),
//! `qmp:SOCK` (pauses and resumes QEMU over QMP around the seal; copies nothing) and
//! `migrate:SOCK,standby=ADDR,...` (real checkpoints: QEMU migration to an `ft-standby`,
//! acknowledged when durable there; see `migrate.rs`). `checkpointer_spec.rs` parses the
//! `--checkpointer` argument and builds the one it names.
//!
//! Contract: after [`Checkpointer::start`] for epoch `E` the checkpointer reports, through its
//! sink, `Captured E` once the VM may run again (the checkpoint is taken) and then exactly one
//! of `Acked E` or `CheckpointFailed E`. Reports may come from any thread and for different
//! epochs out of order; the cycle state machine puts commits back in order and ignores reports
//! for epochs it already gave up on (timeouts), so a late `Acked` can never commit anything.

use super::cycle::Input;
use super::qmp::QmpClient;
use crate::control::message::TransactionState;
use crate::epoch::{Epoch, Generation};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a checkpointer reports `Captured`, `Acked` and `CheckpointFailed`.
pub type Sink = Arc<dyn Fn(Input) + Send + Sync>;

/// One way of taking and acknowledging checkpoints.
pub trait Checkpointer: Send {
    /// For logs and `ftctl status`.
    fn describe(&self) -> String;
    /// Pauses the VM before the seal (no-op when the checkpointer does not control a VM).
    fn pause_vm(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Resumes the VM after the capture.
    fn resume_vm(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Brings the VM to the cut of a new epoch under `generation`. `Some(r)`: done now, as
    /// `VmPaused(r)`. `None`: the checkpointer reports `VmPaused(Ok)` or `CutAbandoned`
    /// through its sink later (a live migration pauses the VM only at its switchover); after
    /// `CutAbandoned` the VM runs as before.
    fn begin_cut(&mut self, _generation: Generation) -> Option<Result<(), String>> {
        Some(self.pause_vm())
    }
    /// Per-checkpoint measurements for `ftctl status` (None: nothing beyond the cycle's).
    fn status(&self) -> Option<serde_json::Value> {
        None
    }
    /// Appends Prometheus text for the checkpointer's own measurements.
    fn render_metrics(&self, _out: &mut String) {}
    /// Takes checkpoint `epoch` with the devices' sealed transaction states.
    fn start(&mut self, generation: Generation, epoch: Epoch, states: Vec<TransactionState>);
    /// Gives up on `epoch` (timed out): stop working on it if possible.
    fn cancel(&mut self, _epoch: Epoch) {}
}

/// Captures instantly and acknowledges `ack_delay` later (one timer thread, FIFO: the delay is
/// constant, so due times are in start order).
pub struct SimCheckpointer {
    ack_delay: Duration,
    sink: Sink,
    timer: Option<mpsc::Sender<(Instant, Epoch)>>,
}

impl SimCheckpointer {
    pub fn new(ack_delay: Duration, sink: Sink) -> SimCheckpointer {
        let timer = (!ack_delay.is_zero()).then(|| {
            let (tx, rx) = mpsc::channel::<(Instant, Epoch)>();
            let sink = sink.clone();
            std::thread::Builder::new()
                .name("ft-sim-ckpt".into())
                .spawn(move || {
                    while let Ok((due, epoch)) = rx.recv() {
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        sink(Input::Acked { epoch });
                    }
                })
                .map(|_| tx)
        });
        let timer = match timer {
            Some(Ok(tx)) => Some(tx),
            Some(Err(e)) => {
                // Without the timer thread acknowledgements would never come: say so loudly.
                log::error!("sim checkpointer: cannot start timer thread: {e}");
                None
            }
            None => None,
        };
        SimCheckpointer {
            ack_delay,
            sink,
            timer,
        }
    }
}

impl Checkpointer for SimCheckpointer {
    fn describe(&self) -> String {
        format!("sim:{}", self.ack_delay.as_millis())
    }

    fn start(&mut self, _g: Generation, epoch: Epoch, _states: Vec<TransactionState>) {
        (self.sink)(Input::Captured { epoch });
        if self.ack_delay.is_zero() {
            (self.sink)(Input::Acked { epoch });
            return;
        }
        let sent = self
            .timer
            .as_ref()
            .is_some_and(|t| t.send((Instant::now() + self.ack_delay, epoch)).is_ok());
        if !sent {
            (self.sink)(Input::CheckpointFailed {
                epoch,
                error: "sim timer thread unavailable".into(),
            });
        }
    }
}

/// Runs `sh -c CMD` per checkpoint with `FT_EPOCH` and `FT_GENERATION` set and the sealed
/// states as a JSON array on stdin. A stdout line `captured` means the checkpoint is taken
/// (the VM may run on); exit status 0 means acknowledged (and captured, if not said before).
/// Any other exit is a failure whose reason is the exit status and the last stdout line.
pub struct ExecCheckpointer {
    command: String,
    sink: Sink,
    running: Arc<Mutex<HashMap<Epoch, Arc<Mutex<Child>>>>>,
}

impl ExecCheckpointer {
    pub fn new(command: String, sink: Sink) -> ExecCheckpointer {
        ExecCheckpointer {
            command,
            sink,
            running: Arc::default(),
        }
    }
}

impl Checkpointer for ExecCheckpointer {
    fn describe(&self) -> String {
        format!("exec:{}", self.command)
    }

    fn start(&mut self, generation: Generation, epoch: Epoch, states: Vec<TransactionState>) {
        let spawned = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .env("FT_EPOCH", epoch.0.to_string())
            .env("FT_GENERATION", generation.0.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                (self.sink)(Input::CheckpointFailed {
                    epoch,
                    error: format!("cannot run {:?}: {e}", self.command),
                });
                return;
            }
        };
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let child = Arc::new(Mutex::new(child));
        if let Ok(mut r) = self.running.lock() {
            r.insert(epoch, child.clone());
        }
        let sink = self.sink.clone();
        let running = self.running.clone();
        let worker = move || {
            if let Some(mut stdin) = stdin {
                // The command may ignore its input; a broken pipe is not a failure.
                let _ = serde_json::to_writer(&mut stdin, &states);
                let _ = stdin.write_all(b"\n");
            }
            let mut captured = false;
            let mut last_line = String::new();
            if let Some(out) = stdout {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if line.trim() == "captured" {
                        if !captured {
                            captured = true;
                            sink(Input::Captured { epoch });
                        }
                    } else if !line.trim().is_empty() {
                        last_line = line.chars().take(512).collect();
                    }
                }
            }
            // stdout closed: the command is (about to be) done. Poll so `cancel` can still
            // kill it through the shared handle.
            let status = loop {
                let st = child.lock().map(|mut c| c.try_wait());
                match st {
                    Ok(Ok(Some(st))) => break Ok(st),
                    Ok(Ok(None)) => std::thread::sleep(Duration::from_millis(1)),
                    Ok(Err(e)) => break Err(e.to_string()),
                    Err(_) => break Err("child handle poisoned".to_string()),
                }
            };
            if let Ok(mut r) = running.lock() {
                r.remove(&epoch);
            }
            match status {
                Ok(st) if st.success() => {
                    if !captured {
                        sink(Input::Captured { epoch });
                    }
                    sink(Input::Acked { epoch });
                }
                Ok(st) => {
                    let mut error = format!("checkpoint command {st}");
                    if !last_line.is_empty() {
                        error.push_str(": ");
                        error.push_str(&last_line);
                    }
                    sink(Input::CheckpointFailed { epoch, error });
                }
                Err(e) => sink(Input::CheckpointFailed {
                    epoch,
                    error: format!("waiting for checkpoint command: {e}"),
                }),
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name(format!("ft-exec-ckpt-{epoch}"))
            .spawn(worker)
        {
            (self.sink)(Input::CheckpointFailed {
                epoch,
                error: format!("cannot start checkpoint thread: {e}"),
            });
        }
    }

    fn cancel(&mut self, epoch: Epoch) {
        let child = self
            .running
            .lock()
            .ok()
            .and_then(|r| r.get(&epoch).cloned());
        if let Some(c) = child {
            if let Ok(mut c) = c.lock() {
                // Kill on a reaped child is a no-op in std: no risk of hitting a reused pid.
                let _ = c.kill();
            }
        }
    }
}

/// QEMU over QMP: `stop` before the seal, `cont` after. The consistent cut is the paused VM
/// with every device sealed; the coordinator itself transfers no VM state, so the checkpoint
/// counts as captured and acknowledged as soon as the VM is paused and sealed. Pair it with a
/// replicating VMM for real fault tolerance.
pub struct QmpCheckpointer {
    socket: PathBuf,
    sink: Sink,
    client: Option<QmpClient>,
}

/// Bound on one QMP command.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

impl QmpCheckpointer {
    pub fn new(socket: PathBuf, sink: Sink) -> QmpCheckpointer {
        QmpCheckpointer {
            socket,
            sink,
            client: None,
        }
    }

    /// Runs `f` on a connected client; a failed command drops the connection so the next call
    /// reconnects (QMP has no request ids to resynchronise on).
    fn with_client<T>(
        &mut self,
        f: impl FnOnce(&mut QmpClient) -> Result<T, super::qmp::QmpError>,
    ) -> Result<T, String> {
        if self.client.is_none() {
            let c = QmpClient::connect(&self.socket, QMP_TIMEOUT)
                .map_err(|e| format!("QMP {}: {e}", self.socket.display()))?;
            self.client = Some(c);
        }
        let Some(c) = self.client.as_mut() else {
            return Err("QMP not connected".into());
        };
        let r = f(c);
        if let Err(super::qmp::QmpError::Io(_) | super::qmp::QmpError::Protocol(_)) = &r {
            self.client = None;
        }
        r.map_err(|e| e.to_string())
    }
}

impl Checkpointer for QmpCheckpointer {
    fn describe(&self) -> String {
        format!("qmp:{}", self.socket.display())
    }

    fn pause_vm(&mut self) -> Result<(), String> {
        self.with_client(QmpClient::stop)
    }

    fn resume_vm(&mut self) -> Result<(), String> {
        self.with_client(QmpClient::cont)
    }

    fn start(&mut self, _g: Generation, epoch: Epoch, _states: Vec<TransactionState>) {
        (self.sink)(Input::Captured { epoch });
        (self.sink)(Input::Acked { epoch });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect() -> (Sink, mpsc::Receiver<Input>) {
        let (tx, rx) = mpsc::channel();
        let sink: Sink = Arc::new(move |i| {
            let _ = tx.send(i);
        });
        (sink, rx)
    }

    fn next(rx: &mpsc::Receiver<Input>) -> Input {
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn exec_reports_capture_ack_and_failure() {
        let (sink, rx) = collect();
        let mut ok = ExecCheckpointer::new(
            "read -r line; test \"$FT_EPOCH\" = 7 && echo captured && exit 0".into(),
            sink.clone(),
        );
        ok.start(Generation(1), Epoch(7), vec![]);
        assert!(matches!(next(&rx), Input::Captured { epoch: Epoch(7) }));
        assert!(matches!(next(&rx), Input::Acked { epoch: Epoch(7) }));
        let mut bad = ExecCheckpointer::new("echo secondary unreachable; exit 3".into(), sink);
        bad.start(Generation(1), Epoch(8), vec![]);
        match next(&rx) {
            Input::CheckpointFailed { epoch, error } => {
                assert_eq!(epoch, Epoch(8));
                assert!(
                    error.contains("3") && error.contains("unreachable"),
                    "{error}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exec_cancel_kills_a_hung_command() {
        let (sink, rx) = collect();
        let mut c = ExecCheckpointer::new("exec sleep 30".into(), sink);
        c.start(Generation(1), Epoch(1), vec![]);
        std::thread::sleep(Duration::from_millis(50));
        c.cancel(Epoch(1));
        assert!(matches!(next(&rx), Input::CheckpointFailed { .. }));
    }
}
