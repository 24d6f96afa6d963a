#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Idempotent, non-interactive host setup for the ft-vhost test suite (Debian 12).
#
# Installs QEMU (TCG guests + qemu-storage-daemon), fio, iperf3, busybox-static, etcd (the
# arbitration tests start their own on loopback), protoc for the etcd client's build and the
# small tools the guest image builder needs, and builds the QEMU 10 tree (Debian 13, once, cached;
# scripts/qemu10-root.sh). A second run checks with dpkg-query only: no apt calls,
# no output. Works as root (CI) or through sudo.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo -n)
fi

# Tools the tests and tests/guest/build-guest.sh use directly.
PACKAGES=(
    qemu-system-x86 qemu-utils   # always together, see qemu_ok below
    fio iperf3 busybox-static iproute2 strace
    cpio gzip xz-utils zstd kmod # initramfs building, module decompression
    linux-perf                   # kernel-side check that FLUSH/COMMIT reach fdatasync
    etcd-server etcd-client      # lease arbitration: tests run their own etcd; etcdctl for operators
    protobuf-compiler libprotobuf-dev # protoc and its well-known types: the etcd-client crate's build
)

# Other helpers may run apt at the same time on a shared machine: wait for the lock.
APT_OPTS=(-y -q -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0 --no-install-recommends)

installed_version() {
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null | awk '$1 == "ii" { print $2 }'
}

# qemu-utils must come from the same QEMU build as qemu-system-x86: a newer preinstalled
# qemu-utils (e.g. a 10.x backport) Breaks qemu-system-common 7.2, and installing
# qemu-system-x86 alone makes apt remove qemu-utils (and qemu-storage-daemon with it).
qemu_ok() {
    local sys utils
    sys=$(installed_version qemu-system-x86)
    utils=$(installed_version qemu-utils)
    [ -n "$sys" ] && [ -n "$utils" ] && [ "$sys" = "$utils" ]
}

missing=()
for p in "${PACKAGES[@]}"; do
    case "$p" in
        qemu-system-x86 | qemu-utils) qemu_ok || missing+=("$p") ;;
        *) [ -n "$(installed_version "$p")" ] || missing+=("$p") ;;
    esac
done

# perf reads the ext4 sync tracepoints from tracefs; mount it if the kernel has it unmounted.
ensure_tracefs() {
    if [ -d /sys/kernel/tracing ] && ! [ -e /sys/kernel/tracing/events ]; then
        "${SUDO[@]}" mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
    fi
}

# QEMU 10 for the guest tests against today's QEMU: a Debian 13 tree built once and cached
# (scripts/qemu10-root.sh; quiet when it is there already).
ensure_qemu10() {
    "$(dirname "$0")/qemu10-root.sh"
}

if [ "${#missing[@]}" -eq 0 ]; then
    ensure_tracefs
    ensure_qemu10
    exit 0
fi

echo "setup.sh: installing ${missing[*]}" >&2
"${SUDO[@]}" apt-get -q -o DPkg::Lock::Timeout=600 update >&2

install=()
for p in "${missing[@]}"; do
    case "$p" in
        qemu-system-x86 | qemu-utils) ;;
        *) install+=("$p") ;;
    esac
done
if ! qemu_ok; then
    # Pin both to the qemu-system-x86 candidate (downgrading a newer qemu-utils if needed).
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
    if [ -z "$v" ] || [ "$v" = "(none)" ]; then
        echo "setup.sh: no installable qemu-system-x86 found" >&2
        exit 1
    fi
    install+=("qemu-system-x86=$v" "qemu-utils=$v")
fi

"${SUDO[@]}" apt-get install "${APT_OPTS[@]}" --allow-downgrades "${install[@]}" >&2

qemu_ok || {
    echo "setup.sh: qemu-system-x86 and qemu-utils versions still differ" >&2
    exit 1
}
ensure_tracefs
ensure_qemu10
echo "setup.sh: done" >&2
