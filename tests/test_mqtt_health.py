"""The health snapshot, built without a broker or a real machine."""

from __future__ import annotations

import psutil

from llmqtt.extensions.health import MachineReadings, build_health, read_machine

MiB = 2**20
STATS = {"ok": 5, "error": 1, "errors_by_code": {"busy": 1}, "tokens_per_s": 12.5,
         "tasks": {"chat": {"ok": 5, "error": 1, "p50_ms": 100.0, "p95_ms": 250.0}}}


def test_build_health():
    machine = MachineReadings(cpu_percent=37.5, ram_total=4096 * MiB, ram_available=1024 * MiB,
                              swap_total=512 * MiB, swap_free=512 * MiB, rss=800 * MiB, temperature_c=61.234)
    health = build_health(machine, STATS, queue_depth=3, sessions=2, uptime_s=12.345, model="m", dtype="float32",
                          threads=3, decode="pending")
    assert health["memory"] == {"used_mb": 3072.0, "available_mb": 1024.0, "total_mb": 4096.0}
    assert health["swap"] == {"used_mb": 0.0, "free_mb": 512.0}
    assert health["rss_mb"] == 800.0 and health["temperature_c"] == 61.2 and health["cpu_percent"] == 37.5
    assert health["queue_depth"] == 3 and health["sessions"] == 2 and health["uptime_s"] == 12.3
    assert health["ok"] == 5 and health["error"] == 1 and health["tasks"]["chat"]["p95_ms"] == 250.0
    assert (health["model"], health["dtype"], health["threads"], health["tokens_per_s"]) == ("m", "float32", 3, 12.5)
    assert health["decode"] == "pending"


def test_unreadable_values_are_null():
    health = build_health(MachineReadings(), STATS, queue_depth=0, sessions=0, uptime_s=0, model="m", dtype="x",
                          threads=None)
    assert health["memory"] == {"used_mb": None, "available_mb": None, "total_mb": None}
    assert health["temperature_c"] is None and health["rss_mb"] is None


def test_read_machine_on_this_machine():
    machine = read_machine(psutil.Process())
    assert machine.rss > 0 and machine.ram_total > 0 and machine.ram_available > 0
