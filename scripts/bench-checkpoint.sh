#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Real checkpoints: what the migrate: checkpointer costs. One TCG guest per configuration runs
# the e2e-bench guest test (short fio jobs on its vhost-user-blk disk, iperf3 + ping to the
# host through its vhost-user-net NIC) while ft-coordinator checkpoints it:
#   off-M       both daemons --ft off (no gating, no checkpoints)
#   sim-M       both daemons --ft hold, --checkpointer sim:0 (gating alone, nothing copied)
#   paused-M    --ft hold, --checkpointer migrate:...,mode=paused to an ft-standby
#   live-M      --ft hold, --checkpointer migrate:...,mode=live to an ft-standby
# with M MiB of guest RAM. Cuts: --interval-ms 100 --min-interval-ms 10 (a migrate capture
# takes far longer, so its epochs are as long as one capture). Two tables go into
# docs/benchmarks.md between the "BEGIN bench-checkpoint" / "END bench-checkpoint" markers:
# per checkpoint (VM pause p50/p99, capture p50/p99, standby fsync p50, MiB per checkpoint,
# checkpoints/s) and what the guest saw (fio IOPS / latency, iperf3, ping).
#
# Usage: scripts/bench-checkpoint.sh [--configs "off-320 sim-320 paused-320 live-320 paused-512 live-512"]
#                                    [--runtime 3] [--iperf-secs 3] [--no-doc]
# Needs root (tap, network namespace). Results and logs: $FT_BENCH_DIR (/var/tmp/ft-bench-ckpt).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib/doc-section.sh
source "$ROOT/scripts/lib/doc-section.sh"
DOC="$ROOT/docs/benchmarks.md"
RUNTIME=3
IPERF_SECS=3
CONFIGS="off-320 sim-320 paused-320 live-320 paused-512 live-512"
WRITE_DOC=1
WORK=${FT_BENCH_DIR:-/var/tmp/ft-bench-ckpt}
HOST_IP=10.96.0.1
GUEST_IP=10.96.0.2/24
MAC=52:54:00:12:34:57
JOBS=randread-4k-qd32,randwrite-4k-qd1,randwrite-4k-qd32,fsync-4k
CMDLINE="scripts/bench-checkpoint.sh $*"

while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) RUNTIME=$2; shift 2 ;;
        --iperf-secs) IPERF_SECS=$2; shift 2 ;;
        --configs) CONFIGS=$2; shift 2 ;;
        --no-doc) WRITE_DOC=0; shift ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { echo "bench-checkpoint: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "needs root (tap device, network namespace)"; exit 1; }
command -v qemu-system-x86_64 >/dev/null || "$ROOT/scripts/setup.sh"
command -v jq >/dev/null || { log "needs jq"; exit 1; }
CACHE=${FT_CACHE:-$HOME/.cache/ft-vhost}
bash "$ROOT/tests/guest/build-guest.sh" "$CACHE/guest" >&2
log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p vhost-user-blk-ft -p vhost-user-net-ft -p ft-common \
    --bin vhost-user-blk-ft --bin vhost-user-net-ft --bin ft-coordinator --bin ftctl --bin ft-standby)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

rm -rf "$WORK"
mkdir -p "$WORK"
# shellcheck source=lib/guest-netns.sh
source "$ROOT/scripts/lib/guest-netns.sh"
netns_setup ftbc

