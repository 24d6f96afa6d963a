// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vm.json` in the standby's store: how the primary's QEMU and device daemons were started, so
//! a takeover rebuilds the same virtual hardware without the operator typing it twice.
//!
//! `ftctl record-vm --store DIR --qmp QMP_SOCKET --device NAME=CONTROL_SOCKET...` fills it from
//! the running processes themselves: the peer of each unix socket (`SO_PEERCRED`) is the process
//! listening on it, and `/proc/PID/cmdline` is its exact argument vector. Nothing is retyped, so
//! nothing can drift from what really runs. A daemon's control socket is used, never its
//! vhost-user socket (a probe there could be taken for the VMM).
//!
//! Invariant: the file is replaced atomically (temporary file, fsync, rename, directory fsync):
//! a reader sees the old or the new record, never a torn one.

use crate::control::{ControlClient, DeviceKind, Reply, Request};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File name of the record inside the store directory.
pub const FILE_NAME: &str = "vm.json";
/// Current format of `vm.json`.
pub const FORMAT: u32 = 1;
/// Largest `vm.json` accepted.
const MAX_LEN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RecordError {
    let what = what.into();
    move |source| RecordError::Io { what, source }
}

/// One device daemon of the primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonRecord {
    /// The coordinator's name for it (`--device NAME=...`).
    pub name: String,
    /// The device name the daemon reports (matches `TransactionState::device` in checkpoints).
    pub device: String,
    pub kind: DeviceKind,
    /// Its control socket.
    pub control: PathBuf,
    /// Its argument vector, program first.
    pub argv: Vec<String>,
}

/// What `vm.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub format: u32,
    /// QEMU's argument vector, program first.
    pub qemu: Vec<String>,
    pub daemons: Vec<DaemonRecord>,
}

impl VmRecord {
    /// Reads `DIR/vm.json`.
    pub fn load(store: &Path) -> Result<VmRecord, RecordError> {
        let path = store.join(FILE_NAME);
        let md = fs::metadata(&path).map_err(io_err(format!("reading {}", path.display())))?;
        if md.len() > MAX_LEN {
            return Err(RecordError::Invalid(format!(
                "{} is larger than {MAX_LEN} bytes",
                path.display()
            )));
        }
        let text =
            fs::read_to_string(&path).map_err(io_err(format!("reading {}", path.display())))?;
        let r: VmRecord = serde_json::from_str(&text)
            .map_err(|e| RecordError::Invalid(format!("{}: {e}", path.display())))?;
        if r.format != FORMAT {
            return Err(RecordError::Invalid(format!(
                "{}: format {} (this build reads {FORMAT})",
                path.display(),
                r.format
            )));
        }
        if r.qemu.is_empty() {
            return Err(RecordError::Invalid(format!(
                "{}: empty QEMU command line",
                path.display()
            )));
        }
        Ok(r)
    }

    /// Atomically replaces `DIR/vm.json`.
    pub fn save(&self, store: &Path) -> Result<(), RecordError> {
        fs::create_dir_all(store).map_err(io_err(format!("creating {}", store.display())))?;
        let path = store.join(FILE_NAME);
        let mut body = serde_json::to_vec_pretty(self)
            .map_err(|e| RecordError::Invalid(format!("serializing the record: {e}")))?;
        body.push(b'\n');
        crate::durable::replace_file(&path, &body).map_err(|source| RecordError::Io {
            what: format!("writing {}", path.display()),
            source,
        })
    }

