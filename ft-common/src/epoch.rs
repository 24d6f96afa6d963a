// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Epoch and generation numbers: the two clocks of output commit.
//!
//! An *epoch* is the interval between two checkpoints; epoch `E` ends at checkpoint `E`. Every held
//! request is tagged with the epoch in which the guest issued it, and the coordinator releases held
//! output with `COMMIT E` once checkpoint `E` is acknowledged. Epochs only grow.
//!
//! A *generation* fences coordinators: each command carries the generation of the coordinator
//! that sent it, and a daemon that has seen generation `G` refuses everything older, so a deposed
//! primary's coordinator can never release output again (the fence and its persisted store are in
//! [`crate::fence`]).

use serde::{Deserialize, Serialize};
use std::fmt;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_only_grow() {
        assert!(Epoch::FIRST.next() > Epoch::FIRST);
        assert_eq!(Epoch(u64::MAX).next(), Epoch(u64::MAX));
    }
}
