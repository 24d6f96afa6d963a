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