# run_config NAME: one guest run; leaves $WORK/NAME/{serial.log,status.json,...}.
run_config() {
    local name=$1 dir="$WORK/$1" tap=ftbc0 kind=${1%-*} mem=${1##*-}
    mkdir -p "$dir"
    truncate -s 1G "$dir/disk.img"
    PIDS=()
    local ft=hold
    [ "$kind" != off ] || ft=off
    local blk=(--socket "$dir/blk.sock" --image "$dir/disk.img" --ft "$ft")
    local net=(--socket "$dir/net.sock" --tap "$tap" --ip "$HOST_IP/24" --mac "$MAC" --ft "$ft")
    [ "$ft" = off ] || blk+=(--control "$dir/blk.ctl")
    [ "$ft" = off ] || net+=(--control "$dir/net.ctl")
    "$BIN/vhost-user-blk-ft" "${blk[@]}" >"$dir/blk.log" 2>&1 &
    PIDS=("$!" "${PIDS[@]}")
    "${NSX[@]}" "$BIN/vhost-user-net-ft" "${net[@]}" >"$dir/net.log" 2>&1 &
    PIDS=("$!" "${PIDS[@]}")
    wait_for "$dir/net.sock" 10
    wait_for "$dir/blk.sock" 10
    case "$kind" in
        paused | live)
            "$BIN/ft-standby" --listen "unix:$dir/standby.sock" --store "$dir/store" \
                >"$dir/standby.log" 2>&1 &
            PIDS=("$!" "${PIDS[@]}")
            wait_for "$dir/standby.sock" 10
            ;;
    esac
    "${NSX[@]}" iperf3 -s -B "$HOST_IP" >"$dir/iperf3-server.log" 2>&1 &
    PIDS=("$!" "${PIDS[@]}")
    sleep 0.3

    local qemu=(qemu-system-x86_64 -accel tcg -cpu max -nodefaults -display none -serial stdio
        -no-reboot -smp 1 -m "${mem}M"
        -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -machine q35,memory-backend=mem
        -chardev "socket,id=blk0,path=$dir/blk.sock" -device vhost-user-blk-pci,chardev=blk0,num-queues=1
        -chardev "socket,id=net0,path=$dir/net.sock" -netdev vhost-user,id=net0,chardev=net0
        -device "virtio-net-pci,netdev=net0,vectors=0,mac=$MAC"
        -qmp "unix:$dir/qmp.sock,server=on,wait=off"
        -kernel "$CACHE/guest/vmlinux" -initrd "$CACHE/guest/initrd.img"
        -append "console=ttyS0 panic=-1 loglevel=4 ft.test=e2e-bench ft.runtime=$RUNTIME ft.size=32M ft.jobs=$JOBS ft.iperf_secs=$IPERF_SECS ft.ip=$GUEST_IP ft.peer=$HOST_IP")
    log "$name: guest running"
    local start=$SECONDS
    "${NSX[@]}" timeout 900 "${qemu[@]}" </dev/null >"$dir/serial.log" 2>"$dir/qemu.err" &
    local qpid=$!
    if [ "$kind" != off ]; then
        wait_for "$dir/qmp.sock" 30
        local ck
        case "$kind" in
            sim) ck=(--checkpointer sim:0 --unsafe-no-checkpoint) ;;
            *) ck=(--checkpointer "migrate:$dir/qmp.sock,standby=unix:$dir/standby.sock,mode=$kind") ;;
        esac
        "$BIN/ft-coordinator" --device "blk=$dir/blk.ctl" --device "net=$dir/net.ctl" "${ck[@]}" \
            --interval-ms 100 --min-interval-ms 10 --checkpoint-timeout-ms 60000 \
            --state-file "$dir/coordinator.state" --api "$dir/api.sock" >"$dir/coordinator.log" 2>&1 &
        PIDS=("$!" "${PIDS[@]}")
        wait_for "$dir/api.sock" 10
        local t0=$SECONDS
        # The status just before the guest ends (the coordinator outlives it only briefly).
        while kill -0 "$qpid" 2>/dev/null; do
            "$BIN/ftctl" --api "$dir/api.sock" status >"$dir/status.tmp" 2>/dev/null &&
                mv "$dir/status.tmp" "$dir/status.json"
            echo $((SECONDS - t0)) >"$dir/elapsed"
            sleep 1
        done
    fi
    wait "$qpid" || true
    log "$name: done in $((SECONDS - start)) s: $(tr -d '\r' <"$dir/serial.log" | grep -a -o 'FT-RESULT: .*' || echo 'no result')"
    cleanup_config
    rm -rf "$dir/disk.img" "$dir/store"
}

for c in $CONFIGS; do run_config "$c"; done

: >"$WORK/results.txt"
for c in $CONFIGS; do
    tr -d '\r' <"$WORK/$c/serial.log" | awk -v c="$c" '
        function kv(key,   i) { for (i = 1; i <= NF; i++) if (index($i, key "=") == 1) return substr($i, length(key) + 2); return "" }
        /FT-BENCH: fio / { sub(/.*FT-BENCH: /, ""); printf "%s %s %s/%s\n", c, kv("job"), kv("iops"), kv("lat_us") }
        /FT-BENCH: iperf3 / { sub(/.*FT-BENCH: /, ""); printf "%s iperf3 %s\n", c, kv("mbit") }
        /FT-BENCH: ping / { sub(/.*FT-BENCH: /, ""); printf "%s ping %s\n", c, kv("avg_ms") }
        /FT-RESULT: / { sub(/.*FT-RESULT: /, ""); gsub(/ /, "_"); printf "%s result %s\n", c, $0 }' >>"$WORK/results.txt"
done

ms() { awk -v u="$1" 'BEGIN { if (u == "" || u == "null") print "-"; else printf "%.0f", u / 1000 }'; }

