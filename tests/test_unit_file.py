"""Deployment files: the systemd unit, deploy/install.sh and the mosquitto config + ACL.

These run in CI: a missing systemd-analyze, shellcheck or mosquitto is a failure there, a skip elsewhere.
"""

from __future__ import annotations

import getpass
import os
import queue
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from needs import missing
from broker import Broker, mosquitto_path

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "llmqtt.service"
INSTALL = REPO / "deploy" / "install.sh"
MOSQUITTO_DIR = REPO / "deploy" / "mosquitto"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(name)
    return path


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every directive, in order; comments and blank lines left out."""
    section, found = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def service_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for section, key, value in directives(UNIT.read_text()):
        if section == "Service":
            settings.setdefault(key, []).append(value)
    return settings


# ---- the unit ---------------------------------------------------------------------------------------------

def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    # The venv does not exist here and verify checks ExecStart's binary: point it at one that does,
    # and keep every other line identical.
    text = UNIT.read_text()
    exec_line = "ExecStart=/opt/llmqtt/venv/bin/llmqtt run --config /etc/llmqtt/config.yaml"
    assert exec_line in text
    copy = tmp_path / "llmqtt.service"
    copy.write_text(text.replace(exec_line, "ExecStart=/bin/true"))

    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120)

    output = result.stdout + result.stderr
    # verify exits 0 on "Unknown key" / "Invalid syntax, ignoring" too; those lines name the file.
    problems = [line for line in output.splitlines() if "llmqtt.service" in line]
    assert result.returncode == 0 and not problems, output


@pytest.mark.parametrize(("key", "value"), [
    ("Type", "notify"),
    ("NotifyAccess", "main"),
    ("ExecStart", "/opt/llmqtt/venv/bin/llmqtt run --config /etc/llmqtt/config.yaml"),
    ("TimeoutStopSec", "30"),
    ("Restart", "on-failure"),
    ("RestartSec", "5"),
    ("RestartPreventExitStatus", "2"),
    ("User", "llmqtt"),
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ("RestrictNamespaces", "yes"),
    ("LockPersonality", "yes"),
    ("RestrictRealtime", "yes"),
    ("SystemCallArchitectures", "native"),
    ("CapabilityBoundingSet", ""),
    ("StateDirectory", "llmqtt"),
    ("CacheDirectory", "llmqtt"),
    ("ConfigurationDirectory", "llmqtt"),
    ("LoadCredential", "mqtt-password:/etc/llmqtt/mqtt-password"),
])
def test_unit_sets(key: str, value: str) -> None:
    assert service_settings().get(key) == [value]


def test_timeouts_leave_room_for_a_pi() -> None:
    settings = service_settings()
    assert int(settings["WatchdogSec"][0]) >= 60  # one slow decode step must never trip it
    assert int(settings["TimeoutStartSec"][0]) >= 30  # the daemon extends it while loading
    assert settings["MemoryHigh"] and settings["MemoryMax"]


def test_unit_leaves_out_what_breaks_torch_or_hides_sys() -> None:
    settings = service_settings()
    assert "MemoryDenyWriteExecute" not in settings  # PyTorch's JIT kernels need W+X memory
    assert "ProcSubset" not in settings  # psutil/torch read /proc/meminfo, /proc/cpuinfo
    assert "DynamicUser" not in settings  # install.sh creates the llmqtt user
    # The daemon reads /sys/fs/cgroup and /sys/class/thermal: nothing may hide or remount /sys.
    assert not [v for values in settings.values() for v in values if "/sys" in v]


# ---- install.sh -----------------------------------------------------------------------------------------

def run_install(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX_URL", "PIP_ARGS")}
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60,
                          env={**environ, **env})


def test_install_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_install_script_passes_shellcheck() -> None:
    shellcheck = require_tool("shellcheck")
    result = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_help() -> None:
    result = run_install("--help")
    assert result.returncode == 0
    assert "--dry-run" in result.stdout and "--uninstall" in result.stdout


def test_dry_run_prints_the_plan_and_changes_nothing() -> None:
    opt_existed = Path("/opt/llmqtt").exists()

    result = run_install("--dry-run", "--profile", "pi5-4gb", "--with-broker")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "apt-get install -y --no-install-recommends python3-venv python3-dev" in out
    assert "mosquitto mosquitto-clients" in out
    torch = out.index("/opt/llmqtt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch")
    llmqtt = out.index(f"/opt/llmqtt/venv/bin/pip install {REPO}\\[gguf\\,systemd\\,http\\]")
    assert torch < llmqtt, "torch (CPU) must be installed before llmqtt pulls in a default torch"
    assert "configs/pi5-4gb.yaml /etc/llmqtt/config.yaml" in out or "keeping existing /etc/llmqtt/config.yaml" in out
    assert f"install -m 0644 {REPO}/systemd/llmqtt.service /etc/systemd/system/llmqtt.service" in out
    assert f"install -m 0644 {REPO}/deploy/mosquitto/acl /etc/mosquitto/llmqtt.acl" in out or \
        "keeping existing /etc/mosquitto/llmqtt.acl" in out
    assert "+ systemctl daemon-reload" in out
    assert "+ systemctl enable llmqtt.service" in out
    assert Path("/opt/llmqtt").exists() == opt_existed


def test_dry_run_honours_overrides_and_no_start() -> None:
    result = run_install("--dry-run", "--profile", "x86-minipc", "--no-start",
                         TORCH_SPEC="torch==2.5.1", TORCH_INDEX_URL="", PIP_ARGS="--no-cache-dir --quiet")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "+ /opt/llmqtt/venv/bin/pip install --no-cache-dir --quiet torch==2.5.1" in out
    assert "--index-url" not in out
    assert "mosquitto" not in out
    assert "+ systemctl enable" not in out and "+ systemctl restart" not in out
    assert "start with: systemctl enable --now llmqtt" in out


def test_dry_run_uninstall_keeps_config_and_models_unless_purged() -> None:
    kept = run_install("--dry-run", "--uninstall")
    purged = run_install("--dry-run", "--uninstall", "--purge")

    assert kept.returncode == 0 and purged.returncode == 0, kept.stderr + purged.stderr
    assert "+ rm -rf /opt/llmqtt" in kept.stdout
    assert "/etc/llmqtt" not in [w for line in kept.stdout.splitlines() if line.startswith("+") for w in line.split()]
    assert "+ rm -rf /etc/llmqtt /var/lib/llmqtt /var/cache/llmqtt" in purged.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--dry-run", "--profile", "nope"], "no such profile: nope"),
    (["--dry-run", "--purge"], "--purge goes with --uninstall"),
    (["--frobnicate"], "unknown option: --frobnicate"),
])
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    result = run_install(*args)
    assert result.returncode != 0
    assert message in result.stderr


# ---- mosquitto config and ACL, on a real broker --------------------------------------------------------------

USERS = ("llmqtt", "homeassistant", "device")
OBSERVER = "observer"  # test-only user that may read everything: sees what the ACL let through


class DeploymentBroker(Broker):
    """tests/broker.py's mosquitto, but configured by deploy/mosquitto/llmqtt.conf + acl, laid out as on Debian
    (a main file that includes conf.d/), with the paths moved into the test's directory."""

    def __init__(self, executable: str, workdir: Path) -> None:
        super().__init__(executable, workdir)  # picks the port; its own config is replaced below
        passwd = workdir / "passwd"
        passwd.write_text("".join(f"{user}:pw-{user}\n" for user in (*USERS, OBSERVER)))
        subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, capture_output=True, timeout=30)
        acl = workdir / "llmqtt.acl"
        acl.write_text((MOSQUITTO_DIR / "acl").read_text() + f"\nuser {OBSERVER}\ntopic read #\n")
        snippet = (MOSQUITTO_DIR / "llmqtt.conf").read_text()
        assert "\nlistener 1883\n" in snippet
        (workdir / "conf.d").mkdir()
        (workdir / "conf.d" / "llmqtt.conf").write_text(
            snippet.replace("\nlistener 1883\n", f"\nlistener {self.port} {self.host}\n")
            .replace("/etc/mosquitto/passwd", str(passwd))
            .replace("/etc/mosquitto/llmqtt.acl", str(acl)))
        # What Debian's /etc/mosquitto/mosquitto.conf says, with our paths; `user`: see tests/broker.py.
        self.conf.write_text(f"user {getpass.getuser()}\npersistence_location {workdir / 'data'}/\n"
                             f"log_dest file {workdir / 'mosquitto.log'}\ninclude_dir {workdir / 'conf.d'}\n")


