#!/usr/bin/env bash
# Install llmqtt as a systemd service on Debian 12 / Raspberry Pi OS (bookworm), from this source tree.
# Safe to run again: it upgrades the code and restarts the service, and never overwrites your config.
# See deploy/README.md, or run with --help.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
readonly PREFIX=/opt/llmqtt
readonly VENV=$PREFIX/venv
readonly ETC_DIR=/etc/llmqtt
readonly UNIT_PATH=/etc/systemd/system/llmqtt.service
readonly CLI_LINK=/usr/local/bin/llmqtt
readonly SERVICE_USER=llmqtt
readonly MOSQUITTO_CONF=/etc/mosquitto/conf.d/llmqtt.conf
readonly MOSQUITTO_ACL=/etc/mosquitto/llmqtt.acl
readonly MOSQUITTO_PASSWD=/etc/mosquitto/passwd

# torch goes in first, from PyTorch's CPU-only index: on x86-64 the PyPI wheel pulls in gigabytes of CUDA
# libraries a mini PC cannot use. On aarch64 (Pi 5) the PyPI wheel is CPU-only already, so
# TORCH_INDEX_URL= (empty, meaning PyPI) works there too. Once torch is in, llmqtt's `torch>=2.2` is
# satisfied and pip leaves it alone.
TORCH_SPEC=${TORCH_SPEC:-torch}
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
PIP_ARGS=${PIP_ARGS:-}          # extra pip options for every install, e.g. "--no-cache-dir"
PYTHON=${PYTHON:-python3}

profile=""
with_broker=0
no_start=0
dry_run=0
uninstall=0
purge=0

usage() {
    cat <<EOF
Usage: sudo deploy/install.sh [options]

Installs llmqtt from this source tree as the systemd service llmqtt.service:
apt packages, the system user '$SERVICE_USER', a venv in $VENV (torch CPU first, then
llmqtt[gguf,systemd,http]), $ETC_DIR/config.yaml from configs/<profile>.yaml (only if absent),
and the unit; then enables and (re)starts it.

Options:
  --profile NAME   configs/NAME.yaml as the first config: pi5-4gb, pi5-8gb, x86-minipc, local
                   (default: chosen from the CPU architecture and RAM)
  --with-broker    also install mosquitto with authentication and the llmqtt ACL, and create the
                   broker user '$SERVICE_USER' with a random password in $ETC_DIR/mqtt-password
  --no-start       install everything, but do not enable or start the service
  --dry-run        print what would be done, change nothing (root not needed)
  --uninstall      stop and remove the service, the unit and $PREFIX;
                   keeps $ETC_DIR and the downloaded models
  --purge          with --uninstall: also remove $ETC_DIR, /var/lib/llmqtt, /var/cache/llmqtt,
                   the user and the broker settings this script added
  -h, --help       this text

Environment:
  TORCH_SPEC       torch requirement (default: torch), e.g. "torch==2.5.1"
  TORCH_INDEX_URL  index for torch (default: https://download.pytorch.org/whl/cpu; empty = PyPI)
  PIP_ARGS         extra pip options, e.g. "--no-cache-dir" on a small SD card
  PYTHON           interpreter for the venv (default: python3, needs 3.10 or newer)
EOF
}

say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Every change goes through run: printed with --dry-run, executed otherwise.
run() {
    if ((dry_run)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

parse_args() {
    while (($#)); do
        case $1 in
            --profile) [[ $# -ge 2 ]] || die "--profile needs a name"; profile=$2; shift ;;
            --profile=*) profile=${1#*=} ;;
            --with-broker) with_broker=1 ;;
            --no-start) no_start=1 ;;
            --dry-run) dry_run=1 ;;
            --uninstall) uninstall=1 ;;
            --purge) purge=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; printf '\nerror: unknown option: %s\n' "$1" >&2; exit 2 ;;
        esac
        shift
    done
    if ((purge && !uninstall)); then die "--purge goes with --uninstall"; fi
    return 0
}

systemd_running() { ((dry_run)) || [[ -d /run/systemd/system ]]; }

# ---- install --------------------------------------------------------------------------------------------

default_profile() {
    local mem_kb
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    case $(uname -m) in
        aarch64 | arm64) if ((mem_kb < 6 * 1024 * 1024)); then echo pi5-4gb; else echo pi5-8gb; fi ;;
        *) echo x86-minipc ;;
    esac
}

