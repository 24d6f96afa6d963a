// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A vhost-user backend process under test control: started from a command line, ready once
//! its listening socket exists, stopped (SIGTERM, then SIGKILL) explicitly or on drop.
//!
//! The harness does not care which daemon it is: qemu-storage-daemon today, vhost-user-blk-ft
//! or vhost-user-net-ft later. The socket is removed before start, so its appearance means this
//! process created it. The harness never connects to it: a probe connection could be taken for
//! the frontend by a single-client daemon.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::error::{HarnessError, Result};

/// How to start a backend and where it will listen.
#[derive(Clone, Debug)]
pub struct BackendCommand {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// The unix socket the backend creates and QEMU connects to.
    pub socket: PathBuf,
}

impl BackendCommand {
    pub fn new(
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
        socket: impl Into<PathBuf>,
    ) -> BackendCommand {
        BackendCommand {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            socket: socket.into(),
        }
    }

    /// qemu-storage-daemon exporting the raw file `image` as a writable vhost-user-blk device.
    pub fn qemu_storage_daemon(image: &Path, socket: &Path) -> BackendCommand {
        let mut blockdev = OsString::from("driver=file,node-name=disk,filename=");
        blockdev.push(image);
        let mut export = OsString::from(
            "type=vhost-user-blk,id=exp,node-name=disk,writable=on,addr.type=unix,addr.path=",
        );
        export.push(socket);
        BackendCommand::new(
            "qemu-storage-daemon",
            [
                OsString::from("--blockdev"),
                blockdev,
                OsString::from("--export"),
                export,
            ],
            socket,
        )
    }

    fn program_name(&self) -> String {
        self.program.to_string_lossy().into_owned()
    }
}

/// A running backend; killed when dropped.
pub struct Backend {
    child: Option<Child>,
    command: BackendCommand,
    log: PathBuf,
}

impl Backend {
    /// Starts the backend with stdout and stderr appended to `log`, and waits up to `timeout`
    /// for its socket to appear. Fails if the process exits first.
    pub fn start(command: &BackendCommand, log: &Path, timeout: Duration) -> Result<Backend> {
        match std::fs::remove_file(&command.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(HarnessError::Io {
                    what: format!("removing stale socket {}", command.socket.display()),
                    source: e,
                })
            }
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(HarnessError::io(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(HarnessError::io("duplicating the log fd"))?;
        let child = Command::new(&command.program)
            .args(&command.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(HarnessError::io(format!(
                "starting {}",
                command.program_name()
            )))?;
        let mut backend = Backend {
            child: Some(child),
            command: command.clone(),
            log: log.to_path_buf(),
        };
        backend.wait_for_socket(timeout)?;
        Ok(backend)
    }

    fn wait_for_socket(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let is_socket = std::fs::symlink_metadata(&self.command.socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if is_socket {
                return Ok(());
            }
            let child = self.child.as_mut().expect("running backend");
            if let Some(status) = child
                .try_wait()
                .map_err(HarnessError::io("waiting for the backend"))?
            {
                self.child = None;
                return Err(HarnessError::BackendExited {
                    program: self.command.program_name(),
                    status,
                    socket: self.command.socket.clone(),
                    log: self.log.clone(),
                    log_tail: tail(&self.log, 20),
                });
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::BackendSocketTimeout {
                    program: self.command.program_name(),
                    socket: self.command.socket.clone(),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.command.socket
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (a backend that died under a guest is a finding).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    pub fn stop(mut self, grace: Duration) -> Result<ExitStatus> {
        let child = self.child.take().expect("running backend");
        terminate(child, grace).map_err(HarnessError::io(format!(
            "stopping {}",
            self.command.program_name()
        )))
    }

    /// SIGKILL at once, as a crash would: no cleanup, the socket file stays behind.
    pub fn kill(mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().expect("running backend");
        let what = format!("killing {}", self.command.program_name());
        child
            .kill()
            .and_then(|()| child.wait())
            .map_err(HarnessError::io(what))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = terminate(child, Duration::from_secs(2));
        }
    }
}

/// SIGTERM (so a daemon can clean up its socket), SIGKILL after `grace`, then reap.
pub(crate) fn terminate(mut child: Child, grace: Duration) -> std::io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own unreaped child: the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()
}

/// The last `lines` lines of a text file, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