@pytest.fixture()
def broker(tmp_path: Path):
    executable = mosquitto_path() or require_tool("mosquitto")
    require_tool("mosquitto_passwd")
    broker = DeploymentBroker(executable, tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


class Client:
    """A paho client that collects what it receives; each wait is bounded."""

    def __init__(self, port: int, user: str | None, client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected: queue.Queue[bool] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=client_id or f"test-{user}-{time.monotonic_ns()}")
        if user:
            self.client.username_pw_set(user, f"pw-{user}")
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.put(not rc.is_failure)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([rc.value for rc in rcs])
        # A session that outlives the connection (the daemon's mqtt.session_expiry_s does the same).
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, clean_start=client_id is None, properties=properties)
        self.client.loop_start()
        self.accepted = self.connected.get(timeout=10)

    def subscribe(self, topic: str) -> int:
        """The SUBACK reason code (1 = granted QoS 1)."""
        self.client.subscribe(topic, qos=1)
        (code,) = self.subacks.get(timeout=10)
        return code

    def publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)

    def received_before(self, sentinel_topic: str) -> list[str]:
        """Topics received up to the sentinel message (which must arrive)."""
        topics = []
        while (topic := self.messages.get(timeout=10)[0]) != sentinel_topic:
            topics.append(topic)
        return topics

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def clients(broker: Broker):
    opened: list[Client] = []

    def connect(user: str | None, client_id: str | None = None) -> Client:
        opened.append(Client(broker.port, user, client_id))
        return opened[-1]

    yield connect
    for client in opened:
        client.close()


