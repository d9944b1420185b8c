"""GET /metrics: the health telemetry (the MQTT health topic's snapshot) as Prometheus text, pure."""

from __future__ import annotations

MiB = 2**20


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}" if labels else ""


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._declared: set[str] = set()

    def metric(self, name: str, kind: str, help_text: str, value: float | int | None, **labels: object) -> None:
        if name not in self._declared:
            self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            self._declared.add(name)
        if value is not None:
            self.lines.append(f"{name}{_labels(**labels)} {value:g}" if isinstance(value, float)
                              else f"{name}{_labels(**labels)} {value}")


def _mb_to_bytes(value: float | None) -> int | None:
    return None if value is None else int(value * MiB)


def prometheus(health: dict, ready: bool, conversation_cache: dict | None = None) -> str:
    """`health` is extensions.health.build_health's snapshot."""
    w = _Writer()
    w.metric("llmqtt_ready", "gauge", "1 once the model is warm and serving", int(ready))
    w.metric("llmqtt_model_info", "gauge", "the model being served", 1, model=health["model"], dtype=health["dtype"])
    w.metric("llmqtt_uptime_seconds", "gauge", "seconds since start", float(health["uptime_s"]))
    w.metric("llmqtt_queue_depth", "gauge", "requests waiting for the worker", health["queue_depth"])
    w.metric("llmqtt_sessions", "gauge", "chat sessions kept", health["sessions"])
    for task, stats in sorted(health["tasks"].items()):
        w.metric("llmqtt_requests_total", "counter", "answered requests by task and outcome", stats["ok"],
                 task=task, status="ok")
        w.metric("llmqtt_requests_total", "counter", "", stats["error"], task=task, status="error")
    for task, stats in sorted(health["tasks"].items()):
        for quantile, key in (("0.5", "p50_ms"), ("0.95", "p95_ms")):
            value = stats.get(key)
            w.metric("llmqtt_request_latency_seconds", "gauge", "recent request latency percentiles",
                     None if value is None else float(value) / 1000, task=task, quantile=quantile)
    for code, count in sorted(health["errors_by_code"].items()):
        w.metric("llmqtt_errors_total", "counter", "error replies by code", count, code=code)
    w.metric("llmqtt_tokens_per_second", "gauge", "recent generation speed", health["tokens_per_s"])
    w.metric("llmqtt_cpu_percent", "gauge", "machine CPU use", health["cpu_percent"])
    w.metric("llmqtt_memory_used_bytes", "gauge", "machine memory in use", _mb_to_bytes(health["memory"]["used_mb"]))
    w.metric("llmqtt_memory_available_bytes", "gauge", "machine memory available",
             _mb_to_bytes(health["memory"]["available_mb"]))
    w.metric("llmqtt_swap_used_bytes", "gauge", "swap in use", _mb_to_bytes(health["swap"]["used_mb"]))
    w.metric("llmqtt_process_resident_bytes", "gauge", "daemon resident memory", _mb_to_bytes(health["rss_mb"]))
    w.metric("llmqtt_temperature_celsius", "gauge", "CPU temperature", health["temperature_c"])
    if conversation_cache:
        w.metric("llmqtt_conversation_cache_entries", "gauge", "conversations whose KV is kept",
                 conversation_cache["entries"])
        w.metric("llmqtt_conversation_cache_hits_total", "counter", "requests that went on from a kept "
                 "conversation", conversation_cache["hits"])
    return "\n".join(w.lines) + "\n"
