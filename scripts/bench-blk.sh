#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Block benchmark: ft-blk-bench (VM-less vhost-user-blk client) against qemu-storage-daemon and
# against our vhost-user-blk-ft, same image size, same cache mode, alternating backends for
# several rounds, with host fio (io_uring, on ours' image file) as the ceiling; writes a
# side-by-side table into docs/benchmarks.md between markers.
#
# Usage: scripts/bench-blk.sh [--rounds N] [--runtime S] [--warmup S] [--size 1G]
#                             [--cache page|direct|both] [--queues N] [--workloads LIST]
#                             [--no-fio] [--no-doc] [--keep] [--saturate] [--busy N]
# Env:   BENCH_DIR   parent of the scratch directory (default /var/tmp; must not be tmpfs)
#        OURS_BIN    vhost-user-blk-ft binary to use instead of building target/release's
#        OURS_DESC   free text about that binary (e.g. its source commit) for the report
#        OURS_ARGS   extra flags for vhost-user-blk-ft (e.g. "--poll-max-ns 32768"), reported
#        BASE_BIN    a second vhost-user-blk-ft binary (e.g. built from an older commit), run
#                    as backend "base" in the same rounds; BASE_ARGS, BASE_DESC as for ours
#        RUST_LOG    for our daemons (default warn; info logs the polling guard at exit, see --keep)
# --saturate runs a busy loop pinned to the last CPU during the measurements (the "saturated
# host" regime of adaptive polling: no idle core). --busy N runs N unpinned busy loops instead
# (N = the CPU count: every CPU is wanted by a task of the same priority, like stress-ng --cpu).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib/doc-section.sh
source "$ROOT/scripts/lib/doc-section.sh"
CMDLINE="scripts/bench-blk.sh $*"
ROUNDS=3
RUNTIME=5
WARMUP=1
SIZE=1G
CACHE=page
QUEUES=1
WORKLOADS=all
WRITE_DOC=1
KEEP=0
FIO=1
SATURATE=0
BUSY=0
DOC="$ROOT/docs/benchmarks.md"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --queues) QUEUES=$2; shift 2 ;;
        --workloads) WORKLOADS=$2; shift 2 ;;
        --no-doc) WRITE_DOC=0; shift ;;
        --no-fio) FIO=0; shift ;;
        --keep) KEEP=1; shift ;;
        --saturate) SATURATE=1; shift ;;
        --busy) BUSY=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$CACHE" in
    page) MODES="page" ;;
    direct) MODES="direct" ;;
    both) MODES="page direct" ;;
    *) echo "--cache must be page, direct or both" >&2; exit 2 ;;
esac
[ "$ROUNDS" -ge 1 ] 2>/dev/null || { echo "--rounds must be >= 1" >&2; exit 2; }

log() { echo "bench-blk: $*" >&2; }

# --- dependencies (idempotent) -------------------------------------------------------------
# qemu-storage-daemon ships with Debian's qemu-system-x86/qemu-utils; install them together
# (qemu-system-x86 alone replaces a newer preinstalled qemu-utils and breaks it).
if ! command -v qemu-storage-daemon >/dev/null; then
    log "installing qemu-system-x86 qemu-utils (for qemu-storage-daemon)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y qemu-system-x86 qemu-utils >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y qemu-system-x86 qemu-utils >/dev/null; }
fi
PY=$(command -v /usr/bin/python3 || command -v python3) || { log "python3 is needed"; exit 1; }

# --- build ----------------------------------------------------------------------------------
cd "$ROOT"
log "building ft-blk-bench (release)"
cargo build --release -q -p ft-tests --bin ft-blk-bench
BENCH="$ROOT/target/release/ft-blk-bench"
OURS=${OURS_BIN:-$ROOT/target/release/vhost-user-blk-ft}
OURS_NOTE=""
if [ -z "${OURS_BIN:-}" ] && cargo metadata --no-deps --format-version 1 2>/dev/null | grep -q '"name":"vhost-user-blk-ft"'; then
    log "building vhost-user-blk-ft (release)"
    cargo build --release -q -p vhost-user-blk-ft 2>/dev/null \
        || log "vhost-user-blk-ft does not build; using a previously built binary if any"
fi
if [ -x "$OURS" ] && "$OURS" --help 2>/dev/null | grep -q -- '--image'; then
    BACKENDS="ours qsd"
else
    BACKENDS="qsd"
    OURS_NOTE="$OURS is not built (or has no --image option): only qemu-storage-daemon was benchmarked."
    log "$OURS_NOTE"
