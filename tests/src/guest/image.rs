// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Locate or build what a guest test needs: host tools (QEMU, qemu-storage-daemon, fio, ...)
//! and the cached guest kernel + initramfs.
//!
//! Both come from idempotent scripts in the repository, so a test on a fresh machine sets itself
//! up instead of skipping: `scripts/setup.sh` (run only when a tool is missing) and
//! `tests/guest/build-guest.sh` (always run; it returns at once when its stamp is current).
//! Any failure is an error for the caller to fail the test with.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use super::error::{HarnessError, Result};

/// Host programs the guest tests and the guest image builder need (all from scripts/setup.sh).
const HOST_TOOLS: &[&str] = &[
    "qemu-system-x86_64",
    "qemu-storage-daemon",
    "fio",
    "iperf3",
    "busybox",
    "cpio",
    "xz",
    "/usr/sbin/ip",
];

/// The guest kernel and initramfs built by `tests/guest/build-guest.sh`.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The repository root (the workspace containing this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// A workspace binary next to the running test's own executable (`target/<profile>/deps/X` ->
/// `target/<profile>/NAME`), built with `cargo build -p PACKAGE --bin NAME` if missing.
pub fn workspace_binary(package: &str, name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(HarnessError::io("test executable path"))?;
    let dir = exe.parent().and_then(Path::parent).ok_or_else(|| {
        HarnessError::Missing(format!("{} is not in target/<profile>/deps", exe.display()))
    })?;
    let bin = dir.join(name);
    if !bin.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", package, "--bin", name])
            .current_dir(repo_root())
            .status()
            .map_err(HarnessError::io("running cargo build"))?;
        if !status.success() {
            return Err(HarnessError::Missing(format!("building {name} failed")));
        }
    }
    if !bin.is_file() {
        return Err(HarnessError::Missing(format!(
            "{} missing after build",
            bin.display()
        )));
    }
    Ok(bin)
}

/// `${FT_CACHE:-$HOME/.cache/ft-vhost}`: where built guest images are kept across runs.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FT_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/ft-vhost")
}

/// Full path of `program` found on `PATH`.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn run_script(script: &Path, args: &[&OsStr]) -> Result<()> {
    // Output goes straight to the test's stderr: a first run downloads and builds for a while.
    let status = Command::new("bash")
        .arg(script)
        .args(args)
        .status()
        .map_err(HarnessError::io(format!("running {}", script.display())))?;
    if status.success() {
        Ok(())
    } else {
        Err(HarnessError::Script {
            script: script.to_path_buf(),
            status,
        })
    }
}

/// Makes sure QEMU and the other host tools are installed, running `scripts/setup.sh` if not.
pub fn ensure_host_tools() -> Result<()> {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    let missing = |tools: &[&str]| -> Vec<String> {
        tools
            .iter()
            .filter(|t| {
                if t.starts_with('/') {
                    !is_executable(Path::new(t))
                } else {
                    find_in_path(t).is_none()
                }
            })
            .map(|t| t.to_string())
            .collect()
    };
    if !missing(HOST_TOOLS).is_empty() {
        run_script(&repo_root().join("scripts/setup.sh"), &[])?;
        let still = missing(HOST_TOOLS);
        if !still.is_empty() {
            return Err(HarnessError::Missing(format!(
                "scripts/setup.sh ran but {} still missing from PATH",
                still.join(", ")
            )));
        }
    }
    *done = true;
    Ok(())
}

impl GuestImage {
    /// Ensures host tools, then builds the guest into `cache_dir()/guest` if it is missing or
    /// stale, and returns its paths. Runs the builder once per process.
    pub fn ensure() -> Result<GuestImage> {
        Self::ensure_in(&cache_dir().join("guest"))
    }

    /// Like [`GuestImage::ensure`] with an explicit output directory.
    pub fn ensure_in(dir: &Path) -> Result<GuestImage> {
        static BUILT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
        ensure_host_tools()?;
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        let image = GuestImage {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd.img"),
        };
        if !built.iter().any(|d| d == dir) {
            run_script(
                &repo_root().join("tests/guest/build-guest.sh"),
                &[dir.as_os_str()],
            )?;
            built.push(dir.to_path_buf());
        }
        for file in [&image.kernel, &image.initrd] {
            if !file.is_file() {
                return Err(HarnessError::Missing(format!(
                    "build-guest.sh succeeded but {} is missing",
                    file.display()
                )));
            }
        }
        Ok(image)
    }
}
