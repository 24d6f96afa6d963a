// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-test scratch directories (disk images, sockets, logs).
//!
//! Removed on drop, except while panicking (a failed test keeps its logs; the path is printed)
//! or when `FT_KEEP_SCRATCH` is set. Paths stay short: unix socket paths are limited to 107 bytes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::error::{HarnessError, Result};

pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `$TMPDIR/ft-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Result<ScratchDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ft-{name}-{}-{n}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(HarnessError::io(format!(
                "removing stale {}",
                path.display()
            )))?;
        }
        std::fs::create_dir_all(&path)
            .map_err(HarnessError::io(format!("creating {}", path.display())))?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates a sparse raw disk image of `size` bytes in the scratch directory.
    pub fn raw_image(&self, name: &str, size: u64) -> Result<PathBuf> {
        let path = self.join(name);
        let file = std::fs::File::create(&path)
            .map_err(HarnessError::io(format!("creating {}", path.display())))?;
        file.set_len(size)
            .map_err(HarnessError::io(format!("sizing {}", path.display())))?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("FT_KEEP_SCRATCH").is_some() {
            eprintln!("scratch directory kept: {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
