#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# VM-less packet-rate benchmark of vhost-user-net-ft with DPDK testpmd as the frontend (a
# third-party virtio driver: its virtio-user PMD speaks vhost-user to our socket), 64 B frames:
#   tx  guest -> tap: testpmd `txonly` on the virtio-user port; rate = frames the tap received
#       (the tap's rx_packets: what reached the host's network stack)
#   rx  tap -> guest: a second testpmd sends 64 B frames into the tap through an AF_PACKET
#       socket (`net_af_packet`, txonly) to the virtio-user testpmd (`rxonly`); rate = the
#       tap's tx_packets (frames the daemon took from the tap; it drops none, its exit log
#       says so), offered = tx_packets + tx_dropped (the generator's rate into the tap)
# for each configuration: off (`--ft off`) and hold-N (`--ft hold`, ft-ack sealing+committing
# every N ms). Rounds interleave the configurations; cells are the median over rounds (min-max).
# Writes its table into docs/benchmarks.md between the "BEGIN bench-net-pps" markers.
#
# Usage: scripts/bench-net-pps.sh [--secs 5] [--warmup 2] [--rounds 3] [--configs "off hold-5"]
#                                 [--no-doc]     (also: scripts/bench-net.sh --pps ...)
# BASE_BIN=/path/to/older/vhost-user-net-ft adds the configurations base-off and base-hold-N (that
# binary, same settings) to --configs, e.g. --configs "off base-off hold-5 base-hold-5".
# CH_NET_BIN=/path/to/vhost_user_net adds the configuration ch: cloud-hypervisor's daemon
# (`--net-backend socket=SOCK,num_queues=2,queue_size=1024,tap=TAP`: one queue pair, the ring
# size testpmd asks for) on the same tap with the same testpmd commands, e.g.
# --configs "off ch hold-5"; the table then gets "x ch" columns. CH's daemon serves one frontend
# connection and exits, so it is started once per direction (ours once per configuration).
# CH_DESC="cloud-hypervisor vX (commit)" goes into the doc next to it (its --version says 0.1.0).
# The tap is created once, persistent and without an IP address, before the first configuration;
# every daemon attaches to it (CH's leaves an existing tap's address alone).
# Needs root and dpdk-testpmd (Debian package dpdk-dev; installed on demand). testpmd runs
# without hugepages (`--no-huge -m 512`). Each testpmd busy-polls one CPU: on a 2-CPU machine
# the generator, the receiver and the daemon share two CPUs, so the rx rate is bounded by the
# generator as much as by the daemon (its own rate is printed next to it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib/doc-section.sh
source "$ROOT/scripts/lib/doc-section.sh"
DOC="$ROOT/docs/benchmarks.md"
SECS=5
WARMUP=2
ROUNDS=3
CONFIGS="off hold-5"
WRITE_DOC=1
WORK=${FT_BENCH_DIR:-/tmp/ft-bench-net-pps}
MAC=52:54:00:12:34:58
CMDLINE="scripts/bench-net-pps.sh $*"

while [ $# -gt 0 ]; do
    case "$1" in
        --secs) SECS=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --configs) CONFIGS=$2; shift 2 ;;
        --no-doc) WRITE_DOC=0; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { echo "bench-net-pps: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "needs root (taps, network namespaces)"; exit 1; }
if [[ " $CONFIGS " == *" ch "* ]]; then
    [ -x "${CH_NET_BIN:-}" ] || { log "configuration ch needs CH_NET_BIN=/path/to/vhost_user_net"; exit 2; }
fi
if ! command -v dpdk-testpmd >/dev/null; then
    log "installing dpdk-dev (dpdk-testpmd)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends dpdk-dev >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends dpdk-dev >/dev/null; }
fi

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p vhost-user-net-ft -p ft-tests --bin vhost-user-net-ft --bin ft-ack)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
DAEMON=$TARGET/vhost-user-net-ft
ACK=$TARGET/ft-ack

rm -rf "$WORK"
mkdir -p "$WORK"
NS=ftpps$$
TAP=ftpps0
ip netns add "$NS"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    ip netns exec "$NS" ip link del "$TAP" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    # testpmd leaves its runtime directory (about 6 MiB, on tmpfs) behind.
    rm -rf /var/run/dpdk/ftpps-{tx,rx,gen}$$
}
trap cleanup EXIT
NSX=(ip netns exec "$NS")
"${NSX[@]}" ip link set lo up
# One persistent tap for all configurations, so that ours and CH's daemon attach to the same
# kind of device (CH's would otherwise create its own and give it an address) and CH's can be
# restarted between directions without the tap going away.
"${NSX[@]}" ip tuntap add dev "$TAP" mode tap
"${NSX[@]}" ip link set "$TAP" up
LAST=$(($(nproc) - 1))
# Common testpmd flags: no hugepages, no PCI scan, a small mbuf pool (the default one does not
# fit in 512 MiB), one forwarding core.
PMD=(--no-huge -m 512 --no-pci)
PMD_APP=(--nb-cores=1 --stats-period 1 --auto-start --txd=1024 --rxd=1024 --total-num-mbufs=16384
    --no-lsc-interrupt)

stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# wait_fwd LOG: waits (up to 60 s) until the testpmd writing LOG has started forwarding. On a busy
# host its start-up (512 MiB without hugepages, the mbuf pool) can take longer than the warm-up;
# without this wait a slow generator left whole windows at 0 pps.
wait_fwd() {
    for _ in $(seq 1 600); do grep -q "packet forwarding - ports=" "$1" 2>/dev/null && return; sleep 0.1; done
    log "testpmd did not start forwarding within 60 s (see $1)"
}
tap_stat() { "${NSX[@]}" cat "/sys/class/net/$TAP/statistics/$1"; }

# start_daemon DIR BIN ARGS...: starts a daemon in the namespace (log appended to DIR/daemon.log),
# sets DPID and waits for its socket DIR/net.sock.
start_daemon() {
    local dir=$1
    shift
    rm -f "$dir/net.sock"
    RUST_LOG=info "${NSX[@]}" "$@" >>"$dir/daemon.log" 2>&1 &
    DPID=$!
    PIDS+=("$DPID")
    for _ in $(seq 1 250); do [ -S "$dir/net.sock" ] && break; sleep 0.02; done
    [ -S "$dir/net.sock" ] || log "no socket from $1 after 5 s (see $dir/daemon.log)"
    "${NSX[@]}" ip link set "$TAP" up
}

