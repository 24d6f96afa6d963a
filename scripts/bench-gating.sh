#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Block output commit cost: vhost-user-blk-ft with --ft off vs --ft hold gated by ft-coordinator
# (sim:0 checkpointer, so a checkpoint costs nothing and only the gating is measured) at epoch
# intervals of 1, 5 and 25 ms, and with event-driven cuts (`event`: --interval-ms 0
# --min-interval-ms 0, a cut as soon as output waits and the previous commit is done).
# VM-less: ft-blk-bench drives the daemon over vhost-user.
#
# A second table breaks the seal-to-completion time of each hold mode into the coordinator's
# phases: SEAL round trip, checkpoint, COMMIT round trip (of which the daemon's fdatasync).
#
# For each interval it reports IOPS and p50/p99 completion latency, the p99 added over --ft off,
# the bound it should stay under (interval + fdatasync p99 + 1 ms), and per commit: requests and
# fdatasyncs (one per non-empty commit, whatever the number of requests).
#
# Usage: scripts/bench-gating.sh [--rounds N] [--runtime SECS] [--no-doc]
# Writes its table into docs/benchmarks.md between the bench-gating markers.
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
INTERVALS="1 5 25"
WORKLOADS="randwrite4k-qd1,randwrite4k-qd32,randwrite4k-flush-qd1,randread4k-qd32"
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --no-doc) WRITE_DOC=0; shift ;;
        -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "bench-gating: unknown argument $1" >&2; exit 2 ;;
    esac
done

blk_bench_setup bench-gating gating


