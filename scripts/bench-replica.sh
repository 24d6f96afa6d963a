#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Cost of disk replication on the primary: vhost-user-blk-ft --ft hold gated by ft-coordinator
# (sim:0 checkpointer: only gating and replication are measured), without a replica and with
# --replicate-to an ft-standby replica service on loopback TCP (its own 1 GiB image on the same
# disk). A held write completes only after its epoch is written and synced locally AND applied
# and synced on the replica, so the added latency is about one replica round trip plus its
# fdatasync (the replica applies while the primary writes). VM-less: ft-blk-bench drives the
# daemon over vhost-user.
#
# Then the initial sync (--replica-initial-sync, 16 MiB chunks, a commit every 5 ms, no guest
# I/O) of a SYNC_MIB image of random data, against `dd bs=16M conv=fdatasync` of the same file.
#
# Usage: scripts/bench-replica.sh [--rounds N] [--runtime SECS] [--sync-mib N] [--sync-only] [--no-doc]
# (--sync-only: only the initial sync line, printed; docs/benchmarks.md is left alone)
# Writes its table into docs/benchmarks.md between the bench-replica markers.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=lib/doc-section.sh
source "$ROOT/scripts/lib/doc-section.sh"
# shellcheck source=lib/blk-bench.sh
source "$ROOT/scripts/lib/blk-bench.sh"

ROUNDS=3
RUNTIME=3
WRITE_DOC=1
MODES="hold-5 hold-5+replica event event+replica"
WORKLOADS="randwrite4k-qd1,randwrite4k-qd32,seqwrite128k-qd8"
PORT=27210
SYNC_MIB=1024
SYNC_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --sync-mib) SYNC_MIB=$2; shift 2 ;;
        --sync-only) SYNC_ONLY=1; WRITE_DOC=0; shift ;;
        --no-doc) WRITE_DOC=0; shift ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "bench-replica: unknown argument $1" >&2; exit 2 ;;
    esac
done

blk_bench_setup bench-replica replica


