# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# net-iperf: bring up the first virtio NIC, ping the host side, run iperf3 against the host's
# server in both directions, and print the numbers on the console for the host to parse.
#
# Parameters (kernel command line ft.KEY=VALUE, all optional):
#   ft.ip=10.77.0.2/24    guest address          ft.peer=10.77.0.1   host (tap) address
#   ft.pings=5            measured pings         ft.ping_interval=0.2 seconds between pings
#   ft.iperf_secs=3       seconds per iperf3 run (0: skip iperf3)
#
# Output lines (one fact each, "FT-NET: " then space-separated key=value):
#   FT-NET: rtt_ms=0.512                    one per ping reply
#   FT-NET: ping sent=N received=M
#   FT-NET: iperf dir=tx|rx sent_bytes=N received_bytes=M seconds=S
#        (tx: guest sends, host receives; rx: iperf3 -R, host sends, guest receives)
#   FT-NET: eth0 tx_packets=N rx_packets=M  guest NIC counters at the end
IP=${FT_IP:-10.77.0.2/24}
PEER=${FT_PEER:-10.77.0.1}
PINGS=${FT_PINGS:-5}
INTERVAL=${FT_PING_INTERVAL:-0.2}
SECS=${FT_IPERF_SECS:-3}

net() { echo "FT-NET: $*"; }

# Virtio probing is asynchronous: nic_up waits for the NIC to show up.
nic_up "$IP" "no network interface after 20 s"
echo "nic: $nic"
stage net-up

# First contact is not part of the measurement.
wait_peer "$PEER" 20
stage ping-start
ping -c "$PINGS" -i "$INTERVAL" -W 5 "$PEER" >/tmp/ping.out 2>&1
sed -n 's/.*time=\([0-9.]*\) ms.*/FT-NET: rtt_ms=\1/p' /tmp/ping.out
received=$(grep -c 'time=' /tmp/ping.out)
net "ping sent=$PINGS received=$received"
[ "$received" -gt 0 ] || { cat /tmp/ping.out; fail "no ping reply from $PEER"; }
stage ping-done

# iperf3 -J: the client's JSON carries both ends' totals (sum_sent, sum_received).
iperf_run() { # DIR EXTRA-ARGS...
    dir=$1
    shift
    n=0
    # The server may still be finishing the previous test: retry a refused connection.
    until iperf3 -c "$PEER" -t "$SECS" -J "$@" >/tmp/iperf.json 2>&1; do
        n=$((n + 1))
        [ "$n" -le 5 ] || { tail -n 20 /tmp/iperf.json; fail "iperf3 $dir failed"; }
        sleep 1
    done
    awk -v dir="$dir" '
        /"sum_sent"/ { sec = "sent" }
        /"sum_received"/ { sec = "received" }
        sec != "" && /"bytes":/ { gsub(/[^0-9]/, "", $2); bytes[sec] = $2 }
        sec != "" && /"seconds":/ { gsub(/[^0-9.]/, "", $2); secs[sec] = $2 }
        sec != "" && /}/ { sec = "" }
        END {
            printf "FT-NET: iperf dir=%s sent_bytes=%s received_bytes=%s seconds=%s\n",
                dir, bytes["sent"] + 0, bytes["received"] + 0, secs["received"] + 0
        }' /tmp/iperf.json
}
if [ "$SECS" -gt 0 ]; then
    stage iperf-tx-start
    iperf_run tx
    stage iperf-rx-start
    iperf_run rx -R
    stage iperf-done
fi

net "eth0 tx_packets=$(cat /sys/class/net/$nic/statistics/tx_packets)" \
    "rx_packets=$(cat /sys/class/net/$nic/statistics/rx_packets)"
