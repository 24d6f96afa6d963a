# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# boot: the guest reaches its test runner and its tools run. Lists disks and NICs; handy to time
# the boot and to debug the harness. Checks the network tools the net tests will use.
echo "disks: $(ls /sys/block | tr '\n' ' ')"
echo "nics: $(ls /sys/class/net | tr '\n' ' ')"
fio --version || fail "fio does not run"
iperf3 --version | head -n1 || fail "iperf3 does not run"
ip -V || fail "ip does not run"
ip link set lo up || fail "ip link set lo up"
ping -c 1 -W 2 127.0.0.1 >/dev/null || fail "ping 127.0.0.1"