fi
if [ -n "${BASE_BIN:-}" ]; then
    [ -x "$BASE_BIN" ] || { log "BASE_BIN $BASE_BIN is not executable"; exit 1; }
    BACKENDS="$BACKENDS base"
fi
if [ "$FIO" = 1 ]; then
    if command -v fio >/dev/null; then BACKENDS="$BACKENDS fio"; else log "fio not installed: no host column"; fi
fi

# --- scratch space on the real disk ------------------------------------------------------
PARENT=${BENCH_DIR:-/var/tmp}
if [ "$(stat -f -c %T "$PARENT")" = tmpfs ]; then
    log "$PARENT is tmpfs; set BENCH_DIR to a directory on a real disk"; exit 1
fi
WORK=$(mktemp -d "$PARENT/ft-bench-blk.XXXXXX")
BACKEND_PID=""
BUSY_PID=""
BUSY_PIDS=()
cleanup() {
    if [ -n "$BACKEND_PID" ]; then kill "$BACKEND_PID" 2>/dev/null || true; wait "$BACKEND_PID" 2>/dev/null || true; fi
    if [ -n "$BUSY_PID" ]; then kill "$BUSY_PID" 2>/dev/null || true; wait "$BUSY_PID" 2>/dev/null || true; fi
    for p in "${BUSY_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
mkdir -p "$WORK/json" "$WORK/logs"

# start_backend NAME MODE IMG SOCK: starts it in the background, sets BACKEND_PID, waits for
# the socket to appear.
start_backend() {
    local name=$1 mode=$2 img=$3 sock=$4 direct
    rm -f "$sock"
    if [ "$mode" = direct ]; then direct=on; else direct=off; fi
    case "$name" in
        qsd)
            qemu-storage-daemon \
                --blockdev "file,filename=$img,node-name=disk,aio=io_uring,cache.direct=$direct" \
                --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$sock,writable=on,num-queues=$QUEUES" \
                >"$WORK/logs/qsd.log" 2>&1 &
            ;;
        ours|base)
            local extra=() bin=$OURS args=${OURS_ARGS:-}
            [ "$name" = base ] && { bin=$BASE_BIN; args=${BASE_ARGS:-}; }
            [ "$mode" = direct ] && extra+=(--direct)
            # shellcheck disable=SC2206 # the ARGS are lists of flags
            extra+=($args)
            RUST_LOG=${RUST_LOG:-warn} "$bin" --socket "$sock" --image "$img" --queues "$QUEUES" "${extra[@]}" \
                >"$WORK/logs/$name.log" 2>&1 &
            ;;
    esac
    BACKEND_PID=$!
    for _ in $(seq 1 300); do
        [ -S "$sock" ] && return 0
        kill -0 "$BACKEND_PID" 2>/dev/null || { log "$name exited at start:"; cat "$WORK/logs/$name.log" >&2; exit 1; }
        sleep 0.05
    done
    log "$name: socket $sock never appeared"; exit 1
}

stop_backend() {
    kill "$BACKEND_PID" 2>/dev/null || true
    wait "$BACKEND_PID" 2>/dev/null || true
    BACKEND_PID=""
}

