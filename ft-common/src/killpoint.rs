// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Kill points: named places in the cycle where a failover test can freeze a process, so that
//! it kills the primary at an exact protocol moment instead of at a lucky time.
//!
//! A process started with `FT_STOP_AT=NAME[,NAME...]` and `FT_STOP_ARM=PATH` stops itself
//! (`SIGSTOP`) the first time it reaches one of those points while the file `PATH` exists. It
//! removes the file first, so exactly one hit per arming stops, whichever thread gets there.
//! The test waits for the process to be in state `T` (stopped), then SIGKILLs the primary.
//!
//! Points (see docs/operations.md, "Failover tests"):
//! - `before-commit` (ft-coordinator): checkpoint E is acknowledged, `COMMIT E` not sent yet.
//! - `before-fdatasync` (vhost-user-blk-ft): the commit of E submitted and drained its writes,
//!   its `fdatasync` has not run and no guest completion was delivered: mid-commit.
//! - `net-before-commit` (vhost-user-net-ft): `COMMIT E` admitted, no frame sent yet.
//! - `net-after-release` (vhost-user-net-ft): every queue pair sent its frames of `COMMIT E`,
//!   no reply yet.
//!
//! `FT_PANIC_AT=NAME[,NAME...]` (with the same `FT_STOP_ARM`) panics at the point instead: a
//! failure test of how the process survives a bug there (the blk control handler must fail that
//! command with nothing lost and stay usable).
//!
//! Without the variables set this is one load of a once-initialised value: no syscall, no
//! allocation. Nothing here changes what a process does apart from stopping or panicking it.

use std::path::PathBuf;
use std::sync::OnceLock;

struct Armed {
    points: Vec<String>,
    /// `FT_PANIC_AT`: panic instead of stopping.
    panic: bool,
    arm: PathBuf,
}

fn config() -> Option<&'static Armed> {
    static CONFIG: OnceLock<Option<Armed>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let (points, panic) = match std::env::var("FT_STOP_AT") {
                Ok(p) => (p, false),
                Err(_) => (std::env::var("FT_PANIC_AT").ok()?, true),
            };
            let arm = std::env::var_os("FT_STOP_ARM")?;
            Some(Armed {
                panic,
                points: points
                    .split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect(),
                arm: PathBuf::from(arm),
            })
        })
        .as_ref()
}

/// Stops the whole process here (or panics) if `point` is configured and armed (see the module
/// doc).
pub fn reached(point: &str) {
    let Some(c) = config() else { return };
    if !c.points.iter().any(|p| p == point) {
        return;
    }
    // Removing the arm file is the one-shot: only the thread whose unlink succeeds stops.
    if std::fs::remove_file(&c.arm).is_err() {
        return;
    }
    if c.panic {
        panic!("panic point {point} reached (failure test)");
    }
    log::warn!("kill point {point} reached: stopping (SIGSTOP) for the failover test");
    // SAFETY: raise(2) with a valid signal number; SIGSTOP stops every thread of the process.
    unsafe { libc::raise(libc::SIGSTOP) };
    log::warn!("kill point {point}: continued");
}

/// Whether process `pid` is stopped (state `T` in /proc/PID/stat), for tests waiting on a point.
pub fn is_stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|s| s == "T" || s == "t")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_is_not_stopped_and_a_missing_one_neither() {
        assert!(!is_stopped(std::process::id()));
        assert!(!is_stopped(u32::MAX));
    }

    #[test]
    fn an_unconfigured_point_returns() {
        // The test process has no FT_STOP_AT: reaching any point is a no-op.
        reached("before-commit");
    }

    #[test]
    fn a_child_stopped_by_sigstop_is_seen_stopped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // SAFETY: signalling our own unreaped child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !is_stopped(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(is_stopped(pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
