#!/usr/bin/env bash
# The Raspberry Pi 5 quantization path (int4 on torch's KleidiAI kernels) checked on an x86 machine: an arm64
# Debian chroot run by qemu user-mode, posing as the Pi 5's Cortex-A76 (NEON + dotprod, no i8mm). For
# CORRECTNESS only: timings under qemu mean nothing. Not run by CI (needs root, ~6 GB, ~10 min the first time).
#   sudo bash tests/arm64/run_int4_tests.sh [ROOT] [PYTEST ARGS...]     (ROOT default /tmp/arm64root)
# Runs the int4 cases of tests/test_quantize.py inside, where they are not skipped (docs/quantization.md,
# "Verifying the Raspberry Pi path"): ~12 min under qemu, 9 of them the compiled decode. Other pytest args
# replace the default selection (`-k "int4 and not compiled"`: ~2 min).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
R=${1:-/tmp/arm64root}; shift || true
[ $# -gt 0 ] || set -- -k "int4 or arm_board"
# The daemon's dependencies as aarch64 wheels, pinned to the versions the x86 CI installs (pyproject.toml)
nice -n 19 bash "$here/setup.sh" "$R" \
  transformers==5.24.0 torchao==0.18.0 safetensors==0.8.0 pyyaml==6.0.3 pydantic==2.13.4 pydantic_core==2.46.4 \
  pytest==9.0.3 pytest-timeout==2.4.0 psutil==7.2.2 paho-mqtt==2.2.0 jinja2==3.1.6 tokenizers==0.23.3 \
  huggingface_hub==2.4.0 tqdm==4.70.1 numpy==2.4.6
# torch.compile's CPU backend (inductor) builds C++ at run time: the compiled decode needs g++ and Python's headers
if ! chroot "$R" sh -c 'command -v g++ >/dev/null && test -f /usr/include/python3.11/Python.h'; then
  nice -n 19 bash "$here/run.sh" "$R" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ python3-dev >/dev/null'
fi
ARM64_BIND=$repo nice -n 19 bash "$here/run.sh" "$R" env PYTHONPATH=/work/daemon HOME=/tmp \
  /opt/venv/bin/python -m pytest -p no:cacheprovider --timeout 3600 -rs /work/tests/test_quantize.py "$@"
