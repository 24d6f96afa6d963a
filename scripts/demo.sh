#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The ft-vhost demo: one command on a fresh Debian 12 machine (as root).
#
# 1. installs the host tools (scripts/setup.sh), builds the release binaries and the test guest;
# 2. creates a 1 GiB sparse disk image (.work/demo/disk.img) and starts
#      vhost-user-blk-ft  on it                     (gating: see BLK_FT below)
#      vhost-user-net-ft  on tap ftdemo0 10.99.0.1/24, --ft hold (TX held per epoch)
#      ft-coordinator     over both control sockets, checkpointer qmp: on QEMU's QMP socket
#                         (the VM is stopped for every seal and continued after it), a cut
#                         every 20 ms plus event-driven cuts 5 ms after output appears;
#                         --api for ftctl. FT_DEMO_CHECKPOINTER=sim:2 acknowledges after 2 ms
#                         without stopping the VM; exec:CMD runs CMD per checkpoint
#      iperf3 -s          on 10.99.0.1
# 3. boots the small test guest under QEMU (TCG) with both devices; inside, fio writes 32 MiB
#    with crc32c verification, then ping and iperf3 go to the host through the gated NIC;
# 4. prints a summary (guest results, ftctl status, daemon counters) and shuts everything down.
#
# Usage: scripts/demo.sh   (logs and the summary stay in .work/demo/)
#        scripts/demo.sh --failover   (real checkpoints, kill, takeover; see below)
# Environment: FT_DEMO_DIR (default .work/demo), FT_DEMO_TAP (ftdemo0), FT_DEMO_NET (10.99.0),
#              FT_DEMO_CHECKPOINTER (qmp), FT_DEMO_FIO_SIZE (32M), FT_DEMO_IPERF_SECS (3).
# Rerunnable: a previous run's leftovers (tap, sockets) are cleaned up first.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)

# scripts/demo.sh --failover: the same guest protected by real checkpoints (ft-coordinator
# --checkpointer migrate: into ft-standby's store), arbitrated by etcd (Debian's etcd-server,
# started on the loopback of the demo's network namespace: the coordinator holds the VM's key
# with --etcd, every COMMIT carries the lease's deadline), the primary SIGKILLed, and
# `ftctl takeover --etcd` on the standby side once the killed primary's lease expired; prints
# a summary (checkpoints, VM pause p50/p99, the wait for the etcd key, takeover time, requests
# replayed, TCP stream bytes checked, fio verify). A few minutes under TCG (273 s measured on
# the 2-core test machine with another failover run beside it, 93 s with etcd at load 10, once
# built). It runs in a network
# namespace of its own through the failover test harness (tests/tests/e2e_failover.rs).
if [ "${1:-}" = "--failover" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "demo: run as root (network namespace, tap)" >&2; exit 1; }
    "$ROOT/scripts/setup.sh"
    cd "$ROOT"
    echo "demo: building release binaries" >&2
    cargo build --release -q -p vhost-user-blk-ft -p vhost-user-net-ft -p ft-common
    mkdir -p "$ROOT/.work"
    log=$ROOT/.work/demo-failover.log
    echo "demo: etcd, primary, checkpoints, kill, takeover (log: $log)" >&2
    status=0
    cargo test --release -q -p ft-tests --test e2e_failover demo_failover \
        -- --ignored --nocapture --test-threads=1 >"$log" 2>&1 || status=$?
    sed -n '/^FAILOVER SUMMARY/,/^END SUMMARY/p' "$log" | grep -v '^END SUMMARY'
    [ "$status" -eq 0 ] || { echo "demo: failover FAILED (see $log)" >&2; tail -30 "$log" >&2; }
    exit "$status"
fi
DIR=${FT_DEMO_DIR:-$ROOT/.work/demo}
TAP=${FT_DEMO_TAP:-ftdemo0}
NET=${FT_DEMO_NET:-10.99.0}
HOST_IP=$NET.1
GUEST_IP=$NET.2/24
CHECKPOINTER=${FT_DEMO_CHECKPOINTER:-qmp}
FIO_SIZE=${FT_DEMO_FIO_SIZE:-32M}
IPERF_SECS=${FT_DEMO_IPERF_SECS:-3}
MAC=52:54:00:12:34:56

# Flattens pretty-printed JSON (one member per line, as ftctl prints it) into path=value lines;
# array elements get their index (devices.1.name=blk). No jq on a fresh Debian.
FLAT_JSON='
function path(   i, p) { p = ""; for (i = 1; i <= depth; i++) p = p (p == "" ? "" : ".") stack[i]; return p }
{
    line = $0
    sub(/^[ \t]+/, "", line); sub(/,$/, "", line)
    key = ""
    if (match(line, /^"[^"]*": /)) { key = substr(line, 2, RLENGTH - 4); line = substr(line, RLENGTH + 1) }
    else if (depth > 0 && isarr[depth] && line !~ /^[\]}]/) { key = idx[depth]++ }
    if (line == "{" || line == "[") {
        depth++; stack[depth] = key; isarr[depth] = (line == "["); idx[depth] = 0
        if (depth == 1) stack[1] = ""
        next
    }
    if (line ~ /^[\]}]/) { depth--; next }
    gsub(/"/, "", line)
    p = path(); print (p == "" ? "" : p ".") key "=" line
}
'