# run MODE ROUND: daemon, coordinator (and replica), one bench run; results in $DIR/MODE.ROUND.*
run() {
    local mode=$1 round=$2 out=$DIR/$1.$2 standby=
    rm -rf "$DIR"/*.sock "$DIR/api" "$DIR/state" "$DIR/store"
    truncate -s 0 "$DIR/img" && truncate -s 1G "$DIR/img"
    local args=(--socket "$DIR/blk.sock" --image "$DIR/img" --ft hold --control "$DIR/ctl.sock")
    if [[ $mode == *+replica ]]; then
        truncate -s 0 "$DIR/replica.img" && truncate -s 1G "$DIR/replica.img"
        "$BIN/ft-standby" --listen "unix:$DIR/standby.sock" --store "$DIR/store" \
            --replica-image "$DIR/replica.img" --replica-listen "tcp:127.0.0.1:$PORT" \
            2>"$out.standby.log" &
        standby=$!
        PIDS+=("$standby")
        wait_for "$DIR/standby.sock"
        args+=(--replicate-to "tcp:127.0.0.1:$PORT")
    fi
    "$BIN/vhost-user-blk-ft" "${args[@]}" 2>"$out.daemon.log" &
    local daemon=$!
    PIDS+=("$daemon")
    wait_for "$DIR/blk.sock"
    local cuts=(--interval-ms 5)
    [[ $mode == event* ]] && cuts=(--interval-ms 0 --min-interval-ms 0)
    "$BIN/ft-coordinator" --device "blk=$DIR/ctl.sock" --checkpointer sim:0 --unsafe-no-checkpoint \
        "${cuts[@]}" --state-file "$DIR/state" --api "$DIR/api" 2>"$out.coord.log" &
    local coord=$!
    PIDS+=("$coord")
    wait_for "$DIR/api"
    "$BIN/ft-blk-bench" --socket "$DIR/blk.sock" --workloads "$WORKLOADS" --runtime "$RUNTIME" \
        --warmup 0.5 --size 256M --json --label "$mode" >"$out.json"
    kill "$coord"; wait "$coord" 2>/dev/null || true
    kill "$daemon"; wait "$daemon" 2>/dev/null || true
    if [ -n "$standby" ]; then
        # The replica holds what the primary committed (the daemon is gone: nothing moves).
        if cmp -s "$DIR/img" "$DIR/replica.img"; then echo same >"$out.cmp"; else echo DIFFERENT >"$out.cmp"; fi
        kill "$standby"; wait "$standby" 2>/dev/null || true
    fi
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
[ "$SYNC_ONLY" = 1 ] && ROUNDS=0
for round in $(seq "$ROUNDS"); do
    for mode in $MODES; do
        log "round $round: $mode"
        run "$mode" "$round"
    done
done

# Initial sync against dd: seconds for each (the file is in the page cache for both).
sync_bench() {
    rm -rf "$DIR"/*.sock "$DIR/api" "$DIR/state" "$DIR/store"
    rm -f "$DIR/img" "$DIR/replica.img"
    head -c "$((SYNC_MIB << 20))" /dev/urandom >"$DIR/img"
    truncate -s "$((SYNC_MIB << 20))" "$DIR/replica.img"
    local t0 t1
    t0=$(date +%s.%N)
    dd if="$DIR/img" of="$DIR/dd.img" bs=16M conv=fdatasync status=none
    t1=$(date +%s.%N)
    DD_S=$("$PY" -c "print(round($t1 - $t0, 2))")
    rm -f "$DIR/dd.img"
    "$BIN/ft-standby" --listen "unix:$DIR/standby.sock" --store "$DIR/store" \
        --replica-image "$DIR/replica.img" --replica-listen "tcp:127.0.0.1:$PORT" 2>"$DIR/sync.standby.log" &
    local standby=$!
    PIDS+=("$standby")
    wait_for "$DIR/standby.sock"
    "$BIN/vhost-user-blk-ft" --socket "$DIR/blk.sock" --image "$DIR/img" --ft hold --control "$DIR/ctl.sock" \
        --replicate-to "tcp:127.0.0.1:$PORT" --replica-initial-sync --replica-sync-chunk-mib 16 \
        2>"$DIR/sync.daemon.log" &
    local daemon=$!
    PIDS+=("$daemon")
    wait_for "$DIR/blk.sock"
    "$BIN/ft-coordinator" --device "blk=$DIR/ctl.sock" --checkpointer sim:0 --unsafe-no-checkpoint \
        --interval-ms 5 --state-file "$DIR/state" --api "$DIR/api" 2>"$DIR/sync.coord.log" &
    local coord=$!
    PIDS+=("$coord")
    for _ in $(seq 6000); do
        grep -q "initial sync done" "$DIR/sync.daemon.log" && break
        kill -0 "$daemon" 2>/dev/null || break
        sleep 0.1
    done
    SYNC_LINE=$(grep -o "initial sync done.*" "$DIR/sync.daemon.log" || echo "not done in 600 s")
    kill "$coord" "$daemon"; wait "$coord" "$daemon" 2>/dev/null || true
    kill "$standby"; wait "$standby" 2>/dev/null || true
    if cmp -s "$DIR/img" "$DIR/replica.img"; then SYNC_CMP=same; else SYNC_CMP=DIFFERENT; fi
    rm -f "$DIR/img" "$DIR/replica.img"
}
log "initial sync of $SYNC_MIB MiB"
sync_bench
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

TABLE=
[ "$SYNC_ONLY" = 0 ] && TABLE=$("$PY" - "$DIR" "$ROUNDS" "$MODES" <<'PYEOF'
import json, statistics, sys, os
d, rounds, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
res = {}
for m in modes:
    for r in range(1, rounds + 1):
        for w in json.load(open(f"{d}/{m}.{r}.json"))["results"]:
            res.setdefault((m, w["name"]), []).append(w)
med = statistics.median
def cell(m, w, key):
    return med(x["iops"] if key == "iops" else x["lat_us"][key] for x in res[(m, w)])
def k(x): return f"{x/1000:.1f}k" if x >= 10000 else f"{x:.0f}"
def ms(us): return f"{us/1000:.2f}"
workloads = sorted({w for (_, w) in res}, key=lambda w: list(res).index((modes[0], w)))
print("| workload | mode | IOPS | IOPS vs no replica | p50 ms | p99 ms | added p99 ms |")
print("|---|---|---|---|---|---|---|")
for w in workloads:
    for m in modes:
        base = m.replace("+replica", "")
        iops, p50, p99 = cell(m, w, "iops"), cell(m, w, "p50"), cell(m, w, "p99")
        if m == base:
            print(f"| `{w}` | {m} | {k(iops)} | | {ms(p50)} | {ms(p99)} | |")
        else:
            print(f"| `{w}` | {m} | {k(iops)} | {iops / cell(base, w, 'iops'):.2f}x | {ms(p50)} | {ms(p99)} | {ms(p99 - cell(base, w, 'p99'))} |")
cmps = [open(f"{d}/{m}.{r}.cmp").read().strip() for m in modes if m.endswith("+replica") for r in range(1, rounds + 1)]
print()
print(f"Replica image byte-equal to the primary's after each replicated run: {cmps.count('same')} of {len(cmps)}.")
PYEOF
)

HEADER="Generated $(date -u '+%Y-%m-%d %H:%M UTC') at commit $(git rev-parse --short HEAD) by \`scripts/bench-replica.sh --rounds $ROUNDS --runtime $RUNTIME\`.

- Machine: $(nproc) CPUs, kernel $(uname -r); load average before/after: $LOAD_BEFORE / $LOAD_AFTER
- vhost-user-blk-ft \`--ft hold\`, 1 queue, 1 GiB sparse raw image (page cache), gated by \`ft-coordinator --checkpointer sim:0\`: hold-5 cuts every 5 ms, event cuts whenever output waits; ft-blk-bench ${RUNTIME} s per workload after 0.5 s warm-up, medians of $ROUNDS rounds
- +replica: \`--replicate-to tcp:127.0.0.1:$PORT\`, \`ft-standby --replica-image\` on a second 1 GiB sparse image on the same disk (loopback: no network latency; both fdatasyncs hit the same device)"
TABLE="$TABLE

Initial sync of a $SYNC_MIB MiB image of random data (\`--replica-initial-sync --replica-sync-chunk-mib 16\`, a commit every 5 ms, no guest I/O): \`$SYNC_LINE\`; replica byte-equal afterwards: $SYNC_CMP. \`dd bs=16M conv=fdatasync\` of the same file on the same disk: $DD_S s."
echo "$HEADER"; echo; echo "$TABLE"

if [ "$WRITE_DOC" = 1 ]; then
    printf '%s\n\n%s\n' "$HEADER" "$TABLE" >"$DIR/section.md"
    write_doc_section "$ROOT/docs/benchmarks.md" bench-replica "Disk replication (hold mode with and without a replica)" "$DIR/section.md"
    log "table written to docs/benchmarks.md"
fi