# run_one CONFIG ROUND: starts the daemon (and ft-ack), runs tx then rx; appends
# "config round tx_pps rx_pps gen_pps" to $WORK/results.
run_one() {
    local cfg=$1 round=$2 dir="$WORK/$1/r$2" apid="" tpid gpid t0 t1 r0 r1 d0 d1
    mkdir -p "$dir"
    local cmd=("$DAEMON" --socket "$dir/net.sock" --tap "$TAP" --mac "$MAC") mode=$cfg
    if [ "${cfg#base-}" != "$cfg" ]; then
        cmd[0]=${BASE_BIN:?base-* configurations need BASE_BIN}
        mode=${cfg#base-}
    elif [ "$cfg" = ch ]; then
        # One queue pair (num_queues counts rx and tx queues), rings as large as testpmd's
        # queue_size=1024 (CH refuses larger rings than queue_size, default 256).
        cmd=("$CH_NET_BIN" --net-backend "socket=$dir/net.sock,num_queues=2,queue_size=1024,tap=$TAP")
        mode=off
    fi
    [ "$mode" = off ] || cmd+=(--ft hold --control "$dir/net.ctl")
    start_daemon "$dir" "${cmd[@]}"
    if [ "$mode" != off ]; then
        "$ACK" --control "$dir/net.ctl" --interval-ms "${mode#hold-}" >"$dir/ack.log" 2>&1 &
        apid=$!
        PIDS+=("$apid")
    fi
    local vdev="net_virtio_user0,path=$dir/net.sock,queues=1,queue_size=1024"

    # guest -> tap
    dpdk-testpmd "${PMD[@]}" --file-prefix "ftpps-tx$$" --lcores "0@0,1@$LAST" --vdev "$vdev" \
        -- --forward-mode=txonly --txpkts=64 "${PMD_APP[@]}" >"$dir/tx.log" 2>&1 &
    tpid=$!
    PIDS+=("$tpid")
    wait_fwd "$dir/tx.log"
    sleep "$WARMUP"
    r0=$(tap_stat rx_packets); t0=$(date +%s%N)
    sleep "$SECS"
    r1=$(tap_stat rx_packets); t1=$(date +%s%N)
    kill -INT "$tpid" 2>/dev/null || true
    wait "$tpid" 2>/dev/null || true
    local tx=$(( (r1 - r0) * 1000000000 / (t1 - t0) ))
    if [ "$cfg" = ch ]; then
        # CH's daemon exits when its frontend disconnects: a fresh one for the next direction.
        stop_pid "$DPID"
        start_daemon "$dir" "${cmd[@]}"
    fi

    # tap -> guest: the receiver first, then the generator on the tap (inside the namespace).
    dpdk-testpmd "${PMD[@]}" --file-prefix "ftpps-rx$$" --lcores "0@$LAST,1@$LAST" --vdev "$vdev" \
        -- --forward-mode=rxonly "${PMD_APP[@]}" >"$dir/rx.log" 2>&1 &
    tpid=$!
    PIDS+=("$tpid")
    wait_fwd "$dir/rx.log"
    "${NSX[@]}" dpdk-testpmd "${PMD[@]}" --file-prefix "ftpps-gen$$" --lcores "0@0,1@0" \
        --vdev "net_af_packet0,iface=$TAP,qpairs=1,qdisc_bypass=1,blocksz=4096,framesz=2048,framecnt=512" \
        -- --forward-mode=txonly --txpkts=64 --eth-peer="0,$MAC" "${PMD_APP[@]}" >"$dir/gen.log" 2>&1 &
    gpid=$!
    PIDS+=("$gpid")
    wait_fwd "$dir/gen.log"
    sleep "$WARMUP"
    r0=$(tap_stat tx_packets); d0=$(tap_stat tx_dropped); t0=$(date +%s%N)
    sleep "$SECS"
    r1=$(tap_stat tx_packets); d1=$(tap_stat tx_dropped); t1=$(date +%s%N)
    kill -INT "$gpid" 2>/dev/null || true
    wait "$gpid" 2>/dev/null || true
    kill -INT "$tpid" 2>/dev/null || true
    wait "$tpid" 2>/dev/null || true
    local rx=$(( (r1 - r0) * 1000000000 / (t1 - t0) ))
    local gen=$(( (r1 - r0 + d1 - d0) * 1000000000 / (t1 - t0) ))

    [ -z "$apid" ] || stop_pid "$apid"
    stop_pid "$DPID"
    log "$cfg round $round: tx $tx pps, rx $rx pps (generator $gen pps)"
    echo "$cfg $round $tx $rx $gen" >>"$WORK/results"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$WORK/results"
for round in $(seq 1 "$ROUNDS"); do
    for c in $CONFIGS; do run_one "$c" "$round"; done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=""
if git -C "$ROOT" status --porcelain 2>/dev/null | grep -q .; then DIRTY=" (+ local changes)"; fi
{
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') at commit \`$COMMIT\`$DIRTY: \`$CMDLINE\`."
    echo
    [ -z "${BASE_BIN:-}" ] || echo "- base-*: \`$BASE_BIN\` (built $(date -u -r "$BASE_BIN" '+%Y-%m-%d %H:%M UTC'))${BASE_DESC:+; $BASE_DESC}."
    [[ " $CONFIGS " != *" ch "* ]] || echo "- ch: cloud-hypervisor's \`$CH_NET_BIN\` ($("$CH_NET_BIN" --version 2>/dev/null || true), built $(date -u -r "$CH_NET_BIN" '+%Y-%m-%d %H:%M UTC')${CH_DESC:+; $CH_DESC}), \`--net-backend socket=SOCK,num_queues=2,queue_size=1024,tap=TAP\`, started afresh for each direction (it exits when its frontend disconnects); same tap, same testpmd commands. \`x ch\`: ratio to the ch row of the same run."
    echo "- Machine: $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) CPUs, kernel $(uname -r); load average before/after: $LOAD_BEFORE / $LOAD_AFTER."
    echo "- $(dpdk-testpmd --version 2>/dev/null | head -n1 || true)DPDK $(dpkg-query -W -f '${Version}' dpdk-dev 2>/dev/null) testpmd, \`--no-huge -m 512\`, virtio-user port (\`--vdev net_virtio_user0,path=SOCK,queue_size=1024\`), 64 B frames; $SECS s measured after $WARMUP s per direction; $ROUNDS rounds, configurations interleaved."
    echo "- One persistent tap (\`ip tuntap add mode tap\`, no IP address) for all configurations; each daemon attaches to it."
    echo "- guest -> tap: testpmd \`txonly\`; rate = the tap's rx_packets. tap -> guest: a second testpmd (\`net_af_packet\` on the tap, \`qdisc_bypass=1\`, \`txonly\`) sends to the virtio-user testpmd (\`rxonly\`); rate = the tap's tx_packets (taken by the daemon), offered = tx_packets + tx_dropped. Where rate and offered are close, the generator was the limit, not the daemon."
    echo
    python3 - "$WORK/results" <<'PYEOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    cfg, _, tx, rx, gen = line.split()
    rows.setdefault(cfg, []).append((int(tx), float(rx), float(gen)))
med = lambda cfg, i: statistics.median(r[i] for r in rows[cfg])
ratio = lambda a, b: f"{a / b:.2f}" if b else "-"
# "x off" and, with a ch row, "x ch" (ours / cloud-hypervisor's, same run) per direction.
refs = [r for r in ("off", "ch") if r in rows]
head = lambda d: f"{d} Mpps (min-max) | " + "".join(f"x {r} | " for r in refs)
print("| config | " + head("guest -> tap") + head("tap -> guest") + "offered Mpps |")
print("|---|" + "---:|" * (2 * (1 + len(refs)) + 1))
for cfg, rs in rows.items():
    cells = []
    for i in (0, 1):
        v = [r[i] for r in rs]
        cells.append(f"{med(cfg, i) / 1e6:.3f} ({min(v) / 1e6:.3f}-{max(v) / 1e6:.3f})")
        cells += [ratio(med(cfg, i), med(r, i)) for r in refs]
    print(f"| {cfg} | " + " | ".join(cells) + f" | {med(cfg, 2) / 1e6:.3f} |")
PYEOF
    echo
} >"$WORK/section.md"
if [ "$WRITE_DOC" = 1 ]; then
    write_doc_section "$DOC" bench-net-pps "Network packet rate (VM-less, DPDK testpmd)" "$WORK/section.md"
    log "table written to $DOC"
fi
cat "$WORK/section.md"
