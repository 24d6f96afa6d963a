#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this script).
#
# Installs what the tests need (idempotent, see scripts/setup.sh), builds every binary the
# integration tests start, then runs all tests of the workspace: unit and property tests,
# protocol tests against the real daemons, and QEMU (TCG) guest tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads="${FT_TEST_THREADS:-2}"