@pytest.mark.broker
def test_anonymous_clients_are_refused(clients) -> None:
    assert clients(None).accepted is False
    assert all(clients(user).accepted for user in USERS)


@pytest.mark.broker
def test_daemon_gets_requests_cancels_and_fleet_work_but_devices_cannot_pose_as_home_assistant(clients) -> None:
    daemon, device, home_assistant = clients("llmqtt"), clients("device"), clients("homeassistant")
    for topic in ("llmqtt/node1/request/+", "llmqtt/node1/cancel/+", "$share/llmqtt/llmqtt/fleet/request/+",
                  "homeassistant/status"):
        assert daemon.subscribe(topic) == 1, topic  # granted QoS 1

    device.publish("llmqtt/node1/request/summarize", "{}")
    device.publish("llmqtt/node1/cancel/summarize", "{}")
    device.publish("llmqtt/fleet/request/summarize", "{}")
    device.publish("homeassistant/status", "online")  # denied: only Home Assistant may say this
    home_assistant.publish("llmqtt/node1/request/sentinel", "{}")

    assert daemon.received_before("llmqtt/node1/request/sentinel") == [
        "llmqtt/node1/request/summarize", "llmqtt/node1/cancel/summarize", "llmqtt/fleet/request/summarize"]

    home_assistant.publish("homeassistant/status", "online")
    assert daemon.messages.get(timeout=10)[0] == "homeassistant/status"


