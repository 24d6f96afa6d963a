#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Guest-level benchmark: one TCG guest per configuration runs short fio jobs on its
# vhost-user-blk disk (4k randread/randwrite at QD1 and QD32, 128k sequential read/write, 4k
# writes with an fsync after each) and iperf3 + ping to the host through its NIC, for
#   off      vhost-user-blk-ft and vhost-user-net-ft, --ft off
#   hold-5   both daemons --ft hold, ft-coordinator (sim:0) cutting every 5 ms and 5 ms after
#            output appears (--interval-ms 5 --min-interval-ms 5)
#   hold-25  the same at 25 ms
#   qsd      qemu-storage-daemon's vhost-user-blk export, QEMU's own virtio-net on a tap
# and writes a side-by-side table into docs/benchmarks.md between the "BEGIN bench-guest" /
# "END bench-guest" markers (other sections are left alone).
#
# Under TCG the 1-vCPU guest is the bottleneck (~20-30k IOPS at best): the numbers compare what
# a guest sees end to end (notably the latency that holding adds), not raw backend speed; see
# scripts/bench-blk.sh for that.
#
# Usage: scripts/bench-guest.sh [--runtime 3] [--iperf-secs 3] [--configs "off hold-5 hold-25 qsd"]
#                               [--no-doc]
# Needs root (tap, network namespace). Results and logs: $FT_BENCH_DIR (/var/tmp/ft-bench-guest).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib/doc-section.sh
source "$ROOT/scripts/lib/doc-section.sh"
DOC="$ROOT/docs/benchmarks.md"
RUNTIME=3
IPERF_SECS=3
CONFIGS="off hold-5 hold-25 qsd"
WRITE_DOC=1
WORK=${FT_BENCH_DIR:-/var/tmp/ft-bench-guest}
HOST_IP=10.97.0.1
GUEST_IP=10.97.0.2/24
MAC=52:54:00:12:34:56
CMDLINE="scripts/bench-guest.sh $*"

while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) RUNTIME=$2; shift 2 ;;
        --iperf-secs) IPERF_SECS=$2; shift 2 ;;
        --configs) CONFIGS=$2; shift 2 ;;
        --no-doc) WRITE_DOC=0; shift ;;
        -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { echo "bench-guest: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "needs root (tap device, network namespace)"; exit 1; }
command -v qemu-system-x86_64 >/dev/null && command -v qemu-storage-daemon >/dev/null ||
    "$ROOT/scripts/setup.sh"
CACHE=${FT_CACHE:-$HOME/.cache/ft-vhost}
bash "$ROOT/tests/guest/build-guest.sh" "$CACHE/guest" >&2
log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p vhost-user-blk-ft -p vhost-user-net-ft -p ft-common \
    --bin vhost-user-blk-ft --bin vhost-user-net-ft --bin ft-coordinator)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

rm -rf "$WORK"
mkdir -p "$WORK"
# shellcheck source=lib/guest-netns.sh
source "$ROOT/scripts/lib/guest-netns.sh"
netns_setup ftbg

