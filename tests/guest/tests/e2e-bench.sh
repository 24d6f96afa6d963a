# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# e2e-bench: the guest side of scripts/bench-guest.sh. Short fio jobs on the first virtio disk
# and an iperf3 run to the host through the first NIC; one "FT-BENCH: " line per result.
#
# Parameters: ft.runtime=3 (seconds per fio job), ft.size=256M (fio area), ft.iperf_secs=3,
# ft.ip=10.97.0.2/24, ft.peer=10.97.0.1, ft.jobs=all (or a comma list of the job names below).
# The disk is switched to write back so that fsync reaches the backend for every config
# (qemu-storage-daemon 7.2 advertises write-through, and the guest would skip its flushes).
RUNTIME=${FT_RUNTIME:-3}
SIZE=${FT_SIZE:-256M}
SECS=${FT_IPERF_SECS:-3}
IP=${FT_IP:-10.97.0.2/24}
PEER=${FT_PEER:-10.97.0.1}
JOBS=${FT_JOBS:-all}

bench() { echo "FT-BENCH: $*"; }

find_disk
echo "write back" >"/sys/block/$disk/cache_type" 2>/dev/null
echo "disk cache: $(cat /sys/block/$disk/cache_type 2>/dev/null)"

# Reads need data: fill the area once (not measured).
stage prefill
fio --name=fill --filename="/dev/$disk" --rw=write --bs=1M --size="$SIZE" --ioengine=libaio \
    --iodepth=4 --direct=1 --eta=never >/dev/null 2>&1 || fail "prefill failed"

# run NAME FIO-ARGS...: one time-based job; terse output fields 7/8/40 (read bw KiB/s, IOPS,
# mean latency us) and 48/49/81 (write).
run() {
    name=$1
    shift
    case ",$JOBS," in *",all,"* | *",$name,"*) ;; *) return 0 ;; esac
    stage "fio-$name"
    out=$(fio --name="$name" --filename="/dev/$disk" --size="$SIZE" --ioengine=libaio --direct=1 \
        --time_based --runtime="$RUNTIME" --ramp_time=1 --minimal "$@" 2>/tmp/fio.err) ||
        { cat /tmp/fio.err; fail "fio $name failed"; }
    echo "$out" | awk -F';' -v name="$name" '{
        iops = $8 + $49
        lat = iops > 0 ? ($8 * $40 + $49 * $81) / iops : 0
        printf "FT-BENCH: fio job=%s iops=%.0f bw_kib=%.0f lat_us=%.0f\n", name, iops, $7 + $48, lat }'
}
run randread-4k-qd1 --rw=randread --bs=4k --iodepth=1
run randread-4k-qd32 --rw=randread --bs=4k --iodepth=32
run randwrite-4k-qd1 --rw=randwrite --bs=4k --iodepth=1
run randwrite-4k-qd32 --rw=randwrite --bs=4k --iodepth=32
run seqread-128k --rw=read --bs=128k --iodepth=8
run seqwrite-128k --rw=write --bs=128k --iodepth=8
run fsync-4k --rw=randwrite --bs=4k --iodepth=1 --fsync=1

if [ "$SECS" -gt 0 ]; then
    nic_up "$IP"
    wait_peer "$PEER" 30
    stage iperf
    n=0
    until iperf3 -c "$PEER" -t "$SECS" -J >/tmp/iperf.json 2>&1; do
        n=$((n + 1))
        [ "$n" -le 5 ] || { tail -n 20 /tmp/iperf.json; fail "iperf3 failed"; }
        sleep 1
    done
    awk '/"sum_received"/ { s = 1 } s && /"bits_per_second":/ { gsub(/[^0-9.e+]/, "", $2); printf "FT-BENCH: iperf3 mbit=%.1f\n", $2 / 1e6; exit }' /tmp/iperf.json
    ping -c 10 -i 0.1 "$PEER" >/tmp/ping.out 2>&1
    sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|FT-BENCH: ping avg_ms=\1|p' /tmp/ping.out
fi
stage bench-done
