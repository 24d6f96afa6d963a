#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Build (or reuse) the ft-vhost test guest: a Debian kernel and an initramfs with busybox, fio,
# iperf3, iproute2 and the virtio modules, whose /init runs one test chosen on the kernel
# command line (see tests/guest/init).
#
# Usage: build-guest.sh [OUTDIR]
#   OUTDIR defaults to ${FT_CACHE:-$HOME/.cache/ft-vhost}/guest and receives vmlinux (boots
#   with QEMU's PVH loader) and initrd.img. Nothing is installed on the host: the kernel package is fetched with
#   `apt-get download` and unpacked with `dpkg-deb -x`. The build is skipped when the stamp
#   (kernel package version, guest tool versions, hash of the guest sources) is unchanged.
#   Set FT_GUEST_REBUILD=1 to force a rebuild.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-${FT_CACHE:-$HOME/.cache/ft-vhost}/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Load order matters: insmod does not resolve dependencies.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
    failover net_failover virtio_net)
# Host binaries copied into the guest with their shared libraries.
BINARIES=(/usr/bin/fio /usr/bin/iperf3 /usr/sbin/ip)
TOOL_PACKAGES=(busybox-static fio iperf3 iproute2)

log() { echo "build-guest: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

for t in apt-get apt-cache dpkg-deb dpkg-query cpio ldd flock xz od; do
    command -v "$t" >/dev/null || die "$t missing (run scripts/setup.sh)"
done
for b in /bin/busybox "${BINARIES[@]}"; do
    [ -x "$b" ] || die "$b missing (run scripts/setup.sh)"
done

# Two test processes may build at once: serialise on a lock in the output directory.
exec 9>"$out/.lock"
flock 9

kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
# apt-cache takes seconds on a busy machine: remember its answer until the apt lists change.
lists_key=$(ls -l --time-style=+%s /var/lib/apt/lists/ 2>/dev/null | sha256sum | cut -c1-16)
kpkg= kver=
if [ -s "$out/kernel-choice" ]; then
    read -r key kpkg kver <"$out/kernel-choice" || true
    [ "$key" = "$lists_key" ] || kpkg=
fi
if [ -z "$kpkg" ]; then
    kpkg=$(kernel_package)
    if [ -z "$kpkg" ]; then
        if [ -s "$out/vmlinux" ] && [ -s "$out/initrd.img" ] && [ -s "$out/stamp" ]; then
            # No package lists (fresh CI image): the cached guest is the best we know.
            log "apt lists do not know linux-image-amd64; keeping cached guest"
            exit 0
        fi
        SUDO=()
        [ "$(id -u)" -eq 0 ] || SUDO=(sudo -n)
        "${SUDO[@]}" apt-get -q -o DPkg::Lock::Timeout=600 update >&2
        lists_key=$(ls -l --time-style=+%s /var/lib/apt/lists/ 2>/dev/null | sha256sum | cut -c1-16)
        kpkg=$(kernel_package)
        [ -n "$kpkg" ] || die "cannot find the kernel package behind linux-image-amd64"
    fi
    kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ { print $2 }')
    echo "$lists_key $kpkg $kver" >"$out/kernel-choice"
fi

stamp_text() {
    echo "kernel $kpkg $kver"
    for p in "${TOOL_PACKAGES[@]}"; do
        dpkg-query -W -f='${Package} ${Version}\n' "$p" 2>/dev/null || echo "$p none"
    done
    cat "$here/build-guest.sh" "$here/init" "$here/lib.sh" "$here"/tests/*.sh | sha256sum
}
stamp=$(stamp_text)
if [ -z "${FT_GUEST_REBUILD:-}" ] && [ -s "$out/vmlinux" ] && [ -s "$out/initrd.img" ] &&
    [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi

log "building guest in $out ($kpkg $kver)"
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- kernel ---------------------------------------------------------------------------------
# Reuse the .deb across rebuilds of the initramfs; apt-get download writes into the cwd.
deb_dir="$out/debs"
mkdir -p "$deb_dir"
deb=$(ls "$deb_dir/${kpkg}_"*"_amd64.deb" 2>/dev/null | grep -F "_${kver//:/%3a}_" | head -n1 || true)
if [ -z "$deb" ]; then
    rm -f "$deb_dir"/*.deb
    # As root apt warns that the download runs unsandboxed (_apt cannot write here): harmless.
    (cd "$work" && apt-get download -q "$kpkg=$kver" >&2) 2>&1 | grep -v 'unsandboxed' >&2 || true
    deb=$(ls "$work/${kpkg}_"*.deb 2>/dev/null | head -n1 || true)
    [ -n "$deb" ] || die "apt-get download $kpkg failed"
    mv "$deb" "$deb_dir/"
    deb="$deb_dir/$(basename "$deb")"
fi
mkdir -p "$work/kernel"
# Only the kernel image, its config and the modules we need are extracted (by exact name: a
# module built into a future kernel is simply not in the package).
mod_regex=$(printf '%s|' "${MODULES[@]}")
mapfile -t wanted < <(dpkg-deb -c "$deb" | awk '{ print $6 }' |
    grep -E "^\./boot/(vmlinuz|config)-|/modules\.builtin\$|/(${mod_regex%|})\.ko(\.[a-z]+)?\$")
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/kernel" "${wanted[@]}"
vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-* | head -n1)
[ -s "$vmlinuz" ] || die "no vmlinuz in $deb"

# Boot the uncompressed ELF vmlinux through its PVH entry point (CONFIG_PVH) instead of the
# bzImage: under TCG, SeaBIOS + the kernel's self-decompression take ~10 s of a ~20 s boot,
# PVH skips both. Same payload search as the kernel's scripts/extract-vmlinux.
extract_vmlinux() {
    local magic tool offset
    for pair in 'xz:\xfd7zXZ\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
        tool=${pair%%:*}
        magic=${pair#*:}
        for offset in $(LC_ALL=C grep -obUaP "$magic" "$vmlinuz" | cut -d: -f1); do
            tail -c +$((offset + 1)) "$vmlinuz" | "$tool" -dcq >"$work/vmlinux" 2>/dev/null || true
            if [ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
                return 0
            fi
        done
    done
    return 1
}
extract_vmlinux || die "cannot extract an ELF vmlinux from $vmlinuz"
grep -q '^CONFIG_PVH=y' "$work"/kernel/boot/config-* || die "$kpkg lacks CONFIG_PVH (needed to boot vmlinux)"
moddir=$(ls -d "$work"/kernel/lib/modules/* | head -n1)

# --- initramfs tree -------------------------------------------------------------------------
root="$work/root"
# Merged /usr like the host, so library paths printed by ldd are valid in the guest as is.
mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{proc,sys,dev,tmp,run,root,etc,mnt} "$root/ft/tests"
for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done
mkdir -p "$root/usr/lib/modules/ft"

cp /bin/busybox "$root/usr/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ -e "$root/usr/bin/$applet" ] || ln -s busybox "$root/usr/bin/$applet"
done

copy_with_libs() {
    local bin=$1 lib real
    install -D -m 0755 "$bin" "$root/usr${bin#/usr}"
    # ldd lines: "libx.so => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)".
    for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        real=$(readlink -f "$lib")
        lib=${lib#/usr}
        [ -e "$root/usr$lib" ] || install -D -m 0755 "$real" "$root/usr$lib"
    done
}
for b in "${BINARIES[@]}"; do
    copy_with_libs "$b"
done
# iproute2's /usr/sbin/ip wins over busybox's /usr/bin/ip: /usr/sbin comes first in PATH.

: >"$root/usr/lib/modules/ft/order"
for m in "${MODULES[@]}"; do
    if grep -q "/$m.ko\$" "$moddir/modules.builtin"; then
        continue
    fi
    src=$(find "$moddir" -name "$m.ko*" | head -n1)
    [ -n "$src" ] || die "module $m neither built in nor shipped by $kpkg"
    # busybox insmod cannot read compressed modules.
    case "$src" in
        *.ko) cp "$src" "$root/usr/lib/modules/ft/$m.ko" ;;
        *.ko.xz) xz -dc "$src" >"$root/usr/lib/modules/ft/$m.ko" ;;
        *.ko.zst) zstd -qdc "$src" >"$root/usr/lib/modules/ft/$m.ko" ;;
        *.ko.gz) gzip -dc "$src" >"$root/usr/lib/modules/ft/$m.ko" ;;
        *) die "unknown module format $src" ;;
    esac
    echo "$m" >>"$root/usr/lib/modules/ft/order"
done

install -m 0755 "$here/init" "$root/init"
install -m 0644 "$here/lib.sh" "$root/ft/lib.sh"
install -m 0644 "$here"/tests/*.sh "$root/ft/tests/"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"

# Uncompressed on purpose: under TCG the guest kernel spends ~5 s inflating a zstd or gzip
# image (90 MB, mostly fio's libraries) and ~0.1 s copying a plain one. It costs the guest
# ~90 MB of RAM until "Freeing initrd memory", well within the 512 MB the harness gives it.
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$work/initrd.img"

# The stamp goes last and away first, so an interrupted build is redone on the next run.
rm -f "$out/stamp"
mv "$work/vmlinux" "$out/vmlinux"
mv "$work/initrd.img" "$out/initrd.img"
echo "$stamp" >"$out/stamp"
rm -f "$out/vmlinuz" # from older versions of this script
log "done: $(du -h "$out/vmlinux" | cut -f1) kernel, $(du -h "$out/initrd.img" | cut -f1) initramfs"
