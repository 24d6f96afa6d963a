#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Network benchmark of a TCG guest: iperf3 guest->host and host->guest throughput and ping RTT
# (p50/p99) through
#   off     vhost-user-net-ft --ft off (plain backend)
#   hold-N  vhost-user-net-ft --ft hold, ft-ack sealing+committing every N ms (N = 1, 5, 25)
#   qemu    QEMU's in-process virtio-net on a tap (-netdev tap,vhost=off): the baseline
# and writes a table with ratios to the baseline into docs/benchmarks.md, between the
# "BEGIN bench-net" / "END bench-net" markers (the rest of the file is left alone).
#
# Everything runs in a network namespace of its own (tap 10.77.0.1/24, guest 10.77.0.2/24).
# Under TCG the guest's vCPU is the bottleneck: the numbers compare end-to-end behaviour of the
# configurations on the same guest, not raw backend speed.
#
# Usage: scripts/bench-net.sh [--iperf-secs 5] [--pings 50] [--ping-interval 0.1] [--rounds 3]
#                             [--configs "off hold-1 hold-5 hold-25 qemu"] [--qemu10] [--no-doc]
#        --qemu10: Debian 13's QEMU 10 (scripts/qemu10.sh) instead of the host's 7.2, with MSI-X
#        (7.2 needs INTx, see below); a guest that ends without PASS is a stall to look at.
#        scripts/bench-net.sh --pps [ARGS]   VM-less 64 B packet rate with DPDK testpmd as the
#                                            frontend (scripts/bench-net-pps.sh, ARGS are its own)
# Rounds run the configurations interleaved (round 1: all configs, round 2: all, ...), so a
# burst of load on the shared machine hits them alike; throughput is the median over rounds
# (min-max shown), RTT percentiles pool the pings of all rounds.
# Needs root, the host tools of scripts/setup.sh and the guest of tests/guest/build-guest.sh
# (both run on demand). Results and logs: $FT_BENCH_DIR (default /tmp/ft-bench-net).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib/doc-section.sh
source "$ROOT/scripts/lib/doc-section.sh"
DOC="$ROOT/docs/benchmarks.md"
IPERF_SECS=5
PINGS=50
PING_INTERVAL=0.1
CONFIGS="off hold-1 hold-5 hold-25 qemu"
ROUNDS=3
WRITE_DOC=1
QEMU10=0
WORK=${FT_BENCH_DIR:-/tmp/ft-bench-net}
HOST_IP=10.77.0.1
GUEST_IP=10.77.0.2/24
MAC=52:54:00:12:34:56

[ "${1:-}" != --pps ] || { shift; exec "$ROOT/scripts/bench-net-pps.sh" "$@"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --iperf-secs) IPERF_SECS=$2; shift 2 ;;
        --pings) PINGS=$2; shift 2 ;;
        --ping-interval) PING_INTERVAL=$2; shift 2 ;;
        --configs) CONFIGS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --qemu10) QEMU10=1; shift ;;
        --no-doc) WRITE_DOC=0; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { echo "bench-net: $*" >&2; }

QEMU_BIN=(qemu-system-x86_64) VECTORS=,vectors=0 QEMU10_FLAG=""
if [ "$QEMU10" = 1 ]; then
    "$ROOT/scripts/qemu10.sh" --version >/dev/null 2>&1 || "$ROOT/scripts/qemu10-root.sh" >&2
    QEMU_BIN=("$ROOT/scripts/qemu10.sh") VECTORS="" QEMU10_FLAG=" --qemu10"
fi

