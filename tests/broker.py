"""A real mosquitto on a free loopback port for integration tests, and a small test-side MQTT client.

The `broker` fixture starts `mosquitto` with a generated config (anonymous, persistence in a temp dir so a
broker restart keeps sessions) and stops it at teardown. Without mosquitto the fixture fails when `CI` is
set (CI must run these tests) and skips otherwise. Every wait is bounded.
"""

from __future__ import annotations

import getpass
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from needs import missing
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

WAIT_S = 10.0
TESTS = Path(__file__).resolve().parent


def mosquitto_path() -> str | None:
    default = Path("/usr/sbin/mosquitto")
    return str(default) if default.is_file() else shutil.which("mosquitto")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl CLI); returns (ca, cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key, cert, key = (directory / n for n in ("ca.crt", "ca.key", "server.crt", "server.key"))
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n", encoding="utf-8")
    for command in (
        f"req -x509 -newkey rsa:2048 -nodes -keyout {ca_key} -out {ca} -days 1 -subj /CN=llmqtt-test-ca",
        f"req -newkey rsa:2048 -nodes -keyout {key} -out {directory / 'server.csr'} -subj /CN=127.0.0.1",
        f"x509 -req -in {directory / 'server.csr'} -CA {ca} -CAkey {ca_key} -CAcreateserial -out {cert} "
        f"-days 1 -extfile {ext}",
    ):
        subprocess.run(["openssl", *command.split()], check=True, capture_output=True, timeout=60)
    return ca, cert, key


class Broker:
    def __init__(self, executable: str, workdir: Path, users: dict[str, str] | None = None, tls: bool = False,
                 acl: str | None = None, extra: list[str] | None = None):
        """`acl`: the text of an ACL file; `extra`: more mosquitto.conf lines (e.g. `max_inflight_messages 0`)."""
        self.executable = executable
        self.dir = workdir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.users = users or {}
        self.ca_file: Path | None = None
        self.process: subprocess.Popen | None = None
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {self.host}",
            # Run as whoever runs the tests: as root, mosquitto would switch to user `mosquitto`, which
            # cannot write the persistence files or the log in the test's temp dir.
            f"user {getpass.getuser()}",
            "persistence true",
            f"persistence_location {workdir / 'data'}/",
            f"log_dest file {workdir / 'mosquitto.log'}",
            "log_type all",
            "max_queued_messages 10000",
        ]
        if self.users:
            lines += ["allow_anonymous false", f"password_file {self._password_file()}"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            self.ca_file, cert, key = make_certificates(workdir / "tls")
            lines += [f"cafile {self.ca_file}", f"certfile {cert}", f"keyfile {key}"]
        if acl is not None:
            (workdir / "acl").write_text(acl, encoding="utf-8")
            lines.append(f"acl_file {workdir / 'acl'}")
        lines += extra or []
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _password_file(self) -> Path:
        path = self.dir / "passwd"
        path.touch()
        for user, password in self.users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True,
                           capture_output=True, timeout=WAIT_S)
        return path

    def start(self) -> None:
        self.process = subprocess.Popen([self.executable, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.process.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections on {self.port} within {WAIT_S}s")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence database (sessions, queued messages) and exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(WAIT_S)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, protocol: str = "5", user: str | None = None) -> TestClient:
        return TestClient(self, protocol, user)


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None

    def json(self) -> dict:
        return json.loads(self.payload)


class TestClient:
    """Publish and collect messages; `expect` waits (bounded) for the next matching one."""

    __test__ = False  # not a pytest test class

    def __init__(self, broker: Broker, protocol: str = "5", user: str | None = None):
        """Logs in as `user` (default: the broker's first user, if it has any)."""
        self.v5 = protocol == "5"
        self.messages: queue.Queue[Received] = queue.Queue()
        self._subscribed: dict[int, threading.Event] = {}
        self._connected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311)
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda c, u, mid, *a: self._subscribed.setdefault(mid, threading.Event()).set()
        if broker.users:
            user = user or next(iter(broker.users))
            self.client.username_pw_set(user, broker.users[user])
        if broker.ca_file is not None:
            self.client.tls_set(ca_certs=str(broker.ca_file))
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(WAIT_S):
            raise RuntimeError("test client could not connect")

    def _on_message(self, client, userdata, message) -> None:
        props = message.properties
        self.messages.put(Received(message.topic, message.payload, bool(message.retain),
                                   getattr(props, "CorrelationData", None) if props else None))

    def subscribe(self, *topics: str) -> TestClient:
        for topic in topics:
            _rc, mid = self.client.subscribe(topic, qos=1)
            if not self._subscribed.setdefault(mid, threading.Event()).wait(WAIT_S):
                raise RuntimeError(f"no SUBACK for {topic}")
        return self

    def publish(self, topic: str, payload: bytes | str | dict, *, response_topic: str | None = None,
                correlation_data: bytes | None = None, retain: bool = False) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        properties = None
        if response_topic or correlation_data:
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation_data:
                properties.CorrelationData = correlation_data
        self.client.publish(topic, payload, qos=1, retain=retain, properties=properties).wait_for_publish(WAIT_S)

    def expect(self, topic: str | None = None, timeout: float = WAIT_S, where=None) -> Received:
        """The next message on `topic` (a filter) that satisfies `where`; others are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no message on {topic} within {timeout}s")
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if (topic is None or paho.topic_matches_sub(topic, msg.topic)) and (where is None or where(msg)):
                return msg

    def expect_json(self, topic: str | None = None, timeout: float = WAIT_S, where=None) -> dict:
        return self.expect(topic, timeout, where=lambda m: _is_json(m) and (where is None or where(m.json()))).json()

    def drain(self, quiet_s: float = 0.3) -> list[Received]:
        """Everything that arrives until nothing has arrived for `quiet_s` (bounded by WAIT_S)."""
        got, deadline = [], time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                got.append(self.messages.get(timeout=quiet_s))
            except queue.Empty:
                break
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _is_json(message: Received) -> bool:
    try:
        return isinstance(message.json(), dict)
    except ValueError:
        return False


def _run_broker(tmp_path: Path, **options):
    executable = mosquitto_path()
    if executable is None:
        missing("mosquitto (apt install mosquitto)")
    instance = Broker(executable, tmp_path / "mosquitto", **options)
    instance.start()
    clients: list[TestClient] = []
    instance.client = lambda protocol="5", user=None: clients.append(TestClient(instance, protocol, user)) or clients[-1]
    yield instance
    for client in clients:
        client.close()
    instance.stop()


@pytest.fixture
def broker(tmp_path):
    """An anonymous broker on a free loopback port, with persistence."""
    yield from _run_broker(tmp_path)


SHIPPED_ACL = TESTS.parent / "deploy" / "mosquitto" / "acl"
ACL_USERS = {"observer": "pw-observer", "llmqtt": "pw-llmqtt", "homeassistant": "pw-homeassistant",
             "device": "pw-device"}


@pytest.fixture
def acl_broker(tmp_path):
    """Password file + the shipped deploy/mosquitto/acl: users `llmqtt` (the daemon), `homeassistant`,
    `device`, each with password `pw-<user>`, plus a test-only `observer` that reads everything (`#`) and is
    the default user of `client()`: it sees whatever the ACL lets through."""
    acl = SHIPPED_ACL.read_text(encoding="utf-8") + "\nuser observer\ntopic read #\n"
    yield from _run_broker(tmp_path, users=ACL_USERS, acl=acl)


@pytest.fixture
def secure_broker(tmp_path):
    """TLS (a throw-away CA in `ca_file`) and a password file with one user, `llmqtt` / `s3cret pw`."""
    yield from _run_broker(tmp_path, users={"llmqtt": "s3cret pw"}, tls=True)


# -- the daemon as a process: `python -m llmqtt run --config ...` ------------------------------------------

class DaemonProcess:
    """`llmqtt run` in a subprocess; with `fake_engine`, through tests/fake_daemon.py (no model loaded)."""

    def __init__(self, workdir: Path, config: dict, env: dict[str, str] | None = None, fake_engine: bool = False):
        self.workdir = workdir
        self.command = [sys.executable, str(TESTS / "fake_daemon.py")] if fake_engine else [sys.executable, "-m", "llmqtt"]
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        # PYTHONFAULTHANDLER: a daemon that hangs at shutdown is sent SIGABRT, and its log shows every thread
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                    "PYTHONFAULTHANDLER": "1", **(env or {})}
        self.root = f"{config['mqtt'].get('base_topic', 'llmqtt')}/{config['mqtt']['node_id']}"
        self.process: subprocess.Popen | None = None
        self.runs = 0

    def start(self, **env: str) -> DaemonProcess:
        self.runs += 1
        log = open(self.workdir / f"daemon-{self.runs}.log", "wb")
        self.process = subprocess.Popen([*self.command, "run", "--config", str(self.config_path)],
                                        env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def log(self) -> str:
        return "\n".join((self.workdir / f"daemon-{i}.log").read_text(errors="replace")
                         for i in range(1, self.runs + 1))

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no clean disconnect, no chance to answer
        self.process.wait(WAIT_S)

    def terminate(self, timeout: float = WAIT_S) -> int:
        """SIGTERM and the exit status; a daemon still running after `timeout` fails with its threads' stacks."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)  # faulthandler prints each thread's stack, then it dies
            self.process.wait(WAIT_S)
            pytest.fail(f"the daemon did not stop within {timeout} s of SIGTERM:\n{self.log()[-20000:]}")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT_S)