# run_fio MODE IMG OUT: host fio (io_uring, defaults otherwise) on IMG, one job per workload
# (--invalidate=0: fio's default drops IMG's page cache, which ours then pays for in its reads)
# of ft-blk-bench's list, converted to ft-blk-bench's JSON. One fio process per queue would be
# the fair multi-queue peer; with --queues > 1 fio runs numjobs=QUEUES.
run_fio() {
    local mode=$1 img=$2 out=$3 direct=0 names w rw bs qd extra i
    [ "$mode" = direct ] && direct=1
    if [ "$WORKLOADS" = all ]; then
        names="randread4k-qd1 randwrite4k-qd1 randread4k-qd32 randwrite4k-qd32 seqread128k-qd8 seqwrite128k-qd8 randwrite4k-flush-qd1"
    else
        names=${WORKLOADS//,/ }
    fi
    i=0
    for w in $names; do
        extra=()
        case "$w" in
            randread4k-qd*) rw=randread; bs=4k ;;
            randwrite4k-flush-qd*) rw=randwrite; bs=4k; extra=(--fdatasync=1) ;;
            randwrite4k-qd*) rw=randwrite; bs=4k ;;
            seqread128k-qd*) rw=read; bs=128k ;;
            seqwrite128k-qd*) rw=write; bs=128k ;;
            *) log "fio: no mapping for workload $w"; continue ;;
        esac
        qd=${w##*-qd}
        # CPU of the whole fio process tree (io-wq workers are threads of the job process).
        /usr/bin/time -f '%e %U %S' -o "$WORK/fio-time" \
            fio --name="$w" --filename="$img" --ioengine=io_uring --direct=$direct --rw="$rw" \
                --bs="$bs" --iodepth="$qd" --numjobs="$QUEUES" --group_reporting --size="$SIZE" \
                --time_based --runtime="$RUNTIME" --ramp_time="$WARMUP" --invalidate=0 "${extra[@]}" \
                --output-format=json >"$WORK/fio-$i.json" 2>"$WORK/logs/fio.log"
        "$PY" - "$WORK/fio-$i.json" "$WORK/fio-time" "$w" >"$WORK/fio-$i.res" <<'PYEOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
el, u, s = (float(x) for x in open(sys.argv[2]).read().split()[-3:])
name = sys.argv[3]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
pct = lambda lat, p: lat["percentile"].get(p, 0) / 1000.0
lat = side["clat_ns"]
r = {"name": name, "iops": side["iops"], "errors": j.get("error", 0),
     "lat_us": {"p50": pct(lat, "50.000000"), "p99": pct(lat, "99.000000")},
     "client_cpu_pct": (u + s) / max(el, 1e-9) * 100.0, "backend_cpu_pct": None}
if "flush" in name:
    r["flush_lat_us"] = {"p50": pct(j["sync"]["lat_ns"], "50.000000"),
                         "p99": pct(j["sync"]["lat_ns"], "99.000000")}
print(json.dumps(r))
PYEOF
        # Leave no dirty pages behind: they would be written back during the next backend's
        # run on this file (and its first FLUSH would pay for them).
        sync "$img"
        i=$((i + 1))
    done
    "$PY" -c 'import json,sys; print(json.dumps({"label": "fio", "results": [json.loads(open(f).read()) for f in sys.argv[1:]]}))' \
        $(for k in $(seq 0 $((i - 1))); do echo "$WORK/fio-$k.res"; done) >"$out"
}

# --- runs -------------------------------------------------------------------------------------
# Host CPU pressure (PSI "some": share of the time some runnable task waited for a CPU) over
# the whole run, next to the load average: it says whether there was an idle core.
psi_us() { sed -n 's/^some .*total=\([0-9]*\)$/\1/p' /proc/pressure/cpu 2>/dev/null || true; }
PSI_BEFORE=$(psi_us)
T_BEFORE=$(date +%s%N)
if [ "$SATURATE" = 1 ]; then
    taskset -c $(($(nproc) - 1)) sh -c 'while :; do :; done' &
    BUSY_PID=$!
    log "saturating: busy loop pid $BUSY_PID pinned to CPU $(($(nproc) - 1))"
fi
for _ in $(seq 1 "$BUSY"); do
    sh -c 'while :; do :; done' &
    BUSY_PIDS+=($!)
done
[ "$BUSY" -gt 0 ] && log "busy: $BUSY unpinned busy loops (${BUSY_PIDS[*]})"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for mode in $MODES; do
    for b in $BACKENDS; do
        rm -f "$WORK/$b.img"
        truncate -s "$SIZE" "$WORK/$b.img"
    done
    if [[ " $BACKENDS " == *" fio "* && " $BACKENDS " != *" ours "* ]]; then
        # fio alone: give its reads allocated, non-zero blocks, as the prefill does for ours.
        fio --name=fill --filename="$WORK/fio.img" --rw=write --bs=1M --size="$SIZE" \
            --ioengine=psync --end_fsync=1 >/dev/null
    fi
    for round in $(seq 1 "$ROUNDS"); do
        # Alternate the order so drift (other load, page cache, thermal) hits both sides.
        order=$BACKENDS
        if [ $((round % 2)) -eq 0 ]; then order=$(echo "$BACKENDS" | awk '{for(i=NF;i>0;i--) printf "%s ", $i}'); fi
        for b in $order; do
            if [ "$b" = fio ]; then
                log "cache=$mode round $round/$ROUNDS: host fio"
                fimg=$WORK/fio.img
                # On ours' image when it is benchmarked (pre-filled by its first run).
                [[ " $BACKENDS " == *" ours "* ]] && fimg=$WORK/ours.img
                run_fio "$mode" "$fimg" "$WORK/json/$mode-$b-$round.json"
                continue
            fi
            sock="$WORK/$b.sock"
            # Every run starts with its image clean in the page cache (no writeback of an
            # earlier run's dirty pages going on meanwhile).
            sync "$WORK/$b.img"
            start_backend "$b" "$mode" "$WORK/$b.img" "$sock"
            prefill=()
            # The image keeps its data between rounds: pre-fill once per image.
            [ "$round" -gt 1 ] && prefill=(--no-prefill)
            log "cache=$mode round $round/$ROUNDS: $b"
            "$BENCH" --socket "$sock" --queues "$QUEUES" --runtime "$RUNTIME" --warmup "$WARMUP" \
                --workloads "$WORKLOADS" --backend-pid "$BACKEND_PID" --label "$b" --json \
                "${prefill[@]}" >"$WORK/json/$mode-$b-$round.json"
            stop_backend
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
if [ -n "$BUSY_PID" ]; then kill "$BUSY_PID"; wait "$BUSY_PID" 2>/dev/null || true; BUSY_PID=""; fi
for p in "${BUSY_PIDS[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
BUSY_PIDS=()
PSI_AFTER=$(psi_us)
HOST_PRESSURE=""
if [ -n "$PSI_BEFORE" ] && [ -n "$PSI_AFTER" ]; then
    HOST_PRESSURE=$(( (PSI_AFTER - PSI_BEFORE) * 100000 / ($(date +%s%N) - T_BEFORE) ))
