// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Replays the fuzz inputs kept in `fuzz/regressions/` (crashes found and fixed, and seeds for
//! the hostile cases of issue 16) through the same entry points the fuzz targets use.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("regressions dir") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("input");
        eprintln!("{target}: {}", path.display());
        run(&data);
        n += 1;
    }
    assert!(n > 0, "no inputs in {}", dir.display());
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
