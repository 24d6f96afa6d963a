#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Failback: blocks copied after N seconds of writes on the new primary, against a full sync.
# VM-less (ft-blk-bench drives the daemons over vhost-user, ft-coordinator --checkpointer sim:0
# cuts every 5 ms), both hosts' images on this machine's disk, replication over loopback TCP.
#
# Per N (--secs, default "2 10"):
#  1. A (primary, --dirty-log) replicates to B (ft-standby --replica-dirty-log) while
#     ft-blk-bench writes 4 KiB randomly in the first A_MIB (default 64) MiB for 2 s; A is then
#     killed (SIGKILL): its log counts every block of its activity-log extents.
#  2. Takeover: a daemon on B's image with B's log; randwrite4k-qd32 over the whole image for
#     N s; clean stop.
#  3. Failback: ft-standby on A's image with A's log; B's daemon restarted with --replicate-to
#     A --replica-resync dirty; timed until "failback resync done"; images compared.
#  4. The same image copied by a full sync (--replica-resync full) to a third image, timed.
# Then the log's cost on the hot path: hold mode with event-driven cuts (the commit is the
# critical path), randwrite4k at QD1 and QD32 over 256 MiB, without and with --dirty-log,
# interleaved, COST_ROUNDS (default 2) rounds, medians.
#
# Usage: scripts/bench-failback.sh [--size-mib N] [--secs "2 10"] [--a-mib N] [--cost-rounds N] [--no-doc]
# Writes its table into docs/benchmarks.md between the bench-failback markers.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=lib/doc-section.sh
source "$ROOT/scripts/lib/doc-section.sh"
# shellcheck source=lib/blk-bench.sh
source "$ROOT/scripts/lib/blk-bench.sh"

SIZE_MIB=1024
SECS="2 10"
A_MIB=64
COST_ROUNDS=2
WRITE_DOC=1
PORT=47110
while [ $# -gt 0 ]; do
    case "$1" in
        --size-mib) SIZE_MIB=$2; shift 2 ;;
        --secs) SECS=$2; shift 2 ;;
        --a-mib) A_MIB=$2; shift 2 ;;
        --cost-rounds) COST_ROUNDS=$2; shift 2 ;;
        --no-doc) WRITE_DOC=0; shift ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "bench-failback: unknown argument $1" >&2; exit 2 ;;
    esac
done

blk_bench_setup bench-failback fb

now() { date +%s.%N; }
# wait_line FILE PATTERN: until PATTERN appears in FILE (600 s at most).
wait_line() { for _ in $(seq 6000); do grep -q "$2" "$1" && return 0; sleep 0.1; done; log "never: $2 in $1"; return 1; }

# standby NAME IMAGE LOG: an ft-standby replica service; sets SB.
standby() {
    rm -rf "$DIR/store-$1" "$DIR/sb.sock"
    "$BIN/ft-standby" --listen "unix:$DIR/sb.sock" --store "$DIR/store-$1" \
        --replica-image "$2" --replica-listen "tcp:127.0.0.1:$PORT" \
        ${3:+--replica-dirty-log "$3"} 2>"$DIR/$1.standby.log" &
    SB=$!
    PIDS+=("$SB")
    wait_for "$DIR/sb.sock"
}

# daemon NAME IMAGE ARGS...: the block daemon and a coordinator cutting every 5 ms; sets D, C.
daemon() {
    local name=$1 img=$2
    shift 2
    rm -f "$DIR/blk.sock" "$DIR/ctl.sock" "$DIR/api" "$DIR/state"
    "$BIN/vhost-user-blk-ft" --socket "$DIR/blk.sock" --image "$img" --ft hold \
        --control "$DIR/ctl.sock" "$@" 2>"$DIR/$name.daemon.log" &
    D=$!
    PIDS+=("$D")
    wait_for "$DIR/blk.sock"
    "$BIN/ft-coordinator" --device "blk=$DIR/ctl.sock" --checkpointer sim:0 --unsafe-no-checkpoint \
        --interval-ms 5 --state-file "$DIR/state" --api "$DIR/api" 2>"$DIR/$name.coord.log" &
    C=$!
    PIDS+=("$C")
    wait_for "$DIR/api"
}

