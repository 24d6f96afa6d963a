// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Epoch and generation numbers: the two clocks of output commit.
//!
//! An *epoch* is the interval between two checkpoints; epoch `E` ends at checkpoint `E`. Every held
//! request is tagged with the epoch in which the guest issued it, and the coordinator releases held
//! output with `COMMIT E` once checkpoint `E` is acknowledged. Epochs only grow.
//!
//! A *generation* fences coordinators: each command carries the generation of the coordinator
//! that sent it, and a daemon that has seen generation `G` refuses everything older, so a deposed
//! primary's coordinator can never release output again. A daemon run with a state directory
//! keeps its fence on disk ([`Fence::persistent`]), so "never" survives a daemon restart.

use crate::coordinator::generation_store::GenerationStore;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;

/// A checkpoint epoch. Monotonic: the only way forward is [`Epoch::next`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch that is open when a device starts, before the first seal.
    pub const FIRST: Epoch = Epoch(1);

    /// The epoch after this one. Saturates instead of wrapping: 2^64 epochs never happen, and
    /// wrapping would break the "epochs only grow" invariant.
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A coordinator generation, for fencing.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_only_grow() {
        assert!(Epoch::FIRST.next() > Epoch::FIRST);
        assert_eq!(Epoch(u64::MAX).next(), Epoch(u64::MAX));
    }

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
}
