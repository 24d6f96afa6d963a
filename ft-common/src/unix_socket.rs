// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unix listening sockets that appear in the filesystem only once they accept connections.
//!
//! `UnixListener::bind` is bind(2) then listen(2): between the two the socket file exists but a
//! connect(2) is refused. A VMM or script that starts as soon as the file appears (and our own
//! tests, which wait for it) can fall into that window on a loaded host. Binding under a
//! temporary name in the same directory, then renaming into place, makes the file's appearance
//! atomic with listening.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Binds and listens on `path`, which must not exist, with permissions `mode`; the file appears
/// only when it already listens. Replaces nothing: callers remove a stale socket first.
pub fn bind_listening(path: &Path, mode: u32) -> io::Result<UnixListener> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let tmp = path.with_file_name(format!(
        ".{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let listener = match UnixListener::bind(&tmp) {
        Ok(l) => l,
        // A temporary name longer than sun_path allows: bind the final name directly.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            let l = UnixListener::bind(path)?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
            return Ok(l);
        }
        Err(e) => return Err(e),
    };
    let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).and_then(|()| {
        // link(2) + unlink instead of rename(2): it fails rather than replace a file that
        // appeared at `path` meanwhile.
        fs::hard_link(&tmp, path)
    });
    let _ = fs::remove_file(&tmp);
    placed.map(|()| listener)
}

/// The socket file at a path, removed on drop if it is still the same file (a newer daemon
/// may have replaced it).
pub struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    /// Takes charge of the file now at `path`.
    pub fn new(path: &Path) -> io::Result<SocketFile> {
        let md = fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            id: (md.dev(), md.ino()),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(md) = fs::symlink_metadata(&self.path) {
            if (md.dev(), md.ino()) == self.id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_file_appears_listening_with_its_mode_and_goes_with_its_guard() {
        let dir = std::env::temp_dir().join(format!("ft-unix-socket-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = bind_listening(&path, 0o600).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        UnixStream::connect(&path).unwrap();
        l.accept().unwrap();
        // Only the final name is left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        // An existing file is not replaced.
        assert!(bind_listening(&path, 0o600).is_err());
        drop(SocketFile::new(&path).unwrap());
        assert!(!path.exists());
        fs::remove_dir(&dir).unwrap();
    }
}