say() { echo "demo: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

if [ "$(id -u)" -ne 0 ]; then
    die "run as root: the demo installs packages and creates the tap device $TAP"
fi

say "host setup (scripts/setup.sh)"
"$ROOT/scripts/setup.sh"
say "building release binaries"
(cd "$ROOT" && cargo build --release -q -p vhost-user-blk-ft -p vhost-user-net-ft -p ft-common \
    --bin vhost-user-blk-ft --bin vhost-user-net-ft --bin ft-coordinator --bin ftctl)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
say "building the test guest (cached)"
CACHE=${FT_CACHE:-$HOME/.cache/ft-vhost}
bash "$ROOT/tests/guest/build-guest.sh" "$CACHE/guest" >&2

# Block gating: hold when the daemon supports it, else off (and say so in the summary).
if "$BIN/vhost-user-blk-ft" --help | grep -q -- '- hold'; then
    BLK_FT=hold
else
    BLK_FT=off
fi

mkdir -p "$DIR"
# Started processes, newest first. Cleanup ends QEMU (the frontend) first, then in this order
# the coordinator (its last commit releases what the daemons still
# hold), then the daemons, each one waited for before the next.
PIDS=()
QEMU_PID=
cleanup() {
    local p
    if [ -n "$QEMU_PID" ]; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
        QEMU_PID=
    fi
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
    ip link del "$TAP" 2>/dev/null || true
}
trap cleanup EXIT
# A previous run killed hard may have left the tap behind.
ip link del "$TAP" 2>/dev/null || true
rm -f "$DIR"/*.sock "$DIR"/*.json "$DIR"/*.txt "$DIR"/*.ctl "$DIR"/*.log "$DIR"/summary.txt

wait_for() { # PATH SECONDS
    local n=0
    until [ -e "$1" ]; do
        n=$((n + 1))
        [ "$n" -le $(($2 * 50)) ] || die "$1 did not appear (see $DIR/*.log)"
        sleep 0.02
    done
}

IMG=$DIR/disk.img
if [ ! -f "$IMG" ]; then
    truncate -s 1G "$IMG"
    say "created $IMG (1 GiB, sparse)"
fi

blk_args=(--socket "$DIR/blk.sock" --image "$IMG" --ft "$BLK_FT")
[ "$BLK_FT" = off ] || blk_args+=(--control "$DIR/blk.ctl" --state-dir "$DIR/blk-state")
"$BIN/vhost-user-blk-ft" "${blk_args[@]}" >"$DIR/blk.log" 2>&1 &
PIDS=("$!" "${PIDS[@]}")
"$BIN/vhost-user-net-ft" --socket "$DIR/net.sock" --tap "$TAP" --ip "$HOST_IP/24" --mac "$MAC" \
    --ft hold --control "$DIR/net.ctl" --state-dir "$DIR/net-state" >"$DIR/net.log" 2>&1 &
PIDS=("$!" "${PIDS[@]}")
wait_for "$DIR/blk.sock" 10
wait_for "$DIR/net.sock" 10
wait_for "$DIR/net.ctl" 10

iperf3 -s -B "$HOST_IP" >"$DIR/iperf3-server.log" 2>&1 &
PIDS=("$!" "${PIDS[@]}")

say "booting the guest (QEMU TCG, 1 vCPU): fio $FIO_SIZE write+verify, ping, iperf3 ${IPERF_SECS}s"
qemu=(qemu-system-x86_64 -accel tcg -cpu max -nodefaults -display none -serial stdio -no-reboot
    -smp 1 -m 512M -object memory-backend-memfd,id=mem,size=512M,share=on
    -machine q35,memory-backend=mem
    -chardev "socket,id=blk0,path=$DIR/blk.sock" -device vhost-user-blk-pci,chardev=blk0,num-queues=1
    -chardev "socket,id=net0,path=$DIR/net.sock" -netdev vhost-user,id=net0,chardev=net0
    -device "virtio-net-pci,netdev=net0,vectors=0,mac=$MAC"
    -qmp "unix:$DIR/qmp.sock,server=on,wait=off"
    -kernel "$CACHE/guest/vmlinux" -initrd "$CACHE/guest/initrd.img"
    -append "console=ttyS0 panic=-1 loglevel=4 ft.test=demo ft.size=$FIO_SIZE ft.ip=$GUEST_IP ft.peer=$HOST_IP ft.iperf_secs=$IPERF_SECS")
start=$SECONDS
timeout 600 "${qemu[@]}" </dev/null >"$DIR/serial.log" 2>"$DIR/qemu.err" &
QEMU_PID=$!
# The coordinator comes after QEMU: a qmp: checkpointer needs QEMU's QMP socket. Until it is
# connected the daemons hold whatever the guest writes or sends (the guest just waits).
case "$CHECKPOINTER" in
    qmp) CHECKPOINTER=qmp:$DIR/qmp.sock ;;
esac
wait_for "$DIR/qmp.sock" 10
devices=(--device "net=$DIR/net.ctl")
[ "$BLK_FT" = off ] || devices+=(--device "blk=$DIR/blk.ctl")
unsafe_ok=()
case "$CHECKPOINTER" in sim*) unsafe_ok=(--unsafe-no-checkpoint) ;; esac
"$BIN/ft-coordinator" "${devices[@]}" --checkpointer "$CHECKPOINTER" "${unsafe_ok[@]}" --interval-ms 20 \
    --min-interval-ms 5 --state-file "$DIR/coordinator.state" --api "$DIR/api.sock" \
    >"$DIR/coordinator.log" 2>&1 &
PIDS=("$!" "${PIDS[@]}")
wait_for "$DIR/api.sock" 10
wait "$QEMU_PID" || true
QEMU_PID=
elapsed=$((SECONDS - start))
"$BIN/ftctl" --api "$DIR/api.sock" status >"$DIR/ftctl-status.json" 2>&1 || true
"$BIN/ftctl" --api "$DIR/api.sock" metrics >"$DIR/metrics.txt" 2>&1 || true

result=$(tr -d '\r' <"$DIR/serial.log" | grep -a -o 'FT-RESULT: .*' | head -n1 || true)

# Stop the coordinator and daemons now so their final counters are in the logs.
cleanup

{
    echo "================ ft-vhost demo summary ================"
    echo "guest:        ${result:-no result (see $DIR/serial.log)} after ${elapsed} s (QEMU TCG, 1 vCPU)"
    echo "block gating: --ft $BLK_FT$([ "$BLK_FT" = off ] && echo ' (this build of vhost-user-blk-ft has no hold mode yet: disk writes are not gated)')"
    echo "net gating:   --ft hold (guest TX held until its epoch's checkpoint is acknowledged)"
    echo "checkpointer: $CHECKPOINTER, periodic cut 20 ms, event-driven cut >= 5 ms after output"
    echo "--- guest results"
    tr -d '\r' <"$DIR/serial.log" | grep -a -o 'FT-DEMO: .*' | sed 's/^FT-DEMO: /  /' || true
    echo "--- coordinator (ftctl status; full JSON in $DIR/ftctl-status.json)"
    awk "$FLAT_JSON" "$DIR/ftctl-status.json" | awk -F= '
        { v[$1] = $2 }
        function us(key) { return sprintf("p50 %.2f ms, p99 %.2f ms", v[key ".p50_us"] / 1000, v[key ".p99_us"] / 1000) }
        END {
            printf "  generation %s: epochs sealed %s, committed %s, dropped %s\n", v["cycle.generation"],
                v["cycle.epochs_sealed"], v["cycle.epochs_committed"], v["cycle.epochs_dropped"]
            printf "  seal %s; checkpoint %s\n", us("latency.seal"), us("latency.checkpoint")
            printf "  commit %s; seal to commit %s\n", us("latency.commit"), us("latency.seal_to_commit")
            for (i = 0; ("devices." i ".name") in v; i++) {
                d = "devices." i
                sync = v[d ".name"] == "blk" ? sprintf(", fdatasyncs %s (%s)", v[d ".fdatasync.count"], us(d ".fdatasync")) : ""
                printf "  device %-4s commits %s (failed %s)%s, still held: %s requests, %s bytes\n",
                    v[d ".name"], v[d ".commits_ok"], v[d ".commits_failed"], sync, v[d ".held_requests"], v[d ".held_bytes"]
            }
        }'
    grep -E '^ft_device_committed_bytes_total' "$DIR/metrics.txt" |
        sed -E 's/^ft_device_committed_bytes_total\{device="([^"]*)"\} /  device \1 released after commit: /; s/$/ bytes/' || true
    echo "--- daemon counters (at shutdown)"
    grep -h -a -E 'vhost_user_(net|blk)_ft\] stopped' "$DIR/net.log" "$DIR/blk.log" |
        sed -E 's/^.*(vhost_user_[a-z]+_ft)\] /  \1: /; s/_/-/g' || true
    echo "--- logs: $DIR/{serial,blk,net,coordinator,qemu}.log"
} | tee "$DIR/summary.txt"
case "$result" in
    "FT-RESULT: PASS") exit 0 ;;
    *) exit 1 ;;
esac
