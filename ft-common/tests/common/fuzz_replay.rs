// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Replays the fuzz inputs kept in `fuzz/regressions/TARGET/` (crashes found and fixed, and
//! seeds for the hostile cases of issue 16) through the entry point the fuzz target uses.
//! Shared by the `fuzz_regressions` tests of ft-common, vhost-user-blk-ft and
//! vhost-user-net-ft (included with `#[path]`: no crate depends on another for it).

use std::path::Path;

/// Runs `run` on every file in `fuzz/regressions/target` (relative to the workspace root, one
/// level above `manifest_dir`); fails if there is none.
pub fn replay(manifest_dir: &str, target: &str, run: fn(&[u8])) {
    let dir = Path::new(manifest_dir)
        .join("../fuzz/regressions")
        .join(target);
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("regressions dir")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let data = std::fs::read(&path).expect("input");
        eprintln!("{target}: {}", path.display());
        run(&data);
        n += 1;
    }
    assert!(n > 0, "no inputs in {}", dir.display());
}