# run MODE ROUND: one daemon (+ coordinator for hold-N), one bench run; results in $DIR/MODE.ROUND.*
run() {
    local mode=$1 round=$2 out=$DIR/$1.$2
    rm -f "$DIR"/*.sock "$DIR/api" "$DIR/state"
    truncate -s 0 "$DIR/img" && truncate -s 1G "$DIR/img"
    local args=(--socket "$DIR/blk.sock" --image "$DIR/img")
    [ "$mode" != off ] && args+=(--ft hold --control "$DIR/ctl.sock")
    "$BIN/vhost-user-blk-ft" "${args[@]}" 2>"$out.daemon.log" &
    local daemon=$!
    PIDS+=("$daemon")
    wait_for "$DIR/blk.sock"
    local coord=
    if [ "$mode" != off ]; then
        local cuts=(--interval-ms "${mode#hold-}")
        [ "$mode" = event ] && cuts=(--interval-ms 0 --min-interval-ms 0)
        "$BIN/ft-coordinator" --device "blk=$DIR/ctl.sock" --checkpointer sim:0 --unsafe-no-checkpoint \
            "${cuts[@]}" --state-file "$DIR/state" --api "$DIR/api" \
            2>"$out.coord.log" &
        coord=$!
        PIDS+=("$coord")
        wait_for "$DIR/api"
    fi
    "$BIN/ft-blk-bench" --socket "$DIR/blk.sock" --workloads "$WORKLOADS" --runtime "$RUNTIME" \
        --warmup 0.5 --size 256M --json --label "$mode" >"$out.json"
    if [ -n "$coord" ]; then
        "$BIN/ftctl" --api "$DIR/api" status >"$out.status.json"
        kill "$coord"; wait "$coord" 2>/dev/null || true
    fi
    kill "$daemon"; wait "$daemon" 2>/dev/null || true
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
MODES="off"
for i in $INTERVALS; do MODES="$MODES hold-$i"; done
MODES="$MODES event"
for round in $(seq "$ROUNDS"); do
    for mode in $MODES; do
        log "round $round: $mode"
        run "$mode" "$round"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

TABLE=$("$PY" - "$DIR" "$ROUNDS" "$MODES" <<'EOF'
import json, statistics, sys
d, rounds, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
res = {}      # (mode, workload) -> list of result dicts
syncs = {}    # mode -> list of (commits, fdatasyncs, fdatasync p99 us)
phases = {}   # mode -> list of per-run p50s of the cycle's phases
for m in modes:
    for r in range(1, rounds + 1):
        for w in json.load(open(f"{d}/{m}.{r}.json"))["results"]:
            res.setdefault((m, w["name"]), []).append(w)
        if m != "off":
            s = json.load(open(f"{d}/{m}.{r}.status.json"))
            dev = s["devices"][0]
            syncs.setdefault(m, []).append((dev["commits_ok"], dev["fdatasync"]["count"], dev["fdatasync"]["p99_us"]))
            phases.setdefault(m, []).append({k: s["latency"][k]["p50_us"] for k in ("seal", "checkpoint", "commit", "seal_to_commit")} | {"fdatasync": dev["fdatasync"]["p50_us"]})
med = statistics.median
def cell(m, w, key):
    xs = res[(m, w)]
    return med(x["iops"] if key == "iops" else x["lat_us"][key] for x in xs)
def k(x): return f"{x/1000:.1f}k" if x >= 10000 else f"{x:.0f}"
def ms(us): return f"{us/1000:.2f}"
workloads = [w for (m, w) in res if m == "off"]
print("| workload | mode | IOPS | p50 ms | p99 ms | added p99 ms | bound ms (interval + fdatasync p99 + 1; x2 epochs for write+flush) | within |")
print("|---|---|---|---|---|---|---|---|")
for w in workloads:
    base99 = cell("off", w, "p99")
    for m in modes:
        iops, p50, p99 = cell(m, w, "iops"), cell(m, w, "p50"), cell(m, w, "p99")
        if m == "off":
            print(f"| `{w}` | off | {k(iops)} | {ms(p50)} | {ms(p99)} | | | |")
            continue
        # Event-driven cuts: the wait for the cut is at most one commit (bound: the sync again).
        interval = float(m.split("-")[1]) * 1000 if m.startswith("hold-") else 0.0
        sync99 = med(x[2] or 0 for x in syncs[m])
        # The flush op is a write, then a FLUSH sent once the write completed: two requests in
        # a row, each waiting for its own commit, so two epochs.
        n = 2 if "flush" in w else 1
        bound = n * (interval + sync99) + 1000
        added = p99 - base99
        read = w.startswith("randread")
        ok = "yes" if added <= bound else "no"
        print(f"| `{w}` | {m} | {k(iops)} | {ms(p50)} | {ms(p99)} | {ms(added)} | {'(reads are not held)' if read else ms(bound)} | {'' if read else ok} |")
print()
print("| mode | commits (median per run) | fdatasyncs | fdatasyncs per non-empty commit | requests per commit | fdatasync p99 ms |")
print("|---|---|---|---|---|---|")
for m in modes[1:]:
    commits = med(x[0] for x in syncs[m]); fs = med(x[1] for x in syncs[m]); p99 = med(x[2] or 0 for x in syncs[m])
    ops = med(sum(w["ops"] for w in json.load(open(f"{d}/{m}.{r}.json"))["results"] if not w["name"].startswith("randread")) for r in range(1, rounds + 1))
    print(f"| {m} | {commits:.0f} | {fs:.0f} | {'1 (empty commits skip it)' if fs <= commits else f'{fs/commits:.2f}'} | {ops/max(fs,1):.1f} | {ms(p99)} |")
print()
print("Seal to completion, p50 per phase in µs (coordinator telemetry, median of the runs' p50s; all workloads of a run together; the fdatasync p50 counts non-empty commits only and the COMMIT p50 all of them, so with many empty periodic commits the difference can be negative):")
print()
print("| mode | SEAL round trip | checkpoint (sim:0) | COMMIT round trip | of which fdatasync | COMMIT minus fdatasync | seal to COMMITTED |")
print("|---|---|---|---|---|---|---|")
for m in modes[1:]:
    p = {k: med(x[k] for x in phases[m]) for k in phases[m][0]}
    print(f"| {m} | {p['seal']:.0f} | {p['checkpoint']:.0f} | {p['commit']:.0f} | {p['fdatasync']:.0f} | {p['commit'] - p['fdatasync']:.0f} | {p['seal_to_commit']:.0f} |")
EOF
)

HEADER="Generated $(date -u '+%Y-%m-%d %H:%M UTC') at commit $(git rev-parse --short HEAD) by \`scripts/bench-gating.sh --rounds $ROUNDS --runtime $RUNTIME\`.

- Machine: $(nproc) CPUs, kernel $(uname -r); load average before/after: $LOAD_BEFORE / $LOAD_AFTER
- vhost-user-blk-ft, 1 queue, 1 GiB sparse raw image (page cache), ft-blk-bench with ${RUNTIME} s per workload after 0.5 s warm-up, medians of $ROUNDS rounds
- hold-N: \`--ft hold\` gated by \`ft-coordinator --checkpointer sim:0 --interval-ms N\` (periodic cuts only); event: \`--interval-ms 0 --min-interval-ms 0\` (a cut whenever output waits)
- The flush workload's op is a write then a FLUSH; in hold mode both wait for the commit"
echo "$HEADER"; echo; echo "$TABLE"

if [ "$WRITE_DOC" = 1 ]; then
    printf '%s\n\n%s\n' "$HEADER" "$TABLE" >"$DIR/section.md"
    write_doc_section "$ROOT/docs/benchmarks.md" bench-gating "Block output commit (gating off vs hold)" "$DIR/section.md"
    log "table written to docs/benchmarks.md"
fi
