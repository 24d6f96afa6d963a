// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A minimal QMP client: connect to QEMU's QMP unix socket, read the greeting, negotiate
//! capabilities, and run commands (`stop`, `cont`, `query-status`, the migration commands)
//! synchronously; asynchronous events are kept for [`QmpClient::next_event`].
//!
//! Invariants: one command in flight at a time, so the next `return`/`error` object answers it;
//! asynchronous events (`{"event": ...}`) in between are queued (bounded: the oldest are
//! dropped); every read has a timeout and every line a size bound, so a silent or
//! garbage-spewing peer is an error, never a hang. A line cut by a timeout is kept and
//! completed by the next read, never misparsed.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest QMP line accepted (replies to our commands are tiny).
const MAX_LINE: u64 = 1 << 20;
/// Events kept for `next_event`; older ones are dropped.
const MAX_EVENTS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O: {0}")]
    Io(#[from] io::Error),
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: Vec<u8>,
    timeout: Duration,
    events: VecDeque<Value>,
}

impl QmpClient {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<QmpClient, QmpError> {
        let stream = UnixStream::connect(path.as_ref())?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut c = QmpClient {
            reader: BufReader::new(stream),
            writer,
            line: Vec::with_capacity(256),
            timeout,
            events: VecDeque::new(),
        };
        let greeting = c.read_object()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected greeting, got {greeting}"
            )));
        }
        c.execute("qmp_capabilities")?;
        Ok(c)
    }

    /// Runs `command` without arguments; returns its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        self.run(command, json!({ "execute": command }))
    }

    /// Runs `command` with `arguments` (a JSON object); returns its `return` value.
    pub fn execute_with(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.run(
            command,
            json!({ "execute": command, "arguments": arguments }),
        )
    }

    fn run(&mut self, command: &str, request: Value) -> Result<Value, QmpError> {
        let mut req =
            serde_json::to_vec(&request).map_err(|e| QmpError::Protocol(e.to_string()))?;
        req.push(b'\n');
        self.writer.write_all(&req)?;
        loop {
            let v = self.read_object()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            if v.get("event").is_none() {
                return Err(QmpError::Protocol(format!("unexpected QMP message {v}")));
            }
            self.push_event(v);
        }
    }

    /// The next asynchronous event (queued earlier, or read within `timeout`); `None` when
    /// none came in time.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Value>, QmpError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let r = self.read_line_object();
        self.reader.get_ref().set_read_timeout(Some(self.timeout))?;
        match r? {
            None => Ok(None),
            Some(v) if v.get("event").is_some() => Ok(Some(v)),
            Some(v) => Err(QmpError::Protocol(format!(
                "unexpected QMP message while waiting for events: {v}"
            ))),
        }
    }

    /// Forgets queued events (before starting something whose events must not be confused
    /// with those of an earlier run, such as a new migration).
    pub fn clear_events(&mut self) {
        self.events.clear();
    }

    fn push_event(&mut self, v: Value) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(v);
    }

    /// Pauses the guest's vCPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop").map(drop)
    }

    /// Resumes the guest's vCPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont").map(drop)
    }

    /// Whether the VM is running, per `query-status`.
    pub fn running(&mut self) -> Result<bool, QmpError> {
        let r = self.execute("query-status")?;
        r.get("running")
            .and_then(Value::as_bool)
            .ok_or_else(|| QmpError::Protocol(format!("bad query-status reply {r}")))
    }

    fn read_object(&mut self) -> Result<Value, QmpError> {
        self.read_line_object()?
            .ok_or_else(|| QmpError::Io(io::ErrorKind::TimedOut.into()))
    }

    /// One complete line as a JSON object; `None` on a read timeout (a partial line stays in
    /// the buffer for the next call).
    fn read_line_object(&mut self) -> Result<Option<Value>, QmpError> {
        let room = MAX_LINE.saturating_sub(self.line.len() as u64);
        let r = (&mut self.reader)
            .take(room)
            .read_until(b'\n', &mut self.line);
        match r {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
            Ok(0) if self.line.is_empty() => {
                return Err(QmpError::Io(io::ErrorKind::UnexpectedEof.into()))
            }
            Ok(_) => {}
        }
        if self.line.last() != Some(&b'\n') {
            self.line.clear();
            return Err(QmpError::Protocol("QMP line too long or cut short".into()));
        }
        let parsed = serde_json::from_slice::<Value>(&self.line);
        self.line.clear();
        let v = parsed.map_err(|e| QmpError::Protocol(format!("bad JSON from QMP: {e}")))?;
        if !v.is_object() {
            return Err(QmpError::Protocol(format!(
                "QMP message is not an object: {v}"
            )));
        }
        Ok(Some(v))
    }
}
