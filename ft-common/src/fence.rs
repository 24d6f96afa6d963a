// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fencing by generation: the [`Fence`] a daemon keeps (the newest coordinator generation it
//! has seen; everything older is refused) and the [`GenerationStore`], the small state file that
//! persists a generation: the coordinator's own (read `G`, take `G+1`) and a daemon's fence
//! (`--state-dir`), so "refused for good" survives a restart.
//!
//! Invariants:
//! - A persistent fence admits a generation only after it is durably stored, so after a crash
//!   or restart the fence is never below a generation whose command was acted upon.
//! - The state file always holds a complete record of the newest generation handed out
//!   ([`crate::durable::replace_file`]: temporary file, `fsync`, rename, directory `fsync`), so a
//!   crash leaves the old or the new value, never a torn one.

use crate::epoch::Generation;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The fence a daemon keeps: the newest generation it has seen.
///
/// Invariant of a persistent fence: a generation is admitted only after it is durably stored
/// (write, fsync, rename, fsync the directory), so after a crash or restart the fence is never
/// below a generation whose command was acted upon.
#[derive(Debug, Default)]
pub struct Fence {
    newest: Generation,
    store: Option<GenerationStore>,
}

/// Why a command's generation was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// A newer generation that could not be made durable is refused: admitting it would let
    /// the fence go back after a restart.
    #[error("cannot persist generation {generation} to {path}: {source}")]
    Persist {
        generation: Generation,
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A command of an older generation than the fence has seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("generation {got} is older than generation {newest} already seen: fenced")]
pub struct Fenced {
    pub got: Generation,
    pub newest: Generation,
}

impl Fence {
    /// A fence kept in `store`: it starts at the stored generation (0 if the file does not
    /// exist yet) and stores every newer generation before admitting it. A corrupt file is an
    /// error, never a silent reset.
    pub fn persistent(store: GenerationStore) -> io::Result<Fence> {
        Ok(Fence {
            newest: store.load()?,
            store: Some(store),
        })
    }

    /// The persistent fence of a daemon's `--state-dir` (`DIR/fence.json`), creating the
    /// directory (mode 0700) if needed.
    pub fn from_state_dir(dir: &std::path::Path) -> io::Result<Fence> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Fence::persistent(GenerationStore::new(dir.join("fence.json")))
    }

    /// Admits a command of generation `gen`, ratcheting the fence forward. Older generations are
    /// refused; equal or newer ones pass (a newer one only once it is stored, if persistent).
    pub fn admit(&mut self, gen: Generation) -> Result<(), AdmitError> {
        if gen < self.newest {
            return Err(Fenced {
                got: gen,
                newest: self.newest,
            }
            .into());
        }
        if gen > self.newest {
            if let Some(store) = &self.store {
                store.store(gen).map_err(|source| AdmitError::Persist {
                    generation: gen,
                    path: store.path().display().to_string(),
                    source,
                })?;
            }
        }
        self.newest = gen;
        Ok(())
    }

    /// The newest generation admitted so far.
    pub fn newest(&self) -> Generation {
        self.newest
    }
}

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

    #[test]
    fn fence_refuses_older_generations() {
        let mut fence = Fence::default();
        fence.admit(Generation(3)).unwrap();
        fence.admit(Generation(3)).unwrap();
        assert!(matches!(
            fence.admit(Generation(2)),
            Err(AdmitError::Fenced(Fenced {
                got: Generation(2),
                newest: Generation(3)
            }))
        ));
        fence.admit(Generation(7)).unwrap();
        assert!(fence.admit(Generation(3)).is_err());
        assert_eq!(fence.newest(), Generation(7));
    }

    #[test]
    fn a_persistent_fence_survives_a_restart_and_refuses_what_it_cannot_store() {
        let dir = std::env::temp_dir().join(format!("ft-fence-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fence.json");
        let mut f = Fence::persistent(GenerationStore::new(&path)).unwrap();
        assert_eq!(f.newest(), Generation(0));
        f.admit(Generation(5)).unwrap();
        drop(f);
        let mut f = Fence::persistent(GenerationStore::new(&path)).unwrap();
        assert_eq!(f.newest(), Generation(5));
        assert!(matches!(f.admit(Generation(4)), Err(AdmitError::Fenced(_))));
        // The directory is gone: a newer generation cannot be stored, so it is not admitted.
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            f.admit(Generation(6)),
            Err(AdmitError::Persist { .. })
        ));
        assert_eq!(f.newest(), Generation(5));
        f.admit(Generation(5)).unwrap();
    }

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