checkpoint_table() {
    echo "| config | checkpoints | VM pause p50 / p99 ms | capture p50 / p99 ms | standby fsync p50 ms | MiB per checkpoint | checkpoints/s | epochs committed | seal to commit p50 ms |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    local c s
    for c in $CONFIGS; do
        s="$WORK/$c/status.json"
        case "${c%-*}" in paused | live) ;; *) continue ;; esac
        [ -f "$s" ] || { echo "| $c | no status | | | | | | | |"; continue; }
        local n pp50 pp99 cp50 cp99 f50 bytes el ec s2c
        n=$(jq -r '.checkpointer.capture.checkpoints_durable' "$s")
        pp50=$(ms "$(jq -r '.checkpointer.capture.vm_pause.p50_us' "$s")")
        pp99=$(ms "$(jq -r '.checkpointer.capture.vm_pause.p99_us' "$s")")
        cp50=$(ms "$(jq -r '.checkpointer.capture.capture.p50_us' "$s")")
        cp99=$(ms "$(jq -r '.checkpointer.capture.capture.p99_us' "$s")")
        f50=$(ms "$(jq -r '.checkpointer.capture.standby_fsync.p50_us' "$s")")
        bytes=$(jq -r '.checkpointer.capture.bytes_total' "$s")
        el=$(cat "$WORK/$c/elapsed")
        ec=$(jq -r '.cycle.epochs_committed' "$s")
        s2c=$(ms "$(jq -r '.latency.seal_to_commit.p50_us' "$s")")
        awk -v c="$c" -v n="$n" -v a="$pp50 / $pp99" -v b="$cp50 / $cp99" -v f="$f50" -v by="$bytes" \
            -v el="$el" -v ec="$ec" -v s2c="$s2c" 'BEGIN {
            printf "| %s | %d | %s | %s | %s | %.0f | %.2f | %d | %s |\n", c, n, a, b, f,
                (n > 0 ? by / n / 1048576 : 0), (el > 0 ? n / el : 0), ec, s2c }'
    done
}

guest_table() {
    awk -v configs="$CONFIGS" '
        BEGIN {
            nc = split(configs, cfg, " ")
            nr = split("randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 fsync-4k iperf3 ping result", row, " ")
        }
        { v[$1, $2] = $3 }
        END {
            h = "| workload (fio: IOPS / mean latency us) |"; s = "|---|"
            for (j = 1; j <= nc; j++) { h = h " " cfg[j] " |"; s = s "---:|" }
            print h; print s
            for (i = 1; i <= nr; i++) {
                label = row[i] == "iperf3" ? "iperf3 guest->host Mbit/s" : row[i] == "ping" ? "ping avg ms" : row[i] == "result" ? "guest result" : row[i]
                line = "| " label " |"
                for (j = 1; j <= nc; j++) line = line " " ((cfg[j], row[i]) in v ? v[cfg[j], row[i]] : "-") " |"
                print line
            }
        }' "$WORK/results.txt"
}

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo " (+ local changes)" || true)
{
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') at commit \`$COMMIT\`$DIRTY: \`$CMDLINE\`."
    echo
    echo "- Machine: $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) CPUs, load average at the end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo "- $(qemu-system-x86_64 --version | head -n1), TCG, 1 vCPU; guest RAM as in the config name (MiB). Both daemons on a 1 GiB sparse image and a tap; ft-standby on the same host (unix socket, store on the root disk)."
    echo "- ft-coordinator \`--interval-ms 100 --min-interval-ms 10\`; \`migrate:\` with its defaults (max-bandwidth 16 GiB/s, downtime-limit 20 ms). VM pause: from the stop (paused: \`stop\`; live: QEMU's \`pre-switchover\`) to \`cont\` returned. Capture: \`migrate\` issued to \`completed\`. Every checkpoint copies all guest RAM (stock QEMU 7.2 has no incremental capture), which bounds the checkpoint rate whatever the interval says."
    echo "- Guest: e2e-bench (fio on a 32 MiB area, ${RUNTIME} s per job after 1 s ramp; iperf3 ${IPERF_SECS} s; ping). Under hold every write and every TX packet waits for its epoch's commit, so write and network numbers fall with the epoch length."
    echo "- One run on a shared 2-core machine with other jobs running: expect variations of 2x between runs."
    echo
    checkpoint_table
    echo
    guest_table
    echo
} >"$WORK/section.md"

if [ "$WRITE_DOC" = 1 ]; then
    write_doc_section "$DOC" bench-checkpoint "Real checkpoints (migrate checkpointer)" "$WORK/section.md"
    log "tables written to $DOC"
fi
cat "$WORK/section.md"
