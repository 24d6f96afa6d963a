// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which QEMU runs a guest: the host's (Debian 12: 7.2) or QEMU 10 (Debian 13's package, from
//! the tree `scripts/qemu10-root.sh` builds once and caches next to the guest image, run by
//! `scripts/qemu10.sh` with that tree's own loader and libraries: no chroot, no mounts, host
//! paths work unchanged).
//!
//! What differs for the tests: QEMU 7.2 under TCG crashes when a guest enables MSI-X on a
//! vhost-user virtio-net device, so its NIC gets `vectors=0`; QEMU 10 runs it with MSI-X (the
//! default). QEMU 10 deprecates `reconnect=SECONDS` on socket chardevs for `reconnect-ms`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Mutex;

use super::error::{HarnessError, Result};
use super::image::{cache_dir, repo_root};

/// The QEMU a guest test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuFlavor {
    /// The host's QEMU: `FT_QEMU`, else `qemu-system-x86_64` on PATH (7.2 on Debian 12).
    Host,
    /// QEMU 10 from the cached Debian 13 tree (`FT_QEMU10_ROOT` overrides its place).
    Qemu10,
}

impl QemuFlavor {
    /// The program to run.
    pub fn binary(self) -> OsString {
        match self {
            QemuFlavor::Host => {
                std::env::var_os("FT_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into())
            }
            QemuFlavor::Qemu10 => repo_root().join("scripts/qemu10.sh").into(),
        }
    }

    /// Whether the virtio-net device may use MSI-X (see the module docs).
    pub fn net_msix(self) -> bool {
        self == QemuFlavor::Qemu10
    }

    /// The `-chardev socket` option that makes QEMU reconnect after `secs` seconds.
    pub fn reconnect_option(self, secs: u32) -> String {
        match self {
            QemuFlavor::Host => format!("reconnect={secs}"),
            QemuFlavor::Qemu10 => format!("reconnect-ms={}", u64::from(secs) * 1000),
        }
    }

    /// Where the QEMU 10 tree lives.
    pub fn qemu10_root() -> PathBuf {
        std::env::var_os("FT_QEMU10_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_dir().join("qemu10-root"))
    }

    /// Makes sure this QEMU can run: for QEMU 10, builds the tree if it is missing (once per
    /// process; `scripts/qemu10-root.sh` returns at once when it is complete).
    pub fn ensure(self) -> Result<()> {
        if self == QemuFlavor::Host {
            return super::image::ensure_host_tools();
        }
        static DONE: Mutex<bool> = Mutex::new(false);
        let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return Ok(());
        }
        let script = repo_root().join("scripts/qemu10-root.sh");
        let status = std::process::Command::new("bash")
            .arg(&script)
            .status()
            .map_err(HarnessError::io(format!("running {}", script.display())))?;
        if !status.success() {
            return Err(HarnessError::Script { script, status });
        }
        let root = Self::qemu10_root();
        if !root.join(".ft-complete").is_file() {
            return Err(HarnessError::Missing(format!(
                "qemu10-root.sh succeeded but {} is incomplete",
                root.display()
            )));
        }
        *done = true;
        Ok(())
    }
}
