// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The serial console of a guest that this harness did not start: a QEMU restored by
//! `ftctl takeover` writes its console to a file (`-serial file:PATH`). Same markers as
//! [`super::vm`]: `FT-STAGE: <name>` and one `FT-RESULT: ...` line.
//!
//! A guest restored from a checkpoint carries on mid-test, so its file starts wherever the
//! guest was; a test follows the chain of files of successive primaries, newest last.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::vm::GuestResult;

const RESULT_MARK: &str = "FT-RESULT: ";
const STAGE_MARK: &str = "FT-STAGE: ";

/// A serial log file written by some QEMU.
#[derive(Clone, Debug)]
pub struct SerialFile {
    pub path: PathBuf,
}

impl SerialFile {
    pub fn new(path: impl Into<PathBuf>) -> SerialFile {
        SerialFile { path: path.into() }
    }

    /// The file's text so far (empty if it does not exist yet).
    pub fn text(&self) -> String {
        std::fs::read(&self.path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `FT-STAGE:` names so far, in order.
    pub fn stages(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| {
                l.find(STAGE_MARK)
                    .map(|i| l[i + STAGE_MARK.len()..].trim().to_owned())
            })
            .collect()
    }

    /// The result line, if printed.
    pub fn result(&self) -> Option<GuestResult> {
        let text = self.text();
        let line = text.lines().find_map(|l| {
            l.find(RESULT_MARK)
                .map(|i| l[i + RESULT_MARK.len()..].trim().to_owned())
        })?;
        Some(if line == "PASS" {
            GuestResult::Pass
        } else {
            GuestResult::Fail(line.strip_prefix("FAIL").unwrap_or(&line).trim().to_owned())
        })
    }

    /// Waits until a stage for which `f` holds appears, or the result line, or `timeout`.
    pub fn wait_stage(&self, timeout: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.stages().into_iter().find(|s| f(s)) {
                return Some(s);
            }
            if self.result().is_some() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the result line, up to `timeout`; `Timeout` without one.
    pub fn wait_result(&self, timeout: Duration) -> GuestResult {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.result() {
                return r;
            }
            if Instant::now() >= deadline {
                return GuestResult::Timeout;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `lines` lines, for assertion messages.
    pub fn tail(&self, lines: usize) -> String {
        let text = self.text();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "--- last {lines} lines of {} ---\n{}",
            self.path.display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }
}

/// Lines of a console that show a guest I/O or virtio error (the failover tests' "the guest did
/// not notice" check).
pub fn guest_errors(console: &str) -> Vec<String> {
    const MARKS: &[&str] = &[
        "I/O error",
        "blk_update_request",
        "Buffer I/O error",
        "is not a head",
        "virtio: ",
        "virtqueue",
        "fio: ",
        "verify: bad",
        "bad header",
        "Kernel panic",
        "Call Trace",
    ];
    console
        .lines()
        .filter(|l| MARKS.iter().any(|m| l.contains(m)))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_results_and_errors_are_found() {
        let d = std::env::temp_dir().join(format!("ft-serial-{}", std::process::id()));
        std::fs::write(
            &d,
            "x FT-STAGE: round-1\n[ 9.1] virtio_blk virtio0: req.0:id 3 is not a head!\nFT-RESULT: FAIL failover: fio\n",
        )
        .unwrap();
        let s = SerialFile::new(&d);
        assert_eq!(s.stages(), ["round-1"]);
        assert_eq!(s.result(), Some(GuestResult::Fail("failover: fio".into())));
        assert_eq!(guest_errors(&s.text()).len(), 1);
        assert_eq!(
            s.wait_stage(Duration::ZERO, |n| n.starts_with("round-")),
            Some("round-1".into())
        );
        std::fs::remove_file(&d).unwrap();
        assert_eq!(s.result(), None);
    }
}
