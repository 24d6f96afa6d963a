// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The coordinator's persisted generation (fencing). On start the coordinator reads `G`, takes
//! `G+1`, and persists it before it sends anything, so a restarted coordinator never reuses a
//! generation an earlier incarnation may have used.
//!
//! Invariant: the file always holds a complete record of the newest generation handed out: it
//! is written to a temporary file in the same directory, `fsync`ed, renamed over the old file,
//! and the directory is `fsync`ed, so a crash leaves the old or the new value, never a torn one.

use crate::epoch::Generation;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize)]
struct Record {
    generation: u64,
}

/// Largest state file accepted; the record is a few bytes.
const MAX_LEN: u64 = 4096;

/// The state file holding the newest generation (the coordinator's; a daemon's fence).
#[derive(Debug)]
pub struct GenerationStore {
    path: PathBuf,
}

impl GenerationStore {
    pub fn new(path: impl Into<PathBuf>) -> GenerationStore {
        GenerationStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored generation; `Generation(0)` when the file does not exist yet.
    pub fn load(&self) -> io::Result<Generation> {
        let md = match fs::metadata(&self.path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Generation(0)),
            Err(e) => return Err(e),
        };
        if md.len() > MAX_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is too large for a state file", self.path.display()),
            ));
        }
        let text = fs::read_to_string(&self.path)?;
        let r: Record = serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", self.path.display()),
            )
        })?;
        Ok(Generation(r.generation))
    }

    /// Durably replaces the stored generation.
    pub fn store(&self, g: Generation) -> io::Result<()> {
        let mut body = serde_json::to_vec(&Record { generation: g.0 }).map_err(io::Error::other)?;
        body.push(b'\n');
        crate::durable::replace_file(&self.path, &body)
    }

    /// Reads `G`, persists `G+1` and returns it: the generation of a newly started coordinator.
    pub fn advance(&self) -> io::Result<Generation> {
        let g = self.load()?;
        let next = g.0.checked_add(1).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "generation numbers exhausted")
        })?;
        self.store(Generation(next))?;
        Ok(Generation(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ft-gen-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn advance_never_reuses_a_generation() {
        let d = tmp("adv");
        let s = GenerationStore::new(d.join("state"));
        assert_eq!(s.load().unwrap(), Generation(0));
        assert_eq!(s.advance().unwrap(), Generation(1));
        assert_eq!(s.advance().unwrap(), Generation(2));
        assert_eq!(
            GenerationStore::new(d.join("state")).load().unwrap(),
            Generation(2)
        );
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_or_huge_files_are_errors() {
        let d = tmp("bad");
        let p = d.join("state");
        fs::write(&p, "garbage").unwrap();
        assert!(GenerationStore::new(&p).advance().is_err());
        fs::write(&p, vec![b' '; 10_000]).unwrap();
        assert!(GenerationStore::new(&p).load().is_err());
        fs::write(&p, format!("{{\"generation\":{}}}", u64::MAX)).unwrap();
        assert!(GenerationStore::new(&p).advance().is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
