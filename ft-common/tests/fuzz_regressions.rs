// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Replays the fuzz inputs kept in `fuzz/regressions/` (crashes found and fixed, and seeds for
//! the hostile cases of issue 16) through the same entry points the fuzz targets use
//! (`ft-common/tests/common/fuzz_replay.rs`).

#[path = "common/fuzz_replay.rs"]
mod fuzz_replay;

fn replay(target: &str, run: fn(&[u8])) {
    fuzz_replay::replay(env!("CARGO_MANIFEST_DIR"), target, run);
}

#[test]
fn vhost_user_protocol() {
    replay(
        "vhost_user_protocol",
        ft_common::vhost_user::fuzzing::protocol,
    );
}

#[test]
fn inflight_recovery() {
    replay(
        "inflight_recovery",
        ft_common::vhost_user::fuzzing::inflight_recovery,
    );
}

#[test]
fn control_codec() {
    replay("control_codec", ft_common::control::fuzzing::codec);
}

#[test]
fn control_server() {
    replay("control_server", ft_common::control::fuzzing::server);
}
