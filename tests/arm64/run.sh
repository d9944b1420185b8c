#!/usr/bin/env bash
# Run a command inside the arm64 chroot built by setup.sh, as a Pi 5 (QEMU_CPU=cortex-a76: dotprod, no i8mm/bf16;
# QEMU_CPU=max for a newer ARM core). Mounts proc, dev and the fake cpuinfo for the command only.
#   tests/arm64/run.sh [ROOT] COMMAND...      e.g.  run.sh /tmp/arm64root /opt/venv/bin/python -m pytest ...
# Bind-mount your checkout with ARM64_BIND=/abs/path (it appears at /work inside).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
R=/tmp/arm64root; if [ -d "${1:-}" ] && [ -d "$1/opt" ]; then R=$1; shift; fi
bash "$here/binfmt.sh"
mountpoint -q "$R/proc" || mount -t proc proc "$R/proc"
mountpoint -q "$R/dev" || mount --bind /dev "$R/dev"
mount --bind "$R/etc/fake-cpuinfo" "$R/proc/cpuinfo"
if [ -n "${ARM64_BIND:-}" ]; then mkdir -p "$R/work"; mount --bind "$ARM64_BIND" "$R/work"; fi
export QEMU_CPU=${QEMU_CPU:-cortex-a76}
chroot "$R" "$@"; rc=$?
[ -n "${ARM64_BIND:-}" ] && umount "$R/work"
umount "$R/proc/cpuinfo"; umount "$R/proc"; umount "$R/dev"
exit $rc