install_packages() {
    local packages=(python3-venv python3-dev gcc g++ pkg-config libsystemd-dev)  # g++: fast decode kernels
    if ((with_broker)); then packages+=(mosquitto mosquitto-clients); fi
    say "apt packages: ${packages[*]}"
    run apt-get update
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
}

check_python() {
    if ((dry_run)); then return 0; fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "llmqtt needs Python 3.10 or newer ($PYTHON is $("$PYTHON" -V 2>&1))"
}

create_user() {
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        say "user $SERVICE_USER exists"
        return 0
    fi
    # Home = the unit's StateDirectory; systemd creates it with the right owner on first start.
    run useradd --system --user-group --home-dir /var/lib/llmqtt --no-create-home \
        --shell /usr/sbin/nologin --comment "llmqtt daemon" "$SERVICE_USER"
}

install_python_packages() {
    local pip_args=() torch_args=()
    read -r -a pip_args <<<"$PIP_ARGS"
    if [[ -n $TORCH_INDEX_URL ]]; then torch_args=(--index-url "$TORCH_INDEX_URL"); fi
    if [[ ! -x $VENV/bin/python ]]; then run "$PYTHON" -m venv "$VENV"; fi
    run "$VENV/bin/pip" install "${pip_args[@]}" --upgrade pip wheel
    say "torch ($TORCH_SPEC) from ${TORCH_INDEX_URL:-PyPI}"
    run "$VENV/bin/pip" install "${pip_args[@]}" "${torch_args[@]}" "$TORCH_SPEC"
    # systemd-python builds against libsystemd-dev (journald logging, sd_notify through libsystemd).
    say "llmqtt from $REPO"
    run "$VENV/bin/pip" install "${pip_args[@]}" "${REPO}[gguf,systemd,http]"
    run ln -sfn "$VENV/bin/llmqtt" "$CLI_LINK"
}

install_if_absent() {  # mode source target
    if [[ -e $3 ]]; then
        say "keeping existing $3"
    else
        run install -m "$1" "$2" "$3"
    fi
}

install_config() {
    local source=$REPO/configs/$profile.yaml
    [[ -f $source ]] || die "no such profile: $profile (configs/$profile.yaml)"
    run install -d -m 0755 "$ETC_DIR"
    say "config profile $profile"
    install_if_absent 0644 "$source" "$ETC_DIR/config.yaml"
    # LoadCredential= fails the start when its file is missing, so an empty one stands in for a broker
    # without authentication. root-only: systemd reads it as root and hands the service its own copy.
    install_if_absent 0600 /dev/null "$ETC_DIR/mqtt-password"
}

install_unit() {
    run install -m 0644 "$REPO/systemd/llmqtt.service" "$UNIT_PATH"
    if ! systemd_running; then
        warn "systemd is not running here; on the board run: systemctl enable --now llmqtt"
        return 0
    fi
    run systemctl daemon-reload
    if ((no_start)); then
        say "not started (--no-start); start with: systemctl enable --now llmqtt"
        return 0
    fi
    run systemctl enable llmqtt.service
    # restart, not start: a second run of this script must load the new code.
    run systemctl restart llmqtt.service
}

# ---- broker ---------------------------------------------------------------------------------------------