    /// Builds the record from the running primary: QEMU behind `qmp`, each daemon behind its
    /// control socket (asked for its device name and kind with `STATUS`).
    pub fn from_running(
        qmp: &Path,
        devices: &[(String, PathBuf)],
        timeout: Duration,
    ) -> Result<VmRecord, RecordError> {
        let qemu = cmdline(peer_pid(qmp)?)?;
        let mut daemons = Vec::new();
        for (name, control) in devices {
            let argv = cmdline(peer_pid(control)?)?;
            let mut c = ControlClient::connect(control, timeout)
                .map_err(|e| RecordError::Invalid(format!("{name}: {e}")))?;
            let status = match c.call(&Request::Status) {
                Ok(Reply::Status(s)) => s,
                Ok(other) => {
                    return Err(RecordError::Invalid(format!(
                        "{name}: unexpected reply to STATUS: {other:?}"
                    )))
                }
                Err(e) => return Err(RecordError::Invalid(format!("{name}: STATUS: {e}"))),
            };
            daemons.push(DaemonRecord {
                name: name.clone(),
                device: status.device,
                kind: status.kind,
                control: control.clone(),
                argv,
            });
        }
        Ok(VmRecord {
            format: FORMAT,
            qemu,
            daemons,
        })
    }
}

/// The pid of the process listening on the unix socket `path` (`SO_PEERCRED` of a connection;
/// the credentials are the listener's, taken when it called `listen`).
pub fn peer_pid(path: &Path) -> Result<u32, RecordError> {
    let s =
        UnixStream::connect(path).map_err(io_err(format!("connecting to {}", path.display())))?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt on our own connected socket into a correctly sized ucred.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(RecordError::Io {
            what: format!("SO_PEERCRED on {}", path.display()),
            source: io::Error::last_os_error(),
        });
    }
    u32::try_from(cred.pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| RecordError::Invalid(format!("no peer pid for {}", path.display())))
}

/// The argument vector of process `pid`.
pub fn cmdline(pid: u32) -> Result<Vec<String>, RecordError> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(io_err(format!("reading /proc/{pid}/cmdline")))?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| {
            OsString::from_vec(a.to_vec())
                .into_string()
                .map_err(|_| RecordError::Invalid(format!("process {pid}: non-UTF-8 argument")))
        })
        .collect::<Result<_, _>>()?;
    if args.is_empty() {
        return Err(RecordError::Invalid(format!(
            "process {pid} has no command line (a zombie?)"
        )));
    }
    // argv[0] may be relative: record the executable's real path.
    let exe: PathBuf = fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(io_err(format!("reading /proc/{pid}/exe")))?;
    let mut args = args;
    args[0] = exe.to_string_lossy().into_owned();
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ft-vmrec-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn save_and_load_round_trip_and_bad_files_are_refused() {
        let d = tmp("rt");
        let r = VmRecord {
            format: FORMAT,
            qemu: vec![
                "/usr/bin/qemu-system-x86_64".into(),
                "-m".into(),
                "320M".into(),
            ],
            daemons: vec![DaemonRecord {
                name: "blk".into(),
                device: "disk.raw".into(),
                kind: DeviceKind::Blk,
                control: "/run/blk.ctl".into(),
                argv: vec!["vhost-user-blk-ft".into(), "--ft".into(), "hold".into()],
            }],
        };
        r.save(&d).unwrap();
        assert_eq!(VmRecord::load(&d).unwrap(), r);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1, "no temporary left");
        fs::write(
            d.join(FILE_NAME),
            "{\"format\":2,\"qemu\":[\"q\"],\"daemons\":[]}",
        )
        .unwrap();
        assert!(VmRecord::load(&d)
            .unwrap_err()
            .to_string()
            .contains("format 2"));
        fs::write(d.join(FILE_NAME), "garbage").unwrap();
        assert!(VmRecord::load(&d).is_err());
        fs::remove_dir_all(&d).unwrap();
        assert!(VmRecord::load(&d).is_err());
    }

    #[test]
    fn the_peer_of_a_socket_is_its_listener_with_its_command_line() {
        let d = tmp("peer");
        let sock = d.join("s.sock");
        let _l = UnixListener::bind(&sock).unwrap();
        assert_eq!(peer_pid(&sock).unwrap(), std::process::id());
        let argv = cmdline(std::process::id()).unwrap();
        assert_eq!(
            PathBuf::from(&argv[0]),
            std::env::current_exe().unwrap().canonicalize().unwrap()
        );
        assert!(peer_pid(&d.join("missing.sock")).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
