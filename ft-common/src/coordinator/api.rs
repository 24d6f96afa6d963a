// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `ftctl` API: a unix stream socket (mode 0600) speaking one JSON line per request and one
//! JSON line per answer: `{"cmd":"status"}` -> `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":"..."}`. Commands: status, pause, resume, checkpoint, abort, announce,
//! metrics.
//!
//! Invariants: a request line is bounded ([`MAX_REQUEST`]) and read with a timeout, so a bad
//! client costs one short-lived thread and an error answer, never the coordinator.

use super::handle::{CoordinatorHandle, Op};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest request line accepted.
pub const MAX_REQUEST: u64 = 4096;
/// Largest answer `ftctl` accepts.
const MAX_ANSWER: u64 = 16 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
struct ApiRequest {
    cmd: String,
}

#[derive(Serialize, Deserialize)]
struct ApiAnswer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The listening API socket; dropping it stops the thread and unlinks the socket.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    pub fn start(path: &Path, handle: CoordinatorHandle) -> io::Result<ApiServer> {
        if let Ok(md) = fs::symlink_metadata(path) {
            if !md.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by a live coordinator", path.display()),
                ));
            }
            fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = Arc::new(handle);
        let thread = std::thread::Builder::new()
            .name("ft-api".into())
            .spawn(move || serve(listener, handle, stop2))?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

/// Waits up to 100 ms for the listener to become readable (so `stop` is noticed).
fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, 100) > 0 }
}

fn serve(listener: UnixListener, handle: Arc<CoordinatorHandle>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        if !readable(listener.as_raw_fd()) {
            continue;
        }
        match listener.accept() {
            Ok((conn, _)) => {
                let h = handle.clone();
                // Operator requests are rare; a thread each keeps a slow one from blocking.
                let _ = std::thread::Builder::new()
                    .name("ft-api-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &h) {
                            log::warn!("ftctl connection: {e}");
                        }
                    });
            }
            Err(e) => log::warn!("ftctl accept: {e}"),
        }
    }
}

fn answer(conn: UnixStream, h: &CoordinatorHandle) -> io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = Vec::new();
    BufReader::new(&conn)
        .take(MAX_REQUEST)
        .read_until(b'\n', &mut line)?;
    let ans = match serde_json::from_slice::<ApiRequest>(&line) {
        Err(e) => ApiAnswer {
            ok: false,
            result: None,
            error: Some(format!("bad request: {e}")),
        },
        Ok(req) => match req.cmd.parse::<Op>().and_then(|op| h.op(op)) {
            Ok(v) => ApiAnswer {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => ApiAnswer {
                ok: false,
                result: None,
                error: Some(e),
            },
        },
    };
    let mut out = serde_json::to_vec(&ans).map_err(io::Error::other)?;
    out.push(b'\n');
    (&conn).write_all(&out)
}

/// Client side (ftctl): sends `cmd` to the API socket at `path` and returns the result.
pub fn request(path: &Path, cmd: &str) -> Result<Value, String> {
    let conn = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let io = |e: io::Error| e.to_string();
    conn.set_read_timeout(Some(IO_TIMEOUT * 2)).map_err(io)?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut req = serde_json::to_vec(&ApiRequest { cmd: cmd.into() }).map_err(|e| e.to_string())?;
    req.push(b'\n');
    (&conn).write_all(&req).map_err(io)?;
    let mut line = Vec::new();
    BufReader::new(&conn)
        .take(MAX_ANSWER)
        .read_until(b'\n', &mut line)
        .map_err(io)?;
    let a: ApiAnswer =
        serde_json::from_slice(&line).map_err(|e| format!("bad answer from coordinator: {e}"))?;
    match (a.ok, a.result, a.error) {
        (true, Some(v), _) => Ok(v),
        (true, None, _) => Ok(Value::Null),
        (false, _, e) => Err(e.unwrap_or_else(|| "unknown error".into())),
    }
}