random_password() { "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(18))'; }

# Adds user:password to the broker's password file without the password ever being a command argument
# (visible in `ps`): mosquitto_passwd -U hashes a plain-text file in place.
add_broker_user() {  # user password
    local plain
    plain=$(mktemp)
    printf '%s:%s\n' "$1" "$2" >"$plain"
    mosquitto_passwd -U "$plain"
    cat "$plain" >>"$MOSQUITTO_PASSWD"
    rm -f "$plain"
}

setup_broker_user() {
    if [[ -e $MOSQUITTO_PASSWD ]] && grep -q "^$SERVICE_USER:" "$MOSQUITTO_PASSWD"; then
        say "broker user $SERVICE_USER exists"
        if [[ ! -s $ETC_DIR/mqtt-password ]]; then
            warn "$ETC_DIR/mqtt-password is empty; put the broker password of $SERVICE_USER there"
        fi
        return 0
    fi
    if ((dry_run)); then
        say "would add broker user $SERVICE_USER to $MOSQUITTO_PASSWD, password in $ETC_DIR/mqtt-password"
        return 0
    fi
    if [[ ! -s $ETC_DIR/mqtt-password ]]; then
        (umask 077 && random_password >"$ETC_DIR/mqtt-password")
    fi
    add_broker_user "$SERVICE_USER" "$(cat "$ETC_DIR/mqtt-password")"
    say "broker user $SERVICE_USER added; its password is in $ETC_DIR/mqtt-password"
}

setup_broker() {
    install_if_absent 0644 "$REPO/deploy/mosquitto/llmqtt.conf" "$MOSQUITTO_CONF"
    install_if_absent 0644 "$REPO/deploy/mosquitto/acl" "$MOSQUITTO_ACL"
    # mosquitto reads it as its own user; nobody else needs to.
    install_if_absent 0640 /dev/null "$MOSQUITTO_PASSWD"
    run chown root:mosquitto "$MOSQUITTO_PASSWD"
    setup_broker_user
    if systemd_running; then
        run systemctl enable mosquitto.service
        run systemctl restart mosquitto.service
    fi
    say "users for Home Assistant and devices: mosquitto_passwd $MOSQUITTO_PASSWD homeassistant|device"
}

install_all() {
    [[ -f $REPO/pyproject.toml && -f $REPO/systemd/llmqtt.service ]] || die "$REPO is not an llmqtt source tree"
    [[ -n $profile ]] || profile=$(default_profile)
    install_packages
    check_python
    create_user
    install_python_packages
    install_config
    if ((with_broker)); then setup_broker; fi
    install_unit
    say "done. Check it with:"
    cat <<EOF
    systemctl status llmqtt
    journalctl -u llmqtt -f
    llmqtt doctor --config $ETC_DIR/config.yaml
EOF
}

# ---- uninstall ------------------------------------------------------------------------------------------

uninstall_all() {
    say "removing the service, its unit and $PREFIX"
    if [[ -e $UNIT_PATH ]] && systemd_running; then
        run systemctl disable --now llmqtt.service || true
    fi
    run rm -f "$UNIT_PATH"
    if systemd_running; then run systemctl daemon-reload; fi
    if [[ -L $CLI_LINK ]] || ((dry_run)); then run rm -f "$CLI_LINK"; fi
    run rm -rf "$PREFIX"
    if ! ((purge)); then
        say "kept $ETC_DIR and the models in /var/cache/llmqtt (--purge removes them)"
        return 0
    fi
    say "purging config, state, models, the user and the broker settings"
    run rm -rf "$ETC_DIR" /var/lib/llmqtt /var/cache/llmqtt /var/lib/private/llmqtt /var/cache/private/llmqtt
    if [[ -e $MOSQUITTO_PASSWD ]] && grep -q "^$SERVICE_USER:" "$MOSQUITTO_PASSWD"; then
        run mosquitto_passwd -D "$MOSQUITTO_PASSWD" "$SERVICE_USER"
    fi
    # The password file was ours if nothing else is left in it.
    if [[ -e $MOSQUITTO_PASSWD && ! -s $MOSQUITTO_PASSWD ]]; then run rm -f "$MOSQUITTO_PASSWD"; fi
    if [[ -e $MOSQUITTO_CONF || -e $MOSQUITTO_ACL ]]; then
        run rm -f "$MOSQUITTO_CONF" "$MOSQUITTO_ACL"
        if systemd_running; then run systemctl try-restart mosquitto.service; fi
    fi
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        run userdel "$SERVICE_USER"
    fi
    return 0
}

main() {
    parse_args "$@"
    if ((dry_run)); then say "dry run: nothing is changed"; fi
    ((EUID == 0 || dry_run)) || die "run as root: sudo $0 $*"
    if ((uninstall)); then
        uninstall_all
    else
        install_all
    fi
}

main "$@"
