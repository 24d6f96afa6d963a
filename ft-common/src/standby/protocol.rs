// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The checkpointer <-> standby protocol and the addresses both ends use.
//!
//! One address (`tcp:HOST:PORT` or `unix:PATH`, QEMU's own migration URI syntax) carries two
//! kinds of connection, told apart by their first four bytes:
//! - a *control* connection from the coordinator's checkpointer: frames of the control codec
//!   (`control::codec`: 4-byte big-endian length <= 4 MiB, version byte, JSON body), requests
//!   [`StandbyRequest`], one [`StandbyReply`] per request, in order;
//! - a *stream* connection from QEMU itself (`migrate` to the same URI): the raw migration
//!   stream, which starts with QEMU's file magic `QEVM`. A frame length can never look like
//!   that (it would exceed the 4 MiB bound), so the two cannot be confused.
//!
//! One checkpoint on a control connection: `BEGIN generation` -> `READY` (the standby now
//! accepts one stream) -> QEMU connects and streams -> `END generation epoch devices...` ->
//! `DURABLE` once the checkpoint is published (written, fsynced, renamed, directory fsynced),
//! or `REFUSED reason`. `CANCEL` abandons it (`CANCELLED`, with the standby's own error if it
//! had one, such as a full disk). Garbage, an older generation, an epoch not newer than the
//! published one, or an END without a stream are answered `REFUSED` with the reason.

use crate::epoch::{Epoch, Generation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// QEMU's migration stream magic (`QEMU_VM_FILE_MAGIC`).
pub const STREAM_MAGIC: [u8; 4] = *b"QEVM";
/// The stream version QEMU 7.2 writes after the magic (`QEMU_VM_FILE_VERSION`).
pub const STREAM_VERSION: [u8; 4] = [0, 0, 0, 3];

/// A request from the checkpointer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StandbyRequest {
    /// A checkpoint of `generation` starts: accept one migration stream for it.
    Begin { generation: Generation },
    /// QEMU reported the migration `completed`: publish it as checkpoint `epoch`, with the
    /// devices' SEALED records.
    End {
        generation: Generation,
        epoch: Epoch,
        devices: Vec<Value>,
        #[serde(default)]
        mode: Option<String>,
        #[serde(default)]
        vm_paused_us: Option<u64>,
        #[serde(default)]
        meta: Option<Value>,
    },
    /// Abandon the checkpoint in progress.
    Cancel { reason: String },
    /// Newest published checkpoint and fence.
    Status,
}

/// (generation, epoch) of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointId {
    pub generation: Generation,
    pub epoch: Epoch,
}

/// The standby's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StandbyReply {
    /// `BEGIN` accepted; the stream may come.
    Ready {
        newest: Option<CheckpointId>,
    },
    /// Checkpoint `epoch` is published and durable.
    Durable {
        generation: Generation,
        epoch: Epoch,
        vmstate_len: u64,
        vmstate_crc32c: u32,
        /// fsyncs, manifest write, rename (what the acknowledgement waited for after the
        /// stream ended).
        fsync_us: u64,
    },
    Cancelled {
        #[serde(default)]
        standby_error: Option<String>,
    },
    Refused {
        reason: String,
    },
    Status {
        newest: Option<CheckpointId>,
        fenced_generation: Generation,
        busy: bool,
    },
}

/// Where a standby listens: `tcp:HOST:PORT` or `unix:PATH` (also accepted: a bare path with a
/// `/`, or a bare `HOST:PORT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StandbyAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for StandbyAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(StandbyAddr::Unix(p.into()));
        }
        let hp = s.strip_prefix("tcp:").unwrap_or(s);
        if s.starts_with('/') || s.starts_with('.') {
            return Ok(StandbyAddr::Unix(s.into()));
        }
        match hp.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                Ok(StandbyAddr::Tcp(hp.to_string()))
            }
            _ => Err(format!(
                "bad standby address {s:?}: expected tcp:HOST:PORT or unix:PATH"
            )),
        }
    }
}

impl std::fmt::Display for StandbyAddr {
    /// QEMU's migration URI for this address.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StandbyAddr::Tcp(hp) => write!(f, "tcp:{hp}"),
            StandbyAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl StandbyAddr {
    /// Connects with a bound on the connect itself and on every later read and write.
    pub fn connect(&self, timeout: Duration) -> io::Result<Conn> {
        let c = match self {
            StandbyAddr::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
            StandbyAddr::Tcp(hp) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{hp}: no address"));
                let mut conn = None;
                for a in hp.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            conn = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = conn.ok_or(last)?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        };
        c.set_timeouts(Some(timeout))?;
        Ok(c)
    }

    /// Binds a listener (a stale unix socket file is replaced).
    pub fn bind(&self) -> io::Result<Listener> {
        match self {
            StandbyAddr::Unix(p) => {
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if m.file_type().is_socket() {
                        std::fs::remove_file(p)?;
                    }
                }
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
            StandbyAddr::Tcp(hp) => Ok(Listener::Tcp(TcpListener::bind(hp.as_str())?)),
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// The address actually bound (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<StandbyAddr> {
        Ok(match self {
            Listener::Tcp(l) => StandbyAddr::Tcp(l.local_addr()?.to_string()),
            Listener::Unix(_, p) => StandbyAddr::Unix(p.clone()),
        })
    }

    pub fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
            Listener::Unix(l, _) => Conn::Unix(l.accept()?.0),
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A connected stream of either kind.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    /// Both directions; wakes a reader blocked on another clone.
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_as_qemu_uris() {
        let a: StandbyAddr = "tcp:127.0.0.1:22001".parse().unwrap();
        assert_eq!(a.to_string(), "tcp:127.0.0.1:22001");
        let b: StandbyAddr = "localhost:5".parse().unwrap();
        assert_eq!(b, StandbyAddr::Tcp("localhost:5".into()));
        let u: StandbyAddr = "unix:/run/s.sock".parse().unwrap();
        assert_eq!(u.to_string(), "unix:/run/s.sock");
        assert_eq!(
            "/run/x".parse::<StandbyAddr>().unwrap(),
            StandbyAddr::Unix("/run/x".into())
        );
        for bad in ["", "tcp:", "unix:", "host", "tcp:host:port"] {
            assert!(bad.parse::<StandbyAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_use_wire_names() {
        let v = serde_json::to_value(StandbyRequest::Begin {
            generation: Generation(3),
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({"type": "BEGIN", "generation": 3}));
        let r: StandbyReply =
            serde_json::from_value(serde_json::json!({"type": "REFUSED", "reason": "x"})).unwrap();
        assert_eq!(r, StandbyReply::Refused { reason: "x".into() });
    }
}
