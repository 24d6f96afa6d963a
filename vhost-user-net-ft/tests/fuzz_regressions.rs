// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Replays the fuzz inputs kept in `fuzz/regressions/` (crashes found and fixed, and seeds for
//! the hostile cases of issue 16) through the same entry points the fuzz targets use
//! (`ft-common/tests/common/fuzz_replay.rs`).

#[path = "../../ft-common/tests/common/fuzz_replay.rs"]
mod fuzz_replay;

fn replay(target: &str, run: fn(&[u8])) {
    fuzz_replay::replay(env!("CARGO_MANIFEST_DIR"), target, run);
}

#[test]
fn net_tx() {
    replay("net_tx", vhost_user_net_ft::fuzzing::net_tx);
}