# run_config NAME: one guest run; leaves $WORK/NAME/{serial.log,...}.
run_config() {
    local name=$1 dir="$WORK/$1" tap=ftbg0 netdev
    mkdir -p "$dir"
    truncate -s 1G "$dir/disk.img"
    PIDS=()
    case "$name" in
        qsd)
            qemu-storage-daemon --blockdev "driver=file,node-name=disk,filename=$dir/disk.img" \
                --export "type=vhost-user-blk,id=exp,node-name=disk,writable=on,addr.type=unix,addr.path=$dir/blk.sock" \
                >"$dir/blk.log" 2>&1 &
            PIDS=("$!" "${PIDS[@]}")
            "${NSX[@]}" ip tuntap add dev "$tap" mode tap
            "${NSX[@]}" ip addr add "$HOST_IP/24" dev "$tap"
            "${NSX[@]}" ip link set "$tap" up
            netdev="tap,id=net0,ifname=$tap,script=no,downscript=no,vhost=off"
            ;;
        off | hold-*)
            local ft=off
            [ "$name" = off ] || ft=hold
            local blk=(--socket "$dir/blk.sock" --image "$dir/disk.img" --ft "$ft")
            local net=(--socket "$dir/net.sock" --tap "$tap" --ip "$HOST_IP/24" --mac "$MAC" --ft "$ft")
            [ "$ft" = off ] || blk+=(--control "$dir/blk.ctl")
            [ "$ft" = off ] || net+=(--control "$dir/net.ctl")
            "$BIN/vhost-user-blk-ft" "${blk[@]}" >"$dir/blk.log" 2>&1 &
            PIDS=("$!" "${PIDS[@]}")
            "${NSX[@]}" "$BIN/vhost-user-net-ft" "${net[@]}" >"$dir/net.log" 2>&1 &
            PIDS=("$!" "${PIDS[@]}")
            wait_for "$dir/net.sock" 10
            if [ "$ft" = hold ]; then
                local ms=${name#hold-}
                "$BIN/ft-coordinator" --device "blk=$dir/blk.ctl" --device "net=$dir/net.ctl" \
                    --checkpointer sim:0 --unsafe-no-checkpoint --interval-ms "$ms" --min-interval-ms "$ms" \
                    --state-file "$dir/coordinator.state" --api "$dir/api.sock" \
                    >"$dir/coordinator.log" 2>&1 &
                PIDS=("$!" "${PIDS[@]}")
                wait_for "$dir/api.sock" 10
            fi
            netdev="vhost-user,id=net0,chardev=net0"
            ;;
        *) log "unknown config $name"; exit 2 ;;
    esac
    wait_for "$dir/blk.sock" 10
    "${NSX[@]}" iperf3 -s -B "$HOST_IP" >"$dir/iperf3-server.log" 2>&1 &
    PIDS=("$!" "${PIDS[@]}")
    sleep 0.3

    local qemu=(qemu-system-x86_64 -accel tcg -cpu max -nodefaults -display none -serial stdio
        -no-reboot -smp 1 -m 512M
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem
        -chardev "socket,id=blk0,path=$dir/blk.sock" -device vhost-user-blk-pci,chardev=blk0,num-queues=1)
    [ "$name" = qsd ] || qemu+=(-chardev "socket,id=net0,path=$dir/net.sock")
    # vectors=0 (INTx) for every config: QEMU 7.2 under TCG crashes with MSI-X on vhost-user-net,
    # and the baseline must use the same interrupt path.
    qemu+=(-netdev "$netdev" -device "virtio-net-pci,netdev=net0,vectors=0,mac=$MAC"
        -kernel "$CACHE/guest/vmlinux" -initrd "$CACHE/guest/initrd.img"
        -append "console=ttyS0 panic=-1 loglevel=4 ft.test=e2e-bench ft.runtime=$RUNTIME ft.iperf_secs=$IPERF_SECS ft.ip=$GUEST_IP ft.peer=$HOST_IP")
    log "$name: guest running"
    local start=$SECONDS
    "${NSX[@]}" timeout 600 "${qemu[@]}" </dev/null >"$dir/serial.log" 2>"$dir/qemu.err" || true
    log "$name: done in $((SECONDS - start)) s: $(tr -d '\r' <"$dir/serial.log" | grep -a -o 'FT-RESULT: .*' || echo 'no result')"
    cleanup_config
    [ "$name" != qsd ] || "${NSX[@]}" ip link del "$tap" 2>/dev/null || true
    rm -f "$dir/disk.img"
}

for c in $CONFIGS; do run_config "$c"; done

# results.txt: "config key value" lines (key = fio job name, iperf3, ping, result).
: >"$WORK/results.txt"
for c in $CONFIGS; do
    tr -d '\r' <"$WORK/$c/serial.log" | awk -v c="$c" '
        function kv(key,   i) { for (i = 1; i <= NF; i++) if (index($i, key "=") == 1) return substr($i, length(key) + 2); return "" }
        /FT-BENCH: fio / { sub(/.*FT-BENCH: /, ""); printf "%s %s %s/%s\n", c, kv("job"), kv("iops"), kv("lat_us") }
        /FT-BENCH: iperf3 / { sub(/.*FT-BENCH: /, ""); printf "%s iperf3 %s\n", c, kv("mbit") }
        /FT-BENCH: ping / { sub(/.*FT-BENCH: /, ""); printf "%s ping %s\n", c, kv("avg_ms") }
        /FT-RESULT: / { sub(/.*FT-RESULT: /, ""); gsub(/ /, "_"); printf "%s result %s\n", c, $0 }' >>"$WORK/results.txt"
done

table() {
    awk -v configs="$CONFIGS" '
        BEGIN {
            nc = split(configs, cfg, " ")
            nr = split("randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 seqread-128k seqwrite-128k fsync-4k iperf3 ping result", row, " ")
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
    echo "- $(qemu-system-x86_64 --version | head -n1), TCG, 1 vCPU, 512 MiB; guest disk switched to write back (fsync reaches every backend)."
    echo "- fio: libaio, O_DIRECT, 256 MiB area of a 1 GiB sparse raw image (prefilled), ${RUNTIME} s per job after 1 s ramp; fsync-4k = 4k random writes, fsync after each."
    echo "- hold-N: both daemons \`--ft hold\`, ft-coordinator \`--checkpointer sim:0 --interval-ms N --min-interval-ms N\` (the cost of gating alone, no checkpoint transfer). qsd: qemu-storage-daemon's export (page cache) and QEMU's own virtio-net on a tap (vhost=off)."
    echo "- One run per configuration under TCG: rows of the same workload vary by up to ~2x between runs (reads are never held, so off vs hold read differences are noise). What holding costs shows in the QD1 write and fsync rows: every write completes only after the commit of its epoch, so QD1 write latency is about the cut interval."
    echo
    table
    echo
} >"$WORK/section.md"

if [ "$WRITE_DOC" = 1 ]; then
    write_doc_section "$DOC" bench-guest "Guest end to end (TCG): block and network together" "$WORK/section.md"
    log "table written to $DOC"
fi
cat "$WORK/section.md"
