#!/usr/bin/env bash
# Build an arm64 (aarch64) Debian chroot that runs under qemu user-mode emulation on these x86 machines, with
# Python 3.11 and the aarch64 torch wheel, posing as a Raspberry Pi 5 (4x Cortex-A76, NEON + dotprod, no i8mm).
# For CORRECTNESS of ARM-only code paths (e.g. torch's KleidiAI int4 kernels); timings under qemu mean nothing.
#   bash tests/arm64/setup.sh [ROOT] [EXTRA PIP PACKAGES...]   (ROOT default /tmp/arm64root; ~8 min, ~5.5 GB)
#   tests/arm64/run.sh [ROOT] python -c 'import torch; print(torch.backends.kleidiai.is_available())'
# Needs root. Idempotent: steps already done are skipped.
set -euo pipefail
R=${1:-/tmp/arm64root}; shift || true
EXTRA=("$@")
here=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive
need=(); for p in qemu-user-static debootstrap binfmt-support; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq; apt-get install -y -qq "${need[@]}" >/dev/null; fi
bash "$here/binfmt.sh"
mirror=$(grep -rhoE '^deb(-src)? +(\[[^]]*\] +)?https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $NF}' | head -1 || true)
[ -n "$mirror" ] || mirror=$(grep -rhoE '^URIs: +https?://[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | head -1 || true)
[ -n "$mirror" ] || { echo "arm64: no Debian mirror found in the apt sources"; exit 1; }
if [ ! -x "$R/usr/bin/python3" ]; then
  echo "arm64: debootstrap bookworm from $mirror into $R"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$R" "$mirror"
  cp /usr/bin/qemu-aarch64-static "$R/usr/bin/"
  chroot "$R" /debootstrap/debootstrap --second-stage
fi
# The host's CA bundle (package downloads go through this machine's trust store)
cp /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/ca-certificates.crt"
# A Raspberry Pi 5's CPU as torch's cpuinfo reads it: the host's x86 /proc/cpuinfo and sysfs crash it under qemu.
python3 "$here/fakecpu.py" "$R"
[ -x "$R/opt/venv/bin/python" ] || chroot "$R" python3 -m venv /opt/venv
site="$R/opt/venv/lib/python3.11/site-packages"
plat=(--platform manylinux2014_aarch64); for v in 17 18 19 20 21 22 23 24 25 26 27 28; do plat+=(--platform "manylinux_2_${v}_aarch64"); done
if [ ! -d "$site/torch" ]; then
  echo "arm64: torch==2.13.0 for aarch64, resolved on the host (the aarch64 wheel pulls CUDA libraries; unused here)"
  python3 -m pip install -q "${plat[@]}" --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all: \
    --target "$site" torch==2.13.0 numpy
fi
if [ ${#EXTRA[@]} -gt 0 ]; then
  python3 -m pip install -q "${plat[@]}" --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all: \
    --target "$site" --upgrade "${EXTRA[@]}"
fi
"$here/run.sh" "$R" /opt/venv/bin/python -c 'import torch, platform; print("arm64 ready:", platform.machine(), "torch", torch.__version__, "kleidiai", torch.backends.kleidiai.is_available())'