# -- an in-process daemon on the test broker ----------------------------------------------------------

def daemon_config(broker: Broker, prompts: Path, node_id: str | None = None, **sections) -> dict:
    """A config dict for a daemon on `broker`; `sections` are merged into the matching config sections."""
    config = {
        "model": "fake",
        "prompts": [str(prompts)],
        "mqtt": {"host": broker.host, "port": broker.port, "node_id": node_id or f"n{uuid.uuid4().hex[:8]}",
                 "keepalive_s": 5, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "health_interval_s": 1},
        "runtime": {},
        "homeassistant": {"enabled": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


def wait_online(client: TestClient, root: str, timeout: float = WAIT_S) -> dict:
    """Wait for `online` on `<root>/status`; requests published after it find the daemon subscribed."""
    client.subscribe(f"{root}/status")
    return client.expect_json(f"{root}/status", timeout, where=lambda m: m["state"] == "online")


def daemons_on(broker: Broker, tmp_path: Path, watcher: TestClient, mqtt: dict | None = None, **defaults):
    """Yields `start(engine=None, node_id=None, **config_sections) -> Daemon` (fake engine by default), each
    started and online on `broker`, shut down afterwards. `mqtt` goes into every config's mqtt section (a
    login, say); `defaults` are config sections each call's own `sections` replace."""
    from fake_engine import make_engine

    from llmqtt.config import Config
    from llmqtt.daemon import Daemon

    daemons = []

    def start(engine=None, node_id: str | None = None, **sections):
        prompts = tmp_path / "prompts"
        engine = engine or make_engine(prompts)
        raw = daemon_config(broker, prompts, node_id, **{**defaults, **sections})
        raw["mqtt"].update(mqtt or {})
        daemon = Daemon(Config.model_validate(raw), engine, stop_grace_s=5)
        daemons.append(daemon)
        daemon.start()
        wait_online(watcher, daemon.topics.root)
        return daemon

    yield start
    for daemon in daemons:
        daemon.shutdown()


@pytest.fixture
def start_daemon(broker, tmp_path):
    """`start_daemon(engine=None, node_id=None, **config_sections) -> Daemon`, started and online; shut down at
    teardown."""
    yield from daemons_on(broker, tmp_path, broker.client())
