#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The whole test suite, as CI runs it (.ci/run calls exactly this script).
#
# Installs what the tests need (idempotent, see scripts/setup.sh); checks formatting, lints
# (clippy with warnings denied, API use checked against the MSRV in Cargo.toml) and docs (rustdoc,
# warnings denied); builds every binary the integration tests start; then runs all tests of the
# workspace: unit and property tests, protocol tests against the real daemons, and QEMU (TCG)
# guest tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# What the README and the developers' guide promise about the code itself.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads="${FT_TEST_THREADS:-2}"