bench() { # SECS SIZE
    "$BIN/ft-blk-bench" --socket "$DIR/blk.sock" --workloads randwrite4k-qd32 --runtime "$1" \
        --warmup 0 --size "$2" --json >/dev/null
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
ROWS=()
for N in $SECS; do
    log "N=$N: images of $SIZE_MIB MiB"
    rm -f "$DIR"/*.img "$DIR"/*.log "$DIR"/*.dlog
    head -c "$((SIZE_MIB << 20))" /dev/urandom >"$DIR/a.img"
    cp "$DIR/a.img" "$DIR/b.img"

    log "N=$N: 1. A primary replicating to B, 2 s of writes in $A_MIB MiB, then SIGKILL"
    standby b "$DIR/b.img" "$DIR/b.dlog"
    daemon a1 "$DIR/a.img" --dirty-log "$DIR/a.dlog" --replicate-to "tcp:127.0.0.1:$PORT"
    bench 2 "${A_MIB}M"
    kill -9 "$D" "$C"; wait "$D" "$C" 2>/dev/null || true
    kill "$SB"; wait "$SB" 2>/dev/null || true

    log "N=$N: 2. takeover: B writes for $N s"
    daemon b1 "$DIR/b.img" --dirty-log "$DIR/b.dlog"
    bench "$N" "${SIZE_MIB}M"
    kill "$C"; wait "$C" 2>/dev/null || true
    kill "$D"; wait "$D" 2>/dev/null || true

    log "N=$N: 3. failback resync"
    standby a "$DIR/a.img" "$DIR/a.dlog"
    t0=$(now)
    daemon b2 "$DIR/b.img" --dirty-log "$DIR/b.dlog" --replicate-to "tcp:127.0.0.1:$PORT" \
        --replica-resync dirty --replica-sync-chunk-mib 16
    wait_line "$DIR/b2.daemon.log" "failback resync done"
    t1=$(now)
    kill "$C" "$D"; wait "$C" "$D" 2>/dev/null || true
    kill "$SB"; wait "$SB" 2>/dev/null || true
    if cmp -s "$DIR/a.img" "$DIR/b.img"; then CMP=same; else CMP=DIFFERENT; fi
    B_DIRTY=$(grep -o "dirty log [^:]*: [0-9]* of [0-9]* blocks" "$DIR/b2.daemon.log" | head -1 | sed 's/.*: \([0-9]*\) of.*/\1/')
    A_DIRTY=$(grep -o "its dirty set: [0-9]* blocks" "$DIR/b2.daemon.log" | grep -o "[0-9]*" | head -1)
    DONE=$(grep -o "failback resync done.*" "$DIR/b2.daemon.log")
    COPIED=$(echo "$DONE" | sed 's/failback resync done: \([0-9]*\) blocks.*/\1/')
    IMG_BLOCKS=$(echo "$DONE" | sed 's/.*copied of \([0-9]*\) in the image.*/\1/')
    RESYNC=$(echo "$DONE" | sed 's/.* in \(.*\): in sync/\1/')

    log "N=$N: 4. full sync of the same image"
    truncate -s 0 "$DIR/c.img" && truncate -s "$((SIZE_MIB << 20))" "$DIR/c.img"
    standby c "$DIR/c.img" ""
    daemon b3 "$DIR/b.img" --replicate-to "tcp:127.0.0.1:$PORT" --replica-resync full \
        --replica-sync-chunk-mib 16
    wait_line "$DIR/b3.daemon.log" "initial sync done"
    kill "$C" "$D"; wait "$C" "$D" 2>/dev/null || true
    kill "$SB"; wait "$SB" 2>/dev/null || true
    FULL=$(grep -o "initial sync done ([0-9]* bytes in [^)]*)" "$DIR/b3.daemon.log" | sed 's/.* in \(.*\))/\1/')
    rm -f "$DIR/c.img"

    ROWS+=("| $SIZE_MIB MiB ($IMG_BLOCKS) | $N | $B_DIRTY | $A_DIRTY | $COPIED ($("$PY" -c "print(f'{100*$COPIED/$IMG_BLOCKS:.1f}')") %) | $RESYNC | $FULL | $CMP |")
    log "${ROWS[-1]}"
done

# The log's cost: event-driven cuts, with and without --dirty-log.
for round in $(seq "$COST_ROUNDS"); do
    for mode in nolog log; do
        log "cost round $round: $mode"
        rm -f "$DIR"/*.img "$DIR"/*.dlog
        truncate -s 1G "$DIR/cost.img"
        extra=()
        [ "$mode" = log ] && extra=(--dirty-log "$DIR/cost.dlog")
        rm -f "$DIR/blk.sock" "$DIR/ctl.sock" "$DIR/api" "$DIR/state"
        "$BIN/vhost-user-blk-ft" --socket "$DIR/blk.sock" --image "$DIR/cost.img" --ft hold \
            --control "$DIR/ctl.sock" "${extra[@]}" 2>"$DIR/cost.daemon.log" &
        D=$!
        PIDS+=("$D")
        wait_for "$DIR/blk.sock"
        "$BIN/ft-coordinator" --device "blk=$DIR/ctl.sock" --checkpointer sim:0 --unsafe-no-checkpoint \
            --interval-ms 0 --min-interval-ms 0 --state-file "$DIR/state" --api "$DIR/api" 2>"$DIR/cost.coord.log" &
        C=$!
        PIDS+=("$C")
        wait_for "$DIR/api"
        "$BIN/ft-blk-bench" --socket "$DIR/blk.sock" --workloads randwrite4k-qd1,randwrite4k-qd32 \
            --runtime 3 --warmup 0.5 --size 256M --json --label "$mode" >"$DIR/cost.$mode.$round.json"
        kill "$C" "$D"; wait "$C" "$D" 2>/dev/null || true
    done
done
rm -f "$DIR/cost.img"
COST=$("$PY" - "$DIR" "$COST_ROUNDS" <<'PYEOF'
import json, statistics, sys
d, rounds = sys.argv[1], int(sys.argv[2])
res = {}
for m in ("nolog", "log"):
    for r in range(1, rounds + 1):
        for w in json.load(open(f"{d}/cost.{m}.{r}.json"))["results"]:
            res.setdefault((m, w["name"]), []).append(w)
med = statistics.median
print("| workload | --dirty-log | IOPS | vs without | p50 ms | p99 ms |")
print("|---|---|---|---|---|---|")
for w in ("randwrite4k-qd1", "randwrite4k-qd32"):
    base = med(x["iops"] for x in res[("nolog", w)])
    for m in ("nolog", "log"):
        iops = med(x["iops"] for x in res[(m, w)])
        p50 = med(x["lat_us"]["p50"] for x in res[(m, w)]) / 1000
        p99 = med(x["lat_us"]["p99"] for x in res[(m, w)]) / 1000
        rel = "" if m == "nolog" else f"{iops / base:.2f}x"
        print(f"| `{w}` | {'yes' if m == 'log' else 'no'} | {iops:.0f} | {rel} | {p50:.2f} | {p99:.2f} |")
PYEOF
)
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

HEADER="Generated $(date -u '+%Y-%m-%d %H:%M UTC') at commit $(git rev-parse --short HEAD) by \`scripts/bench-failback.sh --size-mib $SIZE_MIB --secs \"$SECS\" --a-mib $A_MIB\`.

- Machine: $(nproc) CPUs, kernel $(uname -r), shared with other jobs (load average before/after: $LOAD_BEFORE / $LOAD_AFTER): times are indicative
- Both images on the same disk (page cache), replication over loopback TCP, a commit every 5 ms (\`ft-coordinator --checkpointer sim:0\`), \`--replica-sync-chunk-mib 16\`, dirty logs with the default geometry (4 MiB activity-log extents, 256 of them)
- A (primary) writes randomly in its first $A_MIB MiB for 2 s, replicating to B, and is killed (SIGKILL); B takes over and writes \`randwrite4k-qd32\` over the whole image for N s, then stops cleanly; failback from B to A with \`--replica-resync dirty\`; then a full sync (\`--replica-resync full\`) of the same image to a third one"

TABLE="| image (4 KiB blocks) | N s of writes on B | blocks B wrote | A's dirty set (crash: its AL extents) | blocks copied by failback | failback resync | full sync | A = B after |
|---|---|---|---|---|---|---|---|
$(printf '%s\n' "${ROWS[@]}")

The log's cost on the hot path (hold mode, event-driven cuts: every commit is on the critical path; 256 MiB region, so its 64 extents stay in the activity log; medians of $COST_ROUNDS interleaved rounds of 3 s):

$COST"
echo "$HEADER"; echo; echo "$TABLE"

if [ "$WRITE_DOC" = 1 ]; then
    printf '%s\n\n%s\n' "$HEADER" "$TABLE" >"$DIR/section.md"
    write_doc_section "$ROOT/docs/benchmarks.md" bench-failback "Failback (blocks copied after N seconds of writes)" "$DIR/section.md"
    log "table written to docs/benchmarks.md"
fi