[ "$(id -u)" -eq 0 ] || { log "needs root (taps, network namespaces)"; exit 1; }
command -v qemu-system-x86_64 >/dev/null && command -v iperf3 >/dev/null || "$ROOT/scripts/setup.sh"
CACHE=${FT_CACHE:-$HOME/.cache/ft-vhost}
# A guest directory of our own: the shared one ($CACHE/guest) is rebuilt by any test run from a
# checkout whose guest scripts differ, which would swap the image under a long benchmark. The
# kernel .deb is taken from the shared cache when it is there (no second download).
GUEST=${FT_BENCH_GUEST:-$CACHE/guest-bench-net}
mkdir -p "$GUEST/debs"
for deb in "$CACHE"/guest/debs/*.deb; do
    [ -e "$deb" ] && [ ! -e "$GUEST/debs/$(basename "$deb")" ] && cp "$deb" "$GUEST/debs/"
done
bash "$ROOT/tests/guest/build-guest.sh" "$GUEST" >&2
KERNEL=$GUEST/vmlinux
INITRD=$GUEST/initrd.img

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p vhost-user-net-ft -p ft-tests --bin vhost-user-net-ft --bin ft-ack)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
DAEMON=$TARGET/vhost-user-net-ft
ACK=$TARGET/ft-ack

rm -rf "$WORK"
mkdir -p "$WORK"
# shellcheck source=lib/guest-netns.sh
source "$ROOT/scripts/lib/guest-netns.sh"
netns_setup ftbench
nsx() { "${NSX[@]}" "$@"; }

# stop_pid PID: SIGTERM and reap (ours exit cleanly on SIGTERM).
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# run_config NAME ROUND: one guest run; leaves $WORK/NAME/rROUND/{serial.log,...}.
run_config() {
    local name=$1 dir="$WORK/$1/r$2" tap="ftb${1//-/}" netdev daemon_pid="" ack_pid="" iperf_pid
    mkdir -p "$dir"
    case "$name" in
        qemu)
            # A persistent tap QEMU attaches to, configured before the guest boots.
            nsx ip tuntap add dev "$tap" mode tap
            nsx ip addr add "$HOST_IP/24" dev "$tap"
            nsx ip link set "$tap" up
            netdev="tap,id=net0,ifname=$tap,script=no,downscript=no,vhost=off"
            ;;
        off | hold-*)
            local args=(--socket "$dir/net.sock" --tap "$tap" --ip "$HOST_IP/24" --mac "$MAC")
            [ "$name" = off ] || args+=(--ft hold --control "$dir/net.ctl")
            RUST_LOG=info "${NSX[@]}" "$DAEMON" "${args[@]}" >"$dir/daemon.log" 2>&1 &
            daemon_pid=$!
            PIDS+=("$daemon_pid")
            wait_for "$dir/net.sock" 10
            if [ "$name" != off ]; then
                "$ACK" --control "$dir/net.ctl" --interval-ms "${name#hold-}" >"$dir/ack.log" 2>&1 &
                ack_pid=$!
                PIDS+=("$ack_pid")
            fi
            netdev="vhost-user,id=net0,chardev=net0"
            ;;
        *) log "unknown config $name"; exit 2 ;;
    esac
    "${NSX[@]}" iperf3 -s -B "$HOST_IP" >"$dir/iperf3-server.log" 2>&1 &
    iperf_pid=$!
    PIDS+=("$iperf_pid")
    sleep 0.5

    local qemu=("${QEMU_BIN[@]}" -accel tcg -cpu max -nodefaults -display none -serial stdio
        -no-reboot -smp 1 -m 512M
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem)
    [ "$name" = qemu ] || qemu+=(-chardev "socket,id=net0,path=$dir/net.sock")
    # vectors=0 (INTx) for every config on QEMU 7.2: under TCG it crashes with MSI-X on
    # vhost-user-net, and the baseline must use the same interrupt path.
    qemu+=(-netdev "$netdev" -device "virtio-net-pci,netdev=net0$VECTORS,mac=$MAC"
        -kernel "$KERNEL" -initrd "$INITRD"
        -append "console=ttyS0 panic=-1 loglevel=4 ft.test=net-iperf ft.ip=$GUEST_IP ft.peer=$HOST_IP ft.pings=$PINGS ft.ping_interval=$PING_INTERVAL ft.iperf_secs=$IPERF_SECS")
    echo "${qemu[*]}" >"$dir/qemu.cmd"
    log "$name round $2: guest running"
    local start=$SECONDS
    nsx timeout 300 "${qemu[@]}" </dev/null >"$dir/serial.log" 2>"$dir/qemu.err" || true
    log "$name round $2: guest done in $((SECONDS - start)) s: $(grep -a -o 'FT-RESULT: .*' "$dir/serial.log" | tr -d '\r' || echo 'no result')"

    stop_pid "$iperf_pid"
    # After the guest: ft-ack's last round releases what was still held.
    [ -z "$ack_pid" ] || stop_pid "$ack_pid"
    [ -z "$daemon_pid" ] || stop_pid "$daemon_pid"
    [ "$name" != qemu ] || nsx ip link del "$tap"
}

# summarize NAME: one line "name tx_med tx_min tx_max rx_med rx_min rx_max p50 p99 pings
# results ack" over all rounds of NAME.
summarize() {
    local name=$1 d per_round="" rtts results="" ack="-" r
    for d in "$WORK/$name"/r*; do
        per_round+=$(tr -d '\r' <"$d/serial.log" | awk '
            /FT-NET: iperf / {
                sub(/.*FT-NET: /, "")
                for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                mbit[v["dir"]] = v["seconds"] > 0 ? v["received_bytes"] * 8 / v["seconds"] / 1e6 : 0
            }
            END { printf "%.0f %.0f\n", mbit["tx"] + 0, mbit["rx"] + 0 }')$'\n'
        r=$(grep -a -o 'FT-RESULT: [A-Z]*' "$d/serial.log" | head -n1 | awk '{ print $2 }' || true)
        results+="${r:-NONE},"
    done
    if ls "$WORK/$name"/r*/ack.log >/dev/null 2>&1; then
        ack=$(cat "$WORK/$name"/r*/ack.log | awk '/^ft-ack:/ {
            for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            rounds += v["rounds"]; nonempty += v["nonempty_commits"]; runs++
            if (v["max_round_us"] > slowest) slowest = v["max_round_us"] }
            END { if (runs) printf "%d/%d/%.1f", rounds, nonempty, slowest / 1000; else print "failed" }')
    fi
    # Pooled RTTs of all rounds, sorted; pings received/sent over all rounds.
    rtts=$(cat "$WORK/$name"/r*/serial.log | tr -d '\r' | sed -n 's/.*FT-NET: rtt_ms=\([0-9.]*\).*/\1/p' | sort -n)
    local pings
    pings=$(cat "$WORK/$name"/r*/serial.log | tr -d '\r' | sed -n 's/.*FT-NET: ping sent=\([0-9]*\) received=\([0-9]*\).*/\1 \2/p' |
        awk '{ s += $1; r += $2 } END { printf "%d/%d", r, s }')
    results=${results%,}
    [ "$(echo "$results" | tr ',' '\n' | sort -u)" = PASS ] && results=PASS
    local cols
    cols=$({
        echo "$per_round" | awk 'NF' | sort -n -k1,1 | awk '{ v[NR] = $1 } END { printf "%s %s %s ", v[int((NR + 1) / 2)], v[1], v[NR] }'
        echo "$per_round" | awk 'NF' | sort -n -k2,2 | awk '{ v[NR] = $2 } END { printf "%s %s %s ", v[int((NR + 1) / 2)], v[1], v[NR] }'
        echo "$rtts" | awk 'NF { v[n++] = $1 } END {
            printf "%.2f %.2f ", n ? v[int((n - 1) * 0.50 + 0.5)] : 0, n ? v[int((n - 1) * 0.99 + 0.5)] : 0 }'
    })
    echo "$name $cols $pings $results $ack"
}