@pytest.mark.broker
def test_devices_read_answers_but_not_other_requests_or_discovery(clients) -> None:
    daemon, device, home_assistant = clients("llmqtt"), clients("device"), clients("homeassistant")
    # mosquitto grants any subscription and filters what it delivers by the ACL.
    for topic in ("llmqtt/node1/response/+", "llmqtt/node1/reply/#", "llmqtt/node1/status", "llmqtt/+/request/#",
                  "homeassistant/#"):
        device.subscribe(topic)

    home_assistant.publish("llmqtt/node1/request/summarize", "{}")  # someone else's request
    daemon.publish("homeassistant/sensor/node1/config", "{}")
    daemon.publish("llmqtt/node1/status", "online")
    daemon.publish("llmqtt/node1/reply/kitchen-panel", "{}")  # an MQTT 5 Response Topic under llmqtt/
    daemon.publish("llmqtt/node1/response/summarize", "{}")

    assert device.received_before("llmqtt/node1/response/summarize") == [
        "llmqtt/node1/status", "llmqtt/node1/reply/kitchen-panel"]


@pytest.mark.broker
def test_home_assistant_reads_result_states_and_the_daemon_reads_back_its_discovery(clients) -> None:
    daemon, device, home_assistant = clients("llmqtt"), clients("device"), clients("homeassistant")
    home_assistant.subscribe("llmqtt/+/ha/#")
    home_assistant.subscribe("homeassistant/sensor/#")
    daemon.subscribe("homeassistant/sensor/#")  # to clear configs of removed tasks at start
    for topic in ("llmqtt/+/ha/#", "homeassistant/#", "llmqtt/node1/status"):
        device.subscribe(topic)

    daemon.publish("llmqtt/node1/ha/sentiment/state", "{}")
    daemon.publish("homeassistant/sensor/llmqtt_node1/sentiment/config", "{}")
    daemon.publish("llmqtt/node1/status", "online")  # sentinel: every user may read status

    assert home_assistant.received_before("homeassistant/sensor/llmqtt_node1/sentiment/config") == [
        "llmqtt/node1/ha/sentiment/state"]
    assert daemon.messages.get(timeout=10)[0] == "homeassistant/sensor/llmqtt_node1/sentiment/config"
    assert device.received_before("llmqtt/node1/status") == []  # neither HA states nor discovery


@pytest.mark.broker
def test_each_user_publishes_only_where_its_acl_allows(clients) -> None:
    daemon, device, home_assistant, observer = (clients(u) for u in ("llmqtt", "device", "homeassistant",
                                                                      OBSERVER))
    observer.subscribe("#")

    daemon.publish("zigbee2mqtt/lamp/set", "ON")  # denied
    daemon.publish("llmqtt/node1/response/summarize", "{}")
    daemon.publish("homeassistant/sensor/node1/config", "{}")
    device.publish("llmqtt/node1/response/summarize", "forged")  # denied: only boards answer
    device.publish("llmqtt/node1/status", "offline")  # denied
    device.publish("homeassistant/status", "online")  # denied
    home_assistant.publish("homeassistant/status", "online")
    home_assistant.publish("llmqtt/node1/status", "offline")  # denied
    daemon.publish("llmqtt/node1/status", "online")

    assert observer.received_before("llmqtt/node1/status") == [
        "llmqtt/node1/response/summarize", "homeassistant/sensor/node1/config", "homeassistant/status"]


@pytest.mark.broker
def test_queued_requests_survive_a_broker_restart(broker: Broker, clients) -> None:
    daemon = clients("llmqtt", client_id="llmqtt-node1")
    daemon.subscribe("llmqtt/node1/request/+")
    daemon.close()  # the board is busy restarting; its session stays on the broker

    clients("device").publish("llmqtt/node1/request/summarize", "queued while away")
    broker.restart()  # persistence true: the session and its queued QoS 1 message go to disk and back

    daemon = clients("llmqtt", client_id="llmqtt-node1")
    assert daemon.messages.get(timeout=10) == ("llmqtt/node1/request/summarize", b"queued while away")
