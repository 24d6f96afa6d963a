#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Build the QEMU 10 root once: a Debian 13 (trixie) minbase tree with qemu-system-x86 and
# qemu-utils, kept in ${FT_CACHE:-$HOME/.cache/ft-vhost}/qemu10-root (or $FT_QEMU10_ROOT), like
# the guest image. Idempotent: an existing complete tree (marker file .ft-complete) is kept and
# nothing is printed. About one minute; needs root (or sudo) and the Debian mirror the host's
# apt sources name. scripts/qemu10.sh runs the QEMU binary from it.
#
# The tree is built under a temporary name and renamed when complete, so an interrupted build
# never looks complete and two concurrent runs do not share a half-built tree.
set -euo pipefail

ROOT=${FT_QEMU10_ROOT:-${FT_CACHE:-$HOME/.cache/ft-vhost}/qemu10-root}
[ -f "$ROOT/.ft-complete" ] && exit 0

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0 --no-install-recommends)

if ! command -v debootstrap >/dev/null; then
    echo "qemu10-root.sh: installing debootstrap" >&2
    "${SUDO[@]}" apt-get -q -o DPkg::Lock::Timeout=600 update >&2
    "${SUDO[@]}" apt-get install "${APT_OPTS[@]}" debootstrap >&2
fi

# The host's Debian mirror (deb822 .sources or one-line .list), deb.debian.org otherwise.
mirror=$(
    {
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' || true
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '/^deb / { print ($2 ~ /^\[/ ? $3 : $2) }' || true
    } | grep -E '/debian/?$' | head -n 1 || true
)
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$(dirname "$ROOT")"
tmp="$ROOT.tmp.$$"
trap '"${SUDO[@]}" rm -rf "$tmp"' EXIT
echo "qemu10-root.sh: building $ROOT from $mirror (Debian 13, qemu-system-x86 qemu-utils)" >&2
"${SUDO[@]}" debootstrap --variant=minbase --include=qemu-system-x86,qemu-utils \
    trixie "$tmp" "$mirror" >&2
"${SUDO[@]}" rm -rf "$tmp/var/cache/apt/archives"/*.deb
"${SUDO[@]}" touch "$tmp/.ft-complete"
if ! "${SUDO[@]}" mv -T "$tmp" "$ROOT" 2>/dev/null; then
    # Another run finished first: keep its tree.
    [ -f "$ROOT/.ft-complete" ] || { echo "qemu10-root.sh: cannot install $ROOT" >&2; exit 1; }
fi
trap - EXIT
echo "qemu10-root.sh: done: $("$(dirname "$0")/qemu10.sh" --version | head -n 1)" >&2
