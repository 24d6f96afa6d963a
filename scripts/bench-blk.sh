#!/usr/bin/env bash
# Block benchmark: ft-blk-bench (VM-less vhost-user-blk client) against qemu-storage-daemon and
# against our vhost-user-blk-ft, same image size, same cache mode, alternating backends for
# several rounds; writes a side-by-side table into docs/benchmarks.md between markers.
#
# Usage: scripts/bench-blk.sh [--rounds N] [--runtime S] [--warmup S] [--size 1G]
#                             [--cache page|direct|both] [--queues N] [--workloads LIST]
#                             [--no-doc] [--keep]
# Env:   BENCH_DIR   parent of the scratch directory (default /var/tmp; must not be tmpfs)
#        OURS_BIN    vhost-user-blk-ft binary to use instead of building target/release's
#        OURS_DESC   free text about that binary (e.g. its source commit) for the report
#        OURS_ARGS   extra flags for vhost-user-blk-ft (e.g. "--poll-max-ns 32768"), reported
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
DOC="$ROOT/docs/benchmarks.md"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

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
        --keep) KEEP=1; shift ;;
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

# --- scratch space on the real disk ------------------------------------------------------
PARENT=${BENCH_DIR:-/var/tmp}
if [ "$(stat -f -c %T "$PARENT")" = tmpfs ]; then
    log "$PARENT is tmpfs; set BENCH_DIR to a directory on a real disk"; exit 1
fi
WORK=$(mktemp -d "$PARENT/ft-bench-blk.XXXXXX")
BACKEND_PID=""
cleanup() {
    if [ -n "$BACKEND_PID" ]; then kill "$BACKEND_PID" 2>/dev/null || true; wait "$BACKEND_PID" 2>/dev/null || true; fi
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
        ours)
            local extra=()
            [ "$mode" = direct ] && extra+=(--direct)
            # shellcheck disable=SC2206 # OURS_ARGS is a list of flags
            extra+=(${OURS_ARGS:-})
            RUST_LOG=warn "$OURS" --socket "$sock" --image "$img" --queues "$QUEUES" "${extra[@]}" \
                >"$WORK/logs/ours.log" 2>&1 &
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

# --- runs -------------------------------------------------------------------------------------
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for mode in $MODES; do
    for b in $BACKENDS; do
        rm -f "$WORK/$b.img"
        truncate -s "$SIZE" "$WORK/$b.img"
    done
    for round in $(seq 1 "$ROUNDS"); do
        # Alternate the order so drift (other load, page cache, thermal) hits both sides.
        order=$BACKENDS
        if [ $((round % 2)) -eq 0 ]; then order=$(echo "$BACKENDS" | awk '{for(i=NF;i>0;i--) printf "%s ", $i}'); fi
        for b in $order; do
            sock="$WORK/$b.sock"
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
           f"load average before/after: {os.environ['LOAD_BEFORE']} / {os.environ['LOAD_AFTER']}")
out.append(f"- {os.environ['QSD_VERSION']}")
if os.environ.get("OURS_VERSION"):
    out.append(f"- {os.environ['OURS_VERSION']}")
out.append(f"- {rounds} rounds, backends alternating; {os.environ['RUNTIME']} s measured after {os.environ['WARMUP']} s warm-up "
           f"per workload; {os.environ['SIZE']} raw image per backend; {os.environ['QUEUES']} queue(s), one client thread")
if os.environ.get("OURS_NOTE"):
    out.append(f"- **{os.environ['OURS_NOTE']}**")
out.append("- Cells: median across rounds, then min (IOPS) or max (latency) in parentheses. "
           "CPU: percent of one CPU, median; `cli` = ft-blk-bench, `be` = backend (all threads).")
out.append("")

for mode in modes:
    data = {b: load(mode, b) for b in backends}
    names = list(data[backends[0]][0].keys())
    label = {"page": "page cache (qsd `cache.direct=off`, ours without `--direct`)",
             "direct": "O_DIRECT (qsd `cache.direct=on`, ours `--direct`)"}[mode]
    out.append(f"#### Cache mode: {label}")
    out.append("")
    head = ["workload"]
    for b in backends:
        head += [f"{b} IOPS", f"{b} p50 µs", f"{b} p99 µs", f"{b} CPU cli/be"]
    if "ours" in backends and "qsd" in backends:
        head += ["ours/qsd IOPS (median)", "ours/qsd (min)"]
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
            row += [cell, f"{p50:.1f} ({p50max:.1f})", f"{p99:.1f} ({p99max:.1f})", f"{ccpu:.0f}% / {bcpu:.0f}%"]
        if "ours" in backends and "qsd" in backends:
            om, omin, _ = stats(data["ours"], n, lambda w: w["iops"])
            qm, qmin, _ = stats(data["qsd"], n, lambda w: w["iops"])
            row += [f"{om/qm:.2f}", f"{omin/qmin:.2f}"]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
print("\n".join(out))
EOF
cat "$TABLE"

if [ "$WRITE_DOC" = 1 ]; then
    printf '%s\n' "$(cat "$TABLE")" >"$TABLE.body"
    write_doc_section "$DOC" bench-blk "Block (vhost-user-blk)" "$TABLE.body"
    log "updated $DOC"
fi