fi
export HOST_PRESSURE SATURATE BUSY

# --- report -----------------------------------------------------------------------------------
TABLE="$WORK/table.md"
export WORK MODES BACKENDS ROUNDS RUNTIME WARMUP SIZE QUEUES CMDLINE OURS_NOTE LOAD_BEFORE LOAD_AFTER
export MACHINE_NPROC=$(nproc) MACHINE_KERNEL=$(uname -r)
export MACHINE_CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
export QSD_VERSION=$(qemu-storage-daemon --version | head -1)
OURS_VERSION=""
if [[ " $BACKENDS " == *" ours "* ]]; then
    OURS_VERSION="ours: \`${OURS#"$ROOT"/}${OURS_ARGS:+ $OURS_ARGS}\` ($("$OURS" --version 2>/dev/null | head -1), built $(date -u -r "$OURS" '+%Y-%m-%d %H:%M UTC'))${OURS_DESC:+; $OURS_DESC}"
fi
if [[ " $BACKENDS " == *" base "* ]]; then
    OURS_VERSION="$OURS_VERSION
- base: \`$BASE_BIN${BASE_ARGS:+ $BASE_ARGS}\` (built $(date -u -r "$BASE_BIN" '+%Y-%m-%d %H:%M UTC'))${BASE_DESC:+; $BASE_DESC}"
fi
export OURS_VERSION
export DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
export GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
"$PY" - >"$TABLE" <<'EOF'
import json, os, statistics

work = os.environ["WORK"]
modes = os.environ["MODES"].split()
backends = os.environ["BACKENDS"].split()
rounds = int(os.environ["ROUNDS"])

def load(mode, b):
    runs = []
    for r in range(1, rounds + 1):
        with open(f"{work}/json/{mode}-{b}-{r}.json") as f:
            runs.append({w["name"]: w for w in json.load(f)["results"]})
    return runs

def stats(runs, name, get):
    vals = [get(r[name]) for r in runs]
    return statistics.median(vals), min(vals), max(vals)

def fmt_iops(v):
    return f"{v/1000:.1f}k" if v >= 10000 else f"{v:.0f}"

out = []
out.append(f"Generated {os.environ['DATE']} at commit {os.environ['GIT_REV']} by `{os.environ['CMDLINE']}`.")
out.append("")
out.append(f"- Machine: {os.environ['MACHINE_NPROC']} CPUs ({os.environ['MACHINE_CPU']}), kernel {os.environ['MACHINE_KERNEL']}; "
           f"load average before/after: {os.environ['LOAD_BEFORE']} / {os.environ['LOAD_AFTER']}"
           + (f"; host CPU pressure (PSI some) over the run: {os.environ['HOST_PRESSURE']}%" if os.environ.get("HOST_PRESSURE") else ""))
if os.environ.get("SATURATE") == "1":
    out.append("- Saturated host (`--saturate`): a busy loop pinned to the last CPU during every measurement")
if os.environ.get("BUSY", "0") != "0":
    out.append(f"- Saturated host (`--busy {os.environ['BUSY']}`): {os.environ['BUSY']} unpinned busy loops during every measurement")
out.append(f"- {os.environ['QSD_VERSION']}")
if os.environ.get("OURS_VERSION"):
    out.append(f"- {os.environ['OURS_VERSION']}")
out.append(f"- {rounds} rounds, backends alternating; {os.environ['RUNTIME']} s measured after {os.environ['WARMUP']} s warm-up "
           f"per workload; {os.environ['SIZE']} raw image per backend; {os.environ['QUEUES']} queue(s), one client thread")
if os.environ.get("OURS_NOTE"):
    out.append(f"- **{os.environ['OURS_NOTE']}**")
out.append("- Cells: median across rounds, then min (IOPS) or max (latency) in parentheses. "
           "CPU: percent of one CPU, median; `cli` = ft-blk-bench, `be` = backend (all threads, io_uring workers included).")
if "fio" in backends:
    out.append("- `fio`: host fio 3.x, `--ioengine=io_uring` with default options, on ours' image file (same cache mode, "
               "`--fdatasync=1` for the flush workload); latency is its completion latency; CPU is the whole fio process "
               "including its io-wq workers (`/usr/bin/time`, ramp included). It has no virtio ring and no second process: a ceiling, not a peer.")
out.append("")

def ratio_cols(n, data):
    cols = []
    for other in ("qsd", "base", "fio"):
        if "ours" in data and other in data:
            om, omin, _ = stats(data["ours"], n, lambda w: w["iops"])
            xm, xmin, _ = stats(data[other], n, lambda w: w["iops"])
            cols += [f"{om/xm:.2f}", f"{omin/xmin:.2f}"]
    return cols

for mode in modes:
    data = {b: load(mode, b) for b in backends}
    names = list(data[backends[0]][0].keys())
    label = {"page": "page cache (qsd `cache.direct=off`, ours without `--direct`, fio `--direct=0`)",
             "direct": "O_DIRECT (qsd `cache.direct=on`, ours `--direct`, fio `--direct=1`)"}[mode]
    out.append(f"#### Cache mode: {label}")
    out.append("")
    head = ["workload"]
    for b in backends:
        cpu = "CPU" if b == "fio" else "CPU cli/be"
        head += [f"{b} IOPS", f"{b} p50 µs", f"{b} p99 µs", f"{b} {cpu}"]
    for other in ("qsd", "base", "fio"):
        if "ours" in backends and other in backends:
            head += [f"ours/{other} IOPS (median)", f"ours/{other} (min)"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for n in names:
        row = [f"`{n}`"]
        for b in backends:
            im, imin, _ = stats(data[b], n, lambda w: w["iops"])
            p50, _, p50max = stats(data[b], n, lambda w: w["lat_us"]["p50"])
            p99, _, p99max = stats(data[b], n, lambda w: w["lat_us"]["p99"])
            ccpu, _, _ = stats(data[b], n, lambda w: w["client_cpu_pct"])
            bcpu, _, _ = stats(data[b], n, lambda w: w["backend_cpu_pct"] or 0.0)
            errs = sum(r[n]["errors"] for r in data[b])
            cell = f"{fmt_iops(im)} ({fmt_iops(imin)})"
            if errs:
                cell += f" **{errs} errors**"
            cpu = f"{ccpu:.0f}%" if b == "fio" else f"{ccpu:.0f}% / {bcpu:.0f}%"
            row += [cell, f"{p50:.1f} ({p50max:.1f})", f"{p99:.1f} ({p99max:.1f})", cpu]
        row += ratio_cols(n, data)
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    flush = [n for n in names if all("flush_lat_us" in data[b][0][n] for b in backends)]
    for n in flush:
        out.append(f"FLUSH alone in `{n}` (submission to completion; fio: its `fdatasync` latency):")
        out.append("")
        out.append("| backend | FLUSH p50 µs | FLUSH p99 µs | p50 / fio p50 (median) |")
        out.append("|---|---|---|---|")
        fio50 = stats(data["fio"], n, lambda w: w["flush_lat_us"]["p50"])[0] if "fio" in data else None
        for b in backends:
            f50, _, f50max = stats(data[b], n, lambda w: w["flush_lat_us"]["p50"])
            f99, _, f99max = stats(data[b], n, lambda w: w["flush_lat_us"]["p99"])
            rel = f"{f50/fio50:.2f}" if fio50 else ""
            out.append(f"| {b} | {f50:.1f} ({f50max:.1f}) | {f99:.1f} ({f99max:.1f}) | {rel} |")
        out.append("")
print("\n".join(out))
EOF
cat "$TABLE"

if [ "$WRITE_DOC" = 1 ]; then
    printf '%s\n' "$(cat "$TABLE")" >"$TABLE.body"
    write_doc_section "$DOC" bench-blk "Block (vhost-user-blk)" "$TABLE.body"
    log "updated $DOC"
fi
