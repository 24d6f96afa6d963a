# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# failover: the guest side of the takeover tests (tests/tests/e2e_failover.rs,
# scripts/failover-soak.sh, scripts/demo.sh --failover). The host kills the primary at chosen
# moments and restores this guest from a checkpoint on a standby, possibly several times; the
# guest must not notice.
#
# - A TCP echo server (busybox nc, one `cat` per connection) on ft.echo_port: the host streams
#   numbered bytes through it and checks every byte comes back once, in order, without reset.
# - fio rounds on the disk until the host connects to ft.stop_port (at most ft.rounds rounds;
#   then the echo server serves on until the host connects there):
#   mixed random reads and writes at QD ft.iodepth (>= 16) with crc32c verify of every block the
#   round wrote; each round has its own seed, so a stale block from an earlier round (a write lost
#   in a takeover) fails the header check.
# - At the end, any I/O or virtio error in the kernel log is a failure.
#
# Parameters: ft.ip=10.97.0.2/24 ft.peer=10.97.0.1 ft.size=4M ft.bs=16k ft.iodepth=16
#             ft.rwmix=50 ft.rounds=1000 ft.echo_port=7000 ft.stop_port=7001
IP=${FT_IP:-10.97.0.2/24}
PEER=${FT_PEER:-10.97.0.1}
SIZE=${FT_SIZE:-4M}
BS=${FT_BS:-16k}
IODEPTH=${FT_IODEPTH:-16}
RWMIX=${FT_RWMIX:-50}
ROUNDS=${FT_ROUNDS:-1000}
ECHO_PORT=${FT_ECHO_PORT:-7000}
STOP_PORT=${FT_STOP_PORT:-7001}

find_disk
nic_up "$IP"
wait_peer "$PEER" 30
nc -ll -p "$ECHO_PORT" -e cat &
echo_pid=$!
nc -l -p "$STOP_PORT" >/tmp/stop &
stage echo-up

round=0
while [ ! -s /tmp/stop ] && [ "$round" -lt "$ROUNDS" ]; do
    round=$((round + 1))
    fio --name=failover --filename="/dev/$disk" --rw=randrw --rwmixread="$RWMIX" --bs="$BS" \
        --size="$SIZE" --ioengine=libaio --iodepth="$IODEPTH" --direct=1 --verify=crc32c \
        --verify_fatal=1 --do_verify=1 --randseed="$round" --fsync=32 --group_reporting \
        --eta=never --output=/tmp/fio.out || {
        cat /tmp/fio.out
        fail "fio round $round failed"
    }
    grep -q 'err= 0' /tmp/fio.out || { cat /tmp/fio.out; fail "fio round $round reported an error"; }
    echo "FT-FIO: round=$round ok"
    stage "round-$round"
done
echo "FT-FIO: rounds=$round verified"
stage fio-done
# The echo server serves until the host says stop.
while [ ! -s /tmp/stop ]; do
    usleep 200000
done
kill "$echo_pid" 2>/dev/null
if dmesg | grep -iE 'I/O error|virtio.*(error|not a head)|blk_update_request|Buffer I/O' >/tmp/errs; then
    cat /tmp/errs
    fail "the kernel logged I/O or virtio errors"
fi
stage failover-done
