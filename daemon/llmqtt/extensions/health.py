"""Health telemetry: a retained JSON snapshot on `<root>/health` every `mqtt.health_interval_s`.

`build_health` is pure (readings in, dict out) so it is tested without a broker or a machine;
`read_machine` is the only part that asks psutil / sysfs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil

from ..mqtt.messages import encode
from ..mqtt.topics import Topics
from ..mqtt.transport import MqttTransport
from ..readings import read_memory, read_temperature
from ..jobs import JobQueue

log = logging.getLogger(__name__)
MiB = 2**20


@dataclass(frozen=True)
class MachineReadings:
    cpu_percent: float | None = None
    ram_total: int | None = None
    ram_available: int | None = None
    swap_total: int | None = None
    swap_free: int | None = None
    rss: int | None = None
    temperature_c: float | None = None


def read_machine(process: psutil.Process) -> MachineReadings:
    """One reading of this machine and process; anything unreadable is None."""
    memory = read_memory()
    temperature, _sensor = read_temperature()
    try:
        rss = process.memory_info().rss
        cpu = psutil.cpu_percent(interval=None)  # since the previous call: the health interval
    except (psutil.Error, OSError):
        rss, cpu = None, None
    return MachineReadings(cpu_percent=cpu, rss=rss, temperature_c=temperature, **memory)


def build_health(machine: MachineReadings, service_stats: dict, *, queue_depth: int, sessions: int,
                 uptime_s: float, model: str, dtype: str, threads: int | None,
                 memory_state: str | None = None, decode: str | None = None) -> dict:
    def mb(value: int | None) -> float | None:
        return None if value is None else round(value / MiB, 1)

    def used(total: int | None, free: int | None) -> int | None:
        return None if total is None or free is None else total - free

    return {
        "cpu_percent": machine.cpu_percent,
        "memory": {"used_mb": mb(used(machine.ram_total, machine.ram_available)),
                   "available_mb": mb(machine.ram_available), "total_mb": mb(machine.ram_total)},
        "swap": {"used_mb": mb(used(machine.swap_total, machine.swap_free)), "free_mb": mb(machine.swap_free)},
        "rss_mb": mb(machine.rss),
        "memory_state": memory_state,  # "low": batches halved and generation refused until memory recovers
        "temperature_c": None if machine.temperature_c is None else round(machine.temperature_c, 1),
        "queue_depth": queue_depth,
        "sessions": sessions,
        "ok": service_stats["ok"],
        "error": service_stats["error"],
        "errors_by_code": service_stats["errors_by_code"],
        "tasks": service_stats["tasks"],  # per task: ok, error, p50_ms, p95_ms
        "tokens_per_s": service_stats["tokens_per_s"],
        "uptime_s": round(uptime_s, 1),
        "model": model,
        "dtype": dtype,
        "threads": threads,
        "decode": decode,  # the compiled decode step: "pending" (chats decode eagerly, slower), "ready", "failed", "off"
        "ts": round(time.time(), 3),
    }


class HealthExtension:
    name = "health"

    def __init__(self, transport: MqttTransport, topics: Topics, service: JobQueue, interval_s: float,
                 threads: int | None, started: float,
                 read: Callable[[], MachineReadings] | None = None,
                 memory_state: Callable[[], str] | None = None):
        self.transport = transport
        self.topics = topics
        self.service = service
        self.interval_s = interval_s
        self.threads = threads
        self.started = started  # time.monotonic() when the daemon started
        self.memory_state = memory_state  # MemoryGuard.state, when the planner runs
        self._read = read or (lambda: read_machine(self._process))
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._wake = threading.Event()  # publish now: on (re)connect and at stop
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline
        self.transport.add_connect_listener(self._wake.set)
        self._thread = threading.Thread(target=self._run, name="llmqtt-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def snapshot(self) -> dict:
        service = self.service.health()
        return build_health(self._read(), service.stats, queue_depth=service.queue_depth,
                            sessions=service.sessions, uptime_s=time.monotonic() - self.started,
                            model=service.model, dtype=service.dtype, threads=self.threads,
                            memory_state=self.memory_state() if self.memory_state else None, decode=service.decode)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.transport.connected.is_set():  # while offline, a stale snapshot is not worth queueing
                self.publish()

    def publish(self) -> None:
        try:
            self.transport.publish(self.topics.health, encode(self.snapshot()), qos=0, retain=True)
        except Exception:  # telemetry must never take the daemon down
            log.exception("publishing the health snapshot failed")
