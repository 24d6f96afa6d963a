// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Small state files replaced atomically and durably: after [`replace_file`] returns, a crash
//! leaves either the old content or the new one, never a mix, and the new one survives power
//! loss (write a temporary file beside it, fsync, rename over, fsync the directory).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `path` with `body`, atomically and durably (see the module doc).
pub fn replace_file(path: &Path, body: &[u8]) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "file path has no name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    };
    let r = write();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_content_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("ft-durable-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        let p = dir.join("state");
        replace_file(&p, b"one\n").unwrap();
        replace_file(&p, b"two\n").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two\n");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        // A missing directory is an error, and nothing is left behind.
        assert!(replace_file(&dir.join("no/such"), b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