for round in $(seq 1 "$ROUNDS"); do
    for c in $CONFIGS; do run_config "$c" "$round"; done
done
: >"$WORK/summary.txt"
for c in $CONFIGS; do summarize "$c" >>"$WORK/summary.txt"; done
cat "$WORK/summary.txt" >&2

# The table, with ratios to QEMU's own virtio-net (if it ran).
table() {
    awk '
        { name[NR] = $1; tx[NR] = $2; txr[NR] = $3 "-" $4; rx[NR] = $5; rxr[NR] = $6 "-" $7
          p50[NR] = $8; p99[NR] = $9; pings[NR] = $10; res[NR] = $11; ack[NR] = $12
          if ($1 == "qemu") { btx = $2; brx = $5; bp50 = $8; bp99 = $9 } }
        function ratio(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "-" }
        END {
            print "| config | guest->host Mbit/s (min-max) | x qemu | host->guest Mbit/s (min-max) | x qemu | ping p50 ms | x qemu | ping p99 ms | x qemu | pings | commits (all/non-empty/slowest ms) | guest |"
            print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
            for (i = 1; i <= NR; i++)
                printf "| %s | %.0f (%s) | %s | %.0f (%s) | %s | %.2f | %s | %.2f | %s | %s | %s | %s |\n", name[i],
                    tx[i], txr[i], ratio(tx[i], btx), rx[i], rxr[i], ratio(rx[i], brx),
                    p50[i], ratio(p50[i], bp50), p99[i], ratio(p99[i], bp99), pings[i], ack[i], res[i]
        }' "$WORK/summary.txt"
}

CPU=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)
QEMU_VER=$("${QEMU_BIN[@]}" --version | head -n1)
IPERF_VER=$(iperf3 --version | head -n1)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo " (+ local changes)" || true)
{
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') at commit \`$COMMIT\`$DIRTY:"
    echo "\`scripts/bench-net.sh --iperf-secs $IPERF_SECS --pings $PINGS --ping-interval $PING_INTERVAL --rounds $ROUNDS --configs \"$CONFIGS\"${QEMU10_FLAG}\`."
    echo
    echo "- Machine: $CPU, $(nproc) CPUs, kernel $(uname -r), load average at the end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo "- $QEMU_VER, TCG, 1 vCPU, 512 MiB; guest kernel $(awk '{ print $2, $3 }' "$GUEST/kernel-choice" 2>/dev/null) (Debian 12); $IPERF_VER."
    echo "- Guest: \`iperf3 -c $HOST_IP -t $IPERF_SECS -J\` (then \`-R\`), \`ping -c $PINGS -i $PING_INTERVAL $HOST_IP\`; Mbit/s = bytes received / seconds."
    echo
    table
    echo
} >"$WORK/section.md"

FAILED=$(awk '$11 != "PASS" { print $1 }' "$WORK/summary.txt" | tr '\n' ' ')
if [ -n "$FAILED" ]; then
    # A failed guest has no numbers: keep the documented table, show what happened.
    cat "$WORK/section.md"
    log "guest runs failed for: $FAILED(logs in $WORK); $DOC left unchanged"
    exit 1
fi
if [ "$WRITE_DOC" = 1 ]; then
    write_doc_section "$DOC" bench-net "Network (vhost-user-net)" "$WORK/section.md"
    log "table written to $DOC"
fi
cat "$WORK/section.md"
