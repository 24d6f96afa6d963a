# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# demo: what scripts/demo.sh shows inside the guest. fio with crc32c verify on the first virtio
# disk, then ping and iperf3 (guest -> host) through the first NIC. Every result the host's
# summary shows is one "FT-DEMO: " line.
#
# Parameters (kernel command line, all optional): ft.size=32M (fio area), ft.ip=10.99.0.2/24,
# ft.peer=10.99.0.1, ft.pings=5, ft.iperf_secs=3 (0: no iperf3).
SIZE=${FT_SIZE:-32M}
IP=${FT_IP:-10.99.0.2/24}
PEER=${FT_PEER:-10.99.0.1}
PINGS=${FT_PINGS:-5}
SECS=${FT_IPERF_SECS:-3}

demo() { echo "FT-DEMO: $*"; }

find_disk
demo "disk /dev/$disk $(($(cat /sys/block/$disk/size) / 2048)) MiB, write cache: $(cat /sys/block/$disk/queue/write_cache)"

# Same job for both passes: the verify-only pass regenerates offsets and data (randrepeat).
job() {
    fio --name=demo --filename="/dev/$disk" --rw=randwrite --bs=4k --size="$SIZE" \
        --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 \
        --randrepeat=1 --fsync=64 --eta=never "$@" >/tmp/fio.out 2>&1
    status=$?
    grep -E '^ +(READ|WRITE):' /tmp/fio.out | sed 's/^ */FT-DEMO: fio /'
    return $status
}
stage fio-write-start
job --do_verify=1 || { tail -n 20 /tmp/fio.out; fail "fio write+verify failed"; }
stage fio-verify-start
job --verify_only || { tail -n 20 /tmp/fio.out; fail "fio verify-only pass failed"; }
demo "fio verify: every block written ($SIZE) read back with a matching crc32c"
stage fio-done

nic_up "$IP"
wait_peer "$PEER" 20
stage ping-start
ping -c "$PINGS" -i 0.2 "$PEER" >/tmp/ping.out 2>&1 || { cat /tmp/ping.out; fail "ping $PEER"; }
demo "ping $(grep -E 'transmitted|round-trip|rtt' /tmp/ping.out | tr '\n' ' ')"
if [ "$SECS" -gt 0 ]; then
    stage iperf-start
    n=0
    until iperf3 -c "$PEER" -t "$SECS" >/tmp/iperf.out 2>&1; do
        n=$((n + 1))
        [ "$n" -le 5 ] || { tail -n 20 /tmp/iperf.out; fail "iperf3 to $PEER failed"; }
        sleep 1
    done
    grep -E 'sender|receiver' /tmp/iperf.out | sed 's/^\[ *[0-9]*\] */FT-DEMO: iperf3 guest->host /'
fi
stage demo-done
