#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Run QEMU 10 (Debian 13's qemu-system-x86_64) from the tree scripts/qemu10-root.sh builds,
# without chroot or bind mounts: the tree's own dynamic loader runs its binary with the tree's
# libraries, -L points at its firmware and QEMU_MODULE_DIR at its modules. Paths on the command
# line (sockets, kernel, initrd, memfd sizes) are the host's, as with the host QEMU.
#   scripts/qemu10.sh --version
#   scripts/qemu10.sh -accel tcg -machine q35,memory-backend=mem ...
set -euo pipefail

ROOT=${FT_QEMU10_ROOT:-${FT_CACHE:-$HOME/.cache/ft-vhost}/qemu10-root}
if [ ! -f "$ROOT/.ft-complete" ]; then
    echo "qemu10.sh: no QEMU 10 tree at $ROOT; run scripts/qemu10-root.sh (or scripts/setup.sh)" >&2
    exit 127
fi
LIB=$ROOT/usr/lib/x86_64-linux-gnu
export QEMU_MODULE_DIR=$LIB/qemu
exec "$LIB/ld-linux-x86-64.so.2" --library-path "$LIB:$ROOT/usr/local/lib/x86_64-linux-gnu" \
    --argv0 qemu-system-x86_64 "$ROOT/usr/bin/qemu-system-x86_64" -L "$ROOT/usr/share/qemu" "$@"
