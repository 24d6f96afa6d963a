# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Sourced by the VM-less block benchmarks that run our daemons themselves (bench-gating,
# bench-replica, bench-failback, bench-hold-ratio): the release build, a scratch directory and
# the processes started there, both gone when the script exits however it exits.

# blk_bench_setup NAME TAG: log() prefixes NAME; builds the release binaries into $BIN; makes
# $DIR (under $BENCH_DIR, default /var/tmp, named after TAG); $PIDS collects the pids to kill
# at exit; $PY is python3.
blk_bench_setup() {
    BLK_BENCH_NAME=$1
    PY=$(command -v python3) || { log "python3 is needed"; exit 1; }
    cargo build -q --release -p vhost-user-blk-ft -p ft-common -p ft-tests --bins
    BIN=$ROOT/target/release
    DIR=$(mktemp -d "${BENCH_DIR:-/var/tmp}/ft-bench-$2.XXXXXX")
    PIDS=()
    trap blk_bench_cleanup EXIT
}

log() { echo "$BLK_BENCH_NAME: $*" >&2; }

blk_bench_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}

# wait_for SOCKET: until the unix socket exists, at most 20 s.
wait_for() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; log "no socket $1"; return 1; }
