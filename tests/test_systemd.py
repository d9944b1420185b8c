"""sd_notify and the progress watchdog, against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from needs import missing
import yaml
from broker import daemon_config, wait_online
from fake_engine import write_model_dir, write_prompts

from llmqtt.systemd import Notifier, Watchdog, watchdog_interval_s

BACKENDS = ["libsystemd", "socket"]


def require_backend(backend: str) -> None:
    """systemd-python is optional for users, but CI installs it: there a missing module is a failure."""
    if backend != "libsystemd":
        return
    try:
        import systemd.daemon  # noqa: F401
    except ImportError:
        missing("systemd-python")


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def receive(self, timeout: float) -> str | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            return self.sock.recv(4096).decode()
        except socket.timeout:
            return None

    def receive_until(self, wanted: str, count: int = 1, timeout: float = 5.0) -> list[str]:
        """Messages received until `wanted` arrived `count` times; fails at the deadline."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while sum(m == wanted for m in seen) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{wanted!r} x{count} did not arrive within {timeout}s; got {seen}")
            message = self.receive(remaining)
            if message is not None:
                seen.append(message)
        return seen

    def drain(self) -> list[str]:
        messages = []
        while (message := self.receive(0.001)) is not None:
            messages.append(message)
        return messages


@pytest.fixture()
def fake_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "notify.sock"
    if len(str(path)) >= 100:  # sun_path holds 108 bytes; a deep tmp dir would not fit
        path = Path("/tmp") / f"llmqtt-{uuid.uuid4().hex[:8]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield FakeSystemd(sock)
    sock.close()
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_message_arrives(fake_systemd: FakeSystemd, backend: str) -> None:
    require_backend(backend)
    notifier = Notifier(backend=backend)
    assert notifier.enabled and notifier.backend == backend

    assert notifier.extend_timeout(90)
    assert notifier.status("loading model\nstep 2")
    assert notifier.ready()
    assert notifier.watchdog()
    assert notifier.stopping()

    assert fake_systemd.receive_until("STOPPING=1") == [
        "EXTEND_TIMEOUT_USEC=90000000",
        "STATUS=loading model step 2",  # one line: a newline would start a new assignment
        "READY=1",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    require_backend(backend)
    name = f"llmqtt-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)

        assert Notifier(backend=backend).ready()

        assert FakeSystemd(sock).receive_until("READY=1") == ["READY=1"]


def test_auto_prefers_libsystemd(fake_systemd: FakeSystemd) -> None:
    require_backend("libsystemd")
    assert Notifier().backend == "libsystemd"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lost_message_is_not_fatal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: str) -> None:
    require_backend(backend)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    notifier = Notifier(backend=backend)

    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    notifier = Notifier()

    assert (notifier.enabled, notifier.backend) == (False, "none")
    assert notifier.ready() is False
    assert notifier.status("x") is False
    watchdog = Watchdog.from_environ(notifier)
    assert watchdog.interval_s is None
    watchdog.start()  # nothing to start; must not spawn a thread or raise
    watchdog.beat()
    watchdog.stop()


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WATCHDOG_USEC": "120000000"}, 120.0),
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4242"}, 0.2),
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_from_environment(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(environ, pid=4242) == expected


class CountingNotifier:
    enabled = True

    def __init__(self) -> None:
        self.pings = 0

    def watchdog(self) -> bool:
        self.pings += 1
        return True


def test_tick_pings_only_while_beats_are_recent() -> None:
    now = [100.0]
    notifier = CountingNotifier()
    watchdog = Watchdog(notifier, 10.0, clock=lambda: now[0])  # type: ignore[arg-type]

    watchdog.beat()
    now[0] += 9.9
    assert watchdog.tick() and notifier.pings == 1

    now[0] += 0.2  # 10.1 s without a beat: a hung worker
    assert not watchdog.tick() and notifier.pings == 1

    watchdog.beat()  # progress again
    assert watchdog.tick() and notifier.pings == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_watchdog_stops_pinging_when_beats_stop(fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch,
                                               backend: str) -> None:
    require_backend(backend)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 200 ms: pings every 100 ms
    watchdog = Watchdog.from_environ(Notifier(backend=backend))
    assert watchdog.interval_s == 0.2
    beating = threading.Event()
    beating.set()
    done = threading.Event()

    def worker() -> None:  # a worker that makes progress while `beating` is set
        while not done.wait(0.02):
            if beating.is_set():
                watchdog.beat()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    watchdog.start()
    try:
        fake_systemd.receive_until("WATCHDOG=1", count=3, timeout=5)

        beating.clear()  # the worker hangs
        hung_at = time.monotonic()
        # Let the last beat age past the interval (plus one ping period and slack), drop what came before.
        while time.monotonic() < hung_at + 0.2 + 0.1 + 0.3:
            fake_systemd.receive(0.05)
        assert watchdog.seconds_since_beat() > 0.2
        assert fake_systemd.receive(timeout=0.5) is None, "pinged although no progress was made"

        beating.set()  # the worker recovers: pings resume
        fake_systemd.receive_until("WATCHDOG=1", timeout=5)
    finally:
        done.set()
        watchdog.stop()
        thread.join(timeout=5)


def test_idle_daemon_keeps_pinging(fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    watchdog = Watchdog.from_environ(Notifier(backend="socket"))
    work_queue_has_items = threading.Event()  # never set: no requests arrive
    stop = threading.Event()

    def idle_worker() -> None:  # the service's idle loop: wait with a timeout, then beat
        while not stop.is_set():
            work_queue_has_items.wait(timeout=watchdog.idle_wait_s)
            watchdog.beat()

    thread = threading.Thread(target=idle_worker, daemon=True)
    thread.start()
    watchdog.start()
    try:
        assert watchdog.idle_wait_s < watchdog.interval_s / 2
        # Well past the interval: without the idle beats pings would have stopped after ~200 ms.
        fake_systemd.receive_until("WATCHDOG=1", count=8, timeout=10)
    finally:
        stop.set()
        watchdog.stop()
        thread.join(timeout=5)


def test_stop_ends_the_ping_thread(fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    watchdog = Watchdog.from_environ(Notifier(backend="socket"))
    watchdog.start()
    fake_systemd.receive_until("WATCHDOG=1")
    watchdog.stop()
    fake_systemd.drain()

    watchdog.beat()
    assert fake_systemd.receive(timeout=0.3) is None
    assert not any(t.name == "llmqtt-watchdog" for t in threading.enumerate())


# ---- the real daemon process, with this socket standing in for systemd -------------------------------------

@pytest.mark.broker
def test_daemon_process_speaks_to_systemd(broker, fake_systemd: FakeSystemd, tmp_path: Path) -> None:
    """`llmqtt run` (fake engine): start-up messages, READY, idle and per-token watchdog pings, STOPPING,
    and the per-request log line."""
    # `broker` comes first: mosquitto itself sends READY=1 when it finds NOTIFY_SOCKET set.
    config = daemon_config(broker, write_prompts(tmp_path / "prompts"))
    config["model"] = str(write_model_dir(tmp_path / "model"))
    config["logging"] = {"level": "INFO", "format": "json"}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    tests_dir = str(Path(__file__).resolve().parent)
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "JOURNAL_STREAM")}
    env.update(PYTHONPATH=os.pathsep.join([tests_dir, env.get("PYTHONPATH", "")]), WATCHDOG_USEC="1000000",
               LLMQTT_FAKE_TOKEN_DELAY_S="0.15")
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, str(Path(tests_dir) / "fake_daemon.py"), "run", "--config",
                                    str(config_path)],
                                   env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        start = fake_systemd.receive_until("READY=1", timeout=60)
        assert start[0].startswith("EXTEND_TIMEOUT_USEC="), start
        assert "STATUS=loading model" in start
        client = broker.client()
        root = f"llmqtt/{config['mqtt']['node_id']}"
        wait_online(client, root)

        # Idle: pings go on well past the 1 s interval because the worker's idle wait beats.
        fake_systemd.receive_until("WATCHDOG=1", count=4, timeout=10)

        # A generation of 20 tokens x 0.15 s = 3 s, three times the interval: per-token beats keep pinging.
        client.subscribe(f"{root}/response/chat")
        client.publish(f"{root}/request/chat", {"id": "w1", "text": " ".join(["word"] * 19)})
        ping_times = pings_until(fake_systemd, lambda: not client.messages.empty(), timeout=30)
        assert client.expect_json(f"{root}/response/chat")["status"] == "ok"
        gaps = [b - a for a, b in zip(ping_times, ping_times[1:])]
        assert len(ping_times) >= 4 and max(gaps) < 1.5, f"watchdog pings stopped mid-generation: {gaps}"

        process.send_signal(signal.SIGTERM)
        fake_systemd.receive_until("STOPPING=1", timeout=30)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    (request,) = [line for line in lines if line.get("request_id") == "w1"]
    assert request["task"] == "chat" and request["status"] == "ok" and request["latency_ms"] >= 2000


def pings_until(fake_systemd: FakeSystemd, done, timeout: float) -> list[float]:
    """Arrival times of WATCHDOG=1 until `done()`; fails at the deadline."""
    deadline = time.monotonic() + timeout
    times: list[float] = []
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"not done within {timeout}s")
        if fake_systemd.receive(0.05) == "WATCHDOG=1":
            times.append(time.monotonic())
    return times
