#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Hold mode with an immediate acknowledgement against gating off, side by side: for each round,
# vhost-user-blk-ft `--ft off`, then `--ft hold` gated by ft-coordinator (`--checkpointer sim:0
# --interval-ms 0 --min-interval-ms 0`: a cut as soon as output waits, acknowledged at once), and
# (with BASE_BIN) the same hold run with another build, order rotating per round. One workload
# (default randwrite4k-qd32), VM-less (ft-blk-bench, the virtio-driver client), a fresh 1 GiB
# sparse raw image per run. Then host fio on a fresh image of the same kind: psync 4k random
# writes with `--fdatasync=32` (the floor of a 32-write epoch: 32 writes, one fdatasync), and
# io_uring at QD32 with `--fdatasync=32`.
#
# Prints per round the IOPS and the ratio hold/off of that round, then min/median of the ratios,
# the coordinator's per-phase p50s (SEAL round trip, checkpoint, COMMIT round trip, fdatasync,
# seal to COMMITTED) and requests per commit, and the load average before/after.
#
# Usage: scripts/bench-hold-ratio.sh [--rounds N] [--runtime SECS] [--workload NAME] [--no-fio]
#                                    [--direct] [--allocated]
#   --direct: the daemons open the image with O_DIRECT and fio runs with --direct=1, so `--ft off`
#   pays for the disk too and hold/off shows what gating adds beyond making the writes durable
#   (the default page cache compares durable hold with `--ft off` writes that never sync).
#   --allocated: one image written in full once (as `qemu-img create -o preallocation=full`)
#   and reused by every run and by fio, instead of a fresh sparse image per run: no write
#   allocates a block, so an fdatasync carries no journal commit of new extents.
#   BASE_BIN=/path/to/older/target/release  adds hold runs of that build (its vhost-user-blk-ft
#   and ft-coordinator) as "base".
#   DAEMON_ARGS="--queues 4"  extra vhost-user-blk-ft arguments for every run (the client still
#   uses one queue; a SEAL asks every queue's worker for its record).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=5
RUNTIME=3
WORKLOAD=randwrite4k-qd32
FIO=1
DIRECT=0
ALLOCATED=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --workload) WORKLOAD=$2; shift 2 ;;
        --no-fio) FIO=0; shift ;;
        --direct) DIRECT=1; shift ;;
        --allocated) ALLOCATED=1; shift ;;
        -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "bench-hold-ratio: unknown argument $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=lib/blk-bench.sh
source "$ROOT/scripts/lib/blk-bench.sh"
blk_bench_setup bench-hold-ratio hold
# A fresh sparse image (every write of a run allocates its block, as in the other benchmarks),
# or with --allocated one image written in full once and reused (writes allocate nothing).
fresh_image() {
    if [ "$ALLOCATED" = 1 ]; then
        if [ ! -f "$DIR/img.allocated" ]; then
            dd if=/dev/zero of="$DIR/img" bs=1M count=1024 oflag=direct status=none
            sync "$DIR/img"
            touch "$DIR/img.allocated"
        fi
        return
    fi
    truncate -s 0 "$DIR/img" && truncate -s 1G "$DIR/img"
    sync "$DIR/img"
}

