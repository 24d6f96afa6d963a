#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Run one coverage-guided fuzz target (libFuzzer via libfuzzer-sys) for a number of executions.
#
#   scripts/fuzz.sh TARGET EXECS [extra libFuzzer args...]
#   scripts/fuzz.sh list
#
# Targets: vhost_user_protocol, blk_chain, net_tx, inflight_recovery, control_codec,
# control_server (fuzz/fuzz_targets/).
# Works on the stable toolchain: SanitizerCoverage is enabled with stable -C flags (no
# -Zsanitizer, so no ASan; set FUZZ_ASAN=1 to add it through RUSTC_BOOTSTRAP=1). The corpus
# lives in fuzz/corpus/TARGET (not committed), crashes and hangs in fuzz/artifacts/TARGET.
# Inputs that found a bug go to fuzz/regressions/TARGET/, which `cargo test` replays (the same
# entry points, as ordinary tests). Not run by CI.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
targets=(vhost_user_protocol blk_chain net_tx inflight_recovery control_codec control_server)
if [[ "${1:-}" == list || $# -lt 2 ]]; then
    echo "usage: $0 TARGET EXECS [libFuzzer args]; targets: ${targets[*]}" >&2
    [[ "${1:-}" == list ]] && exit 0 || exit 2
fi
target=$1 execs=$2
shift 2
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares"
flags+=" --cfg fuzzing -Cdebug-assertions -Coverflow-checks -Cforce-frame-pointers"
if [[ "${FUZZ_ASAN:-0}" == 1 ]]; then
    export RUSTC_BOOTSTRAP=1
    flags+=" -Zsanitizer=address"
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="$flags" cargo build --release --target "$triple" --bin "$target"
bin=target/$triple/release/$target
mkdir -p "corpus/$target" "artifacts/$target"
seeds=()
[[ -d "regressions/$target" ]] && seeds+=("regressions/$target")
# -runs counts executions; -timeout (s) turns a slow input into a reported hang.
exec "$bin" "corpus/$target" "${seeds[@]}" -runs="$execs" -timeout=10 -max_len=4096 \
    -artifact_prefix="artifacts/$target/" -print_final_stats=1 "$@"
