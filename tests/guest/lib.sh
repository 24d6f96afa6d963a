# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Shell helpers sourced by the guest's test scripts (busybox sh).

# Debian's static busybox runs its own applets before searching PATH, so `ip` would be the
# busybox applet: route it to iproute2's (shipped in the initramfs) explicitly.
ip() { /usr/sbin/ip "$@"; }

stage() { echo "FT-STAGE: $*"; }

# fail REASON: end the test; init reports REASON in its FT-RESULT: FAIL line.
fail() {
    echo "$*"
    echo "$*" >/run/ft-reason
    exit 1
}

# wait_block_dev NAME [SECONDS]: wait for /dev/NAME to appear (virtio probing is asynchronous).
wait_block_dev() {
    n=0
    while [ ! -b "/dev/$1" ]; do
        n=$((n + 1))
        [ "$n" -le "$((${2:-20} * 10))" ] || return 1
        usleep 100000
    done
}

# first_virtio_disk: name of the first virtio-blk disk (vda, vdb, ...), empty if none yet.
first_virtio_disk() {
    for d in /sys/block/vd*; do
        [ -e "$d" ] && { basename "$d"; return 0; }
    done
    return 1
}

# find_disk [NAME]: wait up to 20 s for the first virtio disk (or use NAME if given), then for
# its /dev node; sets $disk.
find_disk() {
    disk=$1
    if [ -z "$disk" ]; then
        n=0
        until disk=$(first_virtio_disk); do
            n=$((n + 1))
            [ "$n" -le 200 ] || fail "no virtio disk found"
            usleep 100000
        done
    fi
    wait_block_dev "$disk" 20 || fail "/dev/$disk did not appear"
}

# first_nic: name of the first network interface backed by a device (eth0, ...; not lo),
# empty if none yet.
first_nic() {
    for d in /sys/class/net/*; do
        [ -e "$d/device" ] && { basename "$d"; return 0; }
    done
    return 1
}

# nic_up ADDR/PREFIX [REASON]: wait up to 20 s for the first NIC (fail REASON, default
# "no network interface", if none), bring up lo and the NIC with ADDR; sets $nic.
nic_up() {
    n=0
    until nic=$(first_nic); do
        n=$((n + 1))
        [ "$n" -le 200 ] || fail "${2:-no network interface}"
        usleep 100000
    done
    ip link set lo up || fail "ip link set lo up"
    ip addr add "$1" dev "$nic" || fail "ip addr add $1 dev $nic"
    ip link set "$nic" up || fail "ip link set $nic up"
}

# wait_peer HOST TRIES: first contact (ARP, carrier) may take a moment: ping HOST (1 s timeout
# each) until it answers, at most TRIES + 1 times.
wait_peer() {
    n=0
    until ping -c 1 -W 1 "$1" >/dev/null 2>&1; do
        n=$((n + 1))
        [ "$n" -le "$2" ] || fail "host $1 unreachable"
    done
}
