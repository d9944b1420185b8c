#!/usr/bin/env bash
# Installs a real Home Assistant for the test suite into its own virtualenv (idempotent; deploy/setup.sh
# calls it once per release in tests/ha/server.py RELEASES).
#
#   install_ha.sh [VERSION [VENV]]
#   VERSION  default 2025.4.4 (or $LLMQTT_HA_VERSION): the newest release pip offers for Python 3.13.0
#   VENV     default ~/.cache/llmqtt-test/ha-venv (or $LLMQTT_HA_VENV)
#   $LLMQTT_HA_PYTHON  the interpreter to build the venv from; by default pyenv's 3.13 for 2025.x, 3.12 for
#            2024.x (HA's own minimum for each), else python3.13 / python3.12 on PATH
#
# Besides `homeassistant` (resolved with HA's own package_constraints.txt: without it pip backtracks for many
# minutes through old versions of HA's dependencies), it installs the requirements of every integration HA
# sets up in the tests (its default ones, mqtt, and ollama + conversation for the HTTP tests), so HA can run
# with --skip-pip and never installs anything while a test waits.
set -euo pipefail

HA_VERSION=${1:-${LLMQTT_HA_VERSION:-2025.4.4}}
VENV=${2:-${LLMQTT_HA_VENV:-$HOME/.cache/llmqtt-test/ha-venv}}
# Pins HA's own constraints lack for an older release: dependencies that broke it after it shipped
# (josepy 2 removed ComparableX509, which the acme package of HA 2024.x imports at start).
case "$HA_VERSION" in
  2024.*) PY_MINOR=3.12; LATE_PINS="josepy<2" ;;
  *) PY_MINOR=3.13; LATE_PINS="" ;;
esac
EXTRA_INTEGRATIONS="mqtt ollama conversation"
MARKER="$VENV/.llmqtt-ha-$HA_VERSION"

if [ -f "$MARKER" ]; then
  echo "install_ha: Home Assistant $HA_VERSION already in $VENV"
  exit 0
fi
started=$(date +%s)

find_python() {
  if [ -n "${LLMQTT_HA_PYTHON:-}" ]; then echo "$LLMQTT_HA_PYTHON"; return; fi
  local root candidate
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in "$root"/versions/"$PY_MINOR".*/bin/python3; do
    [ -x "$candidate" ] && { echo "$candidate"; return; }
  done
  command -v "python$PY_MINOR" || { echo "install_ha: no Python $PY_MINOR (pyenv install $PY_MINOR, or set LLMQTT_HA_PYTHON)" >&2; exit 1; }
}
PYTHON=$(find_python)
echo "install_ha: Home Assistant $HA_VERSION into $VENV with $("$PYTHON" --version)"

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# pip, quiet, without the warnings about local index folders that do not exist here (pip's status kept).
pip_quiet() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored" || true; }
  return "${PIPESTATUS[0]}"
}
pip_quiet install --upgrade pip

# HA's pins for everything it and its integrations import, read from the release's own wheel.
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
pip_quiet download --no-deps -d "$wheels" "homeassistant==$HA_VERSION"
"$VENV/bin/python" - "$wheels"/homeassistant-*.whl "$wheels/constraints.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    open(sys.argv[2], "wb").write(wheel.read("homeassistant/package_constraints.txt"))
PY
for pin in $LATE_PINS; do echo "$pin" >> "$wheels/constraints.txt"; done
pip_quiet install -c "$wheels/constraints.txt" "$wheels"/homeassistant-*.whl

# The integrations' own requirements (manifest.json), for the set HA loads at start plus ours, with their
# dependencies: what HA would otherwise pip-install on its first start.
"$VENV/bin/python" - "$wheels/integrations.txt" $EXTRA_INTEGRATIONS <<'PY'
import json, pathlib, sys
import homeassistant.bootstrap as bootstrap
components = pathlib.Path(bootstrap.__file__).parent / "components"
wanted = set(sys.argv[2:])
for name in dir(bootstrap):
    value = getattr(bootstrap, name)
    if name.isupper() and name.endswith("INTEGRATIONS") and isinstance(value, (set, frozenset)):
        wanted |= value
for name in ("STAGE_0_INTEGRATIONS", "STAGE_1_INTEGRATIONS"):
    for stage in getattr(bootstrap, name, ()):
        wanted |= set(stage[1])
seen, requirements = set(), set()
while wanted:
    domain = wanted.pop()
    manifest = components / domain / "manifest.json"
    if domain in seen or not manifest.is_file():
        continue
    seen.add(domain)
    data = json.loads(manifest.read_text())
    requirements.update(data.get("requirements", []))
    wanted |= set(data.get("dependencies", [])) | set(data.get("after_dependencies", []))
pathlib.Path(sys.argv[1]).write_text("\n".join(sorted(requirements)) + "\n")
print(f"install_ha: {len(requirements)} requirements of {len(seen)} integrations")
PY
pip_quiet install -c "$wheels/constraints.txt" -r "$wheels/integrations.txt"
"$VENV/bin/python" -c "import homeassistant.const as c, paho.mqtt, ollama; print('install_ha: HA', c.__version__, 'ok')"

touch "$MARKER"
echo "install_ha: done in $(( $(date +%s) - started ))s"
