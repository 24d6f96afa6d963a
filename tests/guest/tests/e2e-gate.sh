# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# e2e-gate: a busy guest for the host's output-commit checks (tests/tests/e2e_gating.rs).
# Brings up the NIC and pings the host every 0.2 s in the background (gated TX), then writes
# the disk with fio (crc32c verify, an fsync every 16 writes: flushes wait for commit too) and
# verifies everything again in a separate read-only pass. The host pauses acknowledgements or
# kills the coordinator during the write pass and checks that nothing leaves meanwhile.
#
# Parameters: ft.size=32M ft.bs=64k ft.ip=10.98.0.2/24 ft.peer=10.98.0.1
#             ft.rate=4m (optional fio --rate for the write pass: keeps an ungated run busy long
#             enough for the host's checks)
SIZE=${FT_SIZE:-32M}
BS=${FT_BS:-64k}
IP=${FT_IP:-10.98.0.2/24}
PEER=${FT_PEER:-10.98.0.1}
RATE=${FT_RATE:+--rate=$FT_RATE}

find_disk

nic_up "$IP"
wait_peer "$PEER" 30
stage net-up
ping -i 0.2 "$PEER" >/tmp/ping.out 2>&1 &
pinger=$!

job() {
    fio --name=e2e --filename="/dev/$disk" --rw=randwrite --bs="$BS" --size="$SIZE" \
        --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 \
        --randrepeat=1 --fsync=16 --group_reporting --eta=never "$@"
}
stage busy
job --do_verify=1 $RATE || fail "fio write+verify pass failed"
stage write-done
job --verify_only || fail "fio verify-only pass failed"
stage verify-done
kill "$pinger"
echo "pings: $(grep -c 'time=' /tmp/ping.out) replies"