# run MODE ROUND: MODE is off, hold (this build) or base (BASE_BIN's hold)
run() {
    local mode=$1 round=$2 out=$DIR/$1.$2 bin=$BIN
    [ "$mode" = base ] && bin=$BASE_BIN
    rm -f "$DIR"/*.sock "$DIR/api" "$DIR/state"
    fresh_image
    local args=(--socket "$DIR/blk.sock" --image "$DIR/img")
    [ "$DIRECT" = 1 ] && args+=(--direct)
    # shellcheck disable=SC2206 # word splitting is the point: several arguments
    [ -n "${DAEMON_ARGS:-}" ] && args+=($DAEMON_ARGS)
    [ "$mode" != off ] && args+=(--ft hold --control "$DIR/ctl.sock")
    "$bin/vhost-user-blk-ft" "${args[@]}" 2>"$out.daemon.log" &
    local daemon=$!
    PIDS+=("$daemon")
    wait_for "$DIR/blk.sock"
    local coord=
    if [ "$mode" != off ]; then
        "$bin/ft-coordinator" --device "blk=$DIR/ctl.sock" --checkpointer sim:0 --unsafe-no-checkpoint \
            --interval-ms 0 --min-interval-ms 0 --state-file "$DIR/state" --api "$DIR/api" \
            2>"$out.coord.log" &
        coord=$!
        PIDS+=("$coord")
        wait_for "$DIR/api"
    fi
    "$BIN/ft-blk-bench" --socket "$DIR/blk.sock" --workloads "$WORKLOAD" --runtime "$RUNTIME" \
        --warmup 0.5 --size 256M --json --label "$mode" >"$out.json"
    if [ -n "$coord" ]; then
        "$BIN/ftctl" --api "$DIR/api" status >"$out.status.json"
        kill "$coord"; wait "$coord" 2>/dev/null || true
    fi
    kill "$daemon"; wait "$daemon" 2>/dev/null || true
}

MODES="off hold"
[ -n "${BASE_BIN:-}" ] && MODES="$MODES base"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$ROUNDS"); do
    # Rotate the order so drift does not always hit the same mode.
    set -- $MODES
    order=()
    n=$#
    for i in $(seq 0 $((n - 1))); do
        j=$(( (i + round) % n + 1 ))
        order+=("${!j}")
    done
    for mode in "${order[@]}"; do
        log "round $round: $mode"
        run "$mode" "$round"
    done
done
if [ "$FIO" = 1 ] && command -v fio >/dev/null; then
    fresh_image
    fio --name=floor --filename="$DIR/img" --size=256M --rw=randwrite --bs=4k --ioengine=psync \
        --direct="$DIRECT" --fdatasync=32 --runtime="$RUNTIME" --time_based --invalidate=0 --output-format=json \
        >"$DIR/fio.json" 2>/dev/null || log "fio failed"
    fresh_image
    fio --name=floor --filename="$DIR/img" --size=256M --rw=randwrite --bs=4k --ioengine=io_uring \
        --direct="$DIRECT" --iodepth=32 --fdatasync=32 --runtime="$RUNTIME" --time_based --invalidate=0 \
        --output-format=json >"$DIR/fio-uring.json" 2>/dev/null || log "fio failed"
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

"$PY" - "$DIR" "$ROUNDS" "$MODES" "$WORKLOAD" "$DIRECT" "$ALLOCATED" <<'EOF'
import json, os, statistics, sys
d, rounds, modes, wl = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
med = statistics.median
def res(m, r):
    return json.load(open(f"{d}/{m}.{r}.json"))["results"][0]
def st(m, r):
    return json.load(open(f"{d}/{m}.{r}.status.json"))
cache = "O_DIRECT" if sys.argv[5] == "1" else "page cache"
image = "one fully written 1 GiB image" if sys.argv[6] == "1" else "a fresh sparse 1 GiB image per run"
extra = os.environ.get("DAEMON_ARGS", "")
print(f"workload {wl}, {rounds} rounds, {cache}, {image}" + (f", daemon {extra}" if extra else ""))
print("| round | " + " | ".join(f"{m} IOPS (p50 us)" for m in modes) + " | " + " | ".join(f"{m}/off" for m in modes[1:]) + " |")
print("|---" * (2 * len(modes)) + "|")
ratios = {m: [] for m in modes[1:]}
for r in range(1, rounds + 1):
    cells = [f"{res(m, r)['iops']/1000:.1f}k ({res(m, r)['lat_us']['p50']:.0f})" for m in modes]
    rs = []
    for m in modes[1:]:
        x = res(m, r)["iops"] / res("off", r)["iops"]
        ratios[m].append(x)
        rs.append(f"{x:.2f}")
    print(f"| {r} | " + " | ".join(cells) + " | " + " | ".join(rs) + " |")
for m in modes[1:]:
    iops = [res(m, r)["iops"] for r in range(1, rounds + 1)]
    print(f"{m}/off: min {min(ratios[m]):.2f}, median {med(ratios[m]):.2f}; {m} IOPS median {med(iops)/1000:.1f}k")
    ph = {}
    for r in range(1, rounds + 1):
        s = st(m, r)
        dev = s["devices"][0]
        for k in ("seal", "checkpoint", "commit", "seal_to_commit", "cut_to_cut"):
            if k not in s["latency"]: s["latency"][k] = {"p50_us": 0}
            ph.setdefault(k, []).append(s["latency"][k]["p50_us"] or 0)
        ph.setdefault("fdatasync", []).append(dev["fdatasync"]["p50_us"] or 0)
        ph.setdefault("writes", []).append((dev.get("writes") or {}).get("p50_us") or 0)
        ph.setdefault("daemon", []).append((dev.get("commit_total") or {}).get("p50_us") or 0)
        ph.setdefault("req/commit", []).append((dev.get("requests_committed") or 0) / max(dev["commits_ok"], 1))
    print(f"  {m} p50 us (median of rounds): SEAL rt {med(ph['seal']):.0f}, checkpoint {med(ph['checkpoint']):.0f}, "
          f"COMMIT rt {med(ph['commit']):.0f} (daemon {med(ph['daemon']):.0f}: writes {med(ph['writes']):.0f}, fdatasync {med(ph['fdatasync']):.0f}), "
          f"seal->COMMITTED {med(ph['seal_to_commit']):.0f}, cut->cut {med(ph['cut_to_cut']):.0f}; "
          f"requests per commit {med(ph['req/commit']):.1f}")
off = [res("off", r)["iops"] for r in range(1, rounds + 1)]
print(f"off IOPS median {med(off)/1000:.1f}k (min {min(off)/1000:.1f}k)")
for name, what in (("fio", "psync"), ("fio-uring", "io_uring QD32")):
    f = f"{d}/{name}.json"
    if not (os.path.exists(f) and os.path.getsize(f) > 0):
        continue
    j = json.load(open(f))["jobs"][0]
    w = j["write"]
    sy = j.get("sync", {}).get("lat_ns", {})
    pct = sy.get("percentile", {})
    p50 = pct.get("50.000000", 0) / 1000
    print(f"host fio {what} 4k randwrite --fdatasync=32: {w['iops']/1000:.1f}k IOPS, fdatasync p50 {p50:.0f} us "
          f"(one 32-write epoch per {32e6/max(w['iops'],1):.0f} us); x off median {w['iops']/med(off):.2f}")
EOF
echo "load average before/after: $LOAD_BEFORE / $LOAD_AFTER; $(git rev-parse --short HEAD)"
