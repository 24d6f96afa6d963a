#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Failover soak (not in CI): one guest, a chain of N takeovers at random kill points
# ((a) mid-capture, (b) acknowledged before commit, (c) mid-commit, (d) idle), each one checked
# as in tests/tests/e2e_failover.rs (nothing leaves while frozen, TCP stream continuous, a fio
# round with verify completes on every new primary, no guest I/O or virtio error). Prints the
# table: kill point, downtime (kill to guest running), restore time, requests replayed, TCP
# bytes checked so far, longest stream gap, fio verify result.
#
# Usage: scripts/failover-soak.sh [N]     (N >= 1, default 20; root: netns and tap)
# Environment: FT_FAILOVER_MODE=paused|live (capture mode, default paused),
#              FT_KEEP_SCRATCH=1 keeps the logs of a passing run too.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-20}
[ "$N" -ge 1 ] 2>/dev/null || { echo "usage: $0 [N>=1]" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "failover-soak: run as root (network namespace, tap)" >&2; exit 1; }

"$ROOT/scripts/setup.sh"
cd "$ROOT"
# The test finds the daemons next to its own executable: build them in the same profile.
cargo build --release -q -p vhost-user-blk-ft -p vhost-user-net-ft -p ft-common
log=$(mktemp /tmp/ft-failover-soak.XXXXXX.log)
echo "failover-soak: $N kill points; full output in $log" >&2
status=0
FT_SOAK_POINTS=$N cargo test --release -q -p ft-tests --test e2e_failover soak_random_kill_points \
    -- --ignored --nocapture --test-threads=1 >"$log" 2>&1 || status=$?
# The table, as the test printed it last (it reprints it after every takeover).
awk '/^#   kill point/ { n = 0; delete t } /^#   kill point/ || /^[0-9]+ +[a-d] / { t[n++] = $0 }
     END { for (i = 0; i < n; i++) print t[i] }' "$log"
grep -E '^chain of|test result' "$log" || true
[ "$status" -eq 0 ] || { echo "failover-soak: FAILED (see $log)" >&2; tail -40 "$log" >&2; }
exit "$status"
