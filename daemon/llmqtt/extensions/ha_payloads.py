"""Home Assistant MQTT discovery configs and sensor states, built from the task list. Pure: no MQTT, no clock.

One entity is one retained config on `<prefix>/<component>/<node_id>/<object_id>/config` (HA's per-component
form); every config carries the same device and origin blocks, so HA groups them under one device. The
option names are HA's full ones (HA also accepts abbreviations; full names are easier to read in a broker
browser). Options checked against HA core's MQTT schemas (sensor, text, binary_sensor, common schema):
see docs/homeassistant.md.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..mqtt.topics import Topics
from ..tasks import ClassifyTask, GenerateTask

log = logging.getLogger(__name__)

STATE_LIMIT = 255  # HA ignores a state longer than this (MAX_LENGTH_STATE_STATE)
TEXT_ATTRIBUTE_LIMIT = 1000  # the request text echoed in attributes; HA's recorder skips attributes over 16 KiB
SOURCE_HA = "homeassistant"  # the request came on the HA request topic (only HA's broker user may write it)
SOURCE_OTHER = "mqtt"  # any other client's request, shown only with update_from_all_requests
HA_SESSION = "homeassistant"  # dashboard chats share one conversation per generate task

Task = ClassifyTask | GenerateTask


@dataclass(frozen=True)
class Identity:
    """What ties every entity of one daemon together: node, topics, device and origin facts."""

    node: str  # mqtt.node_id
    root: str  # <base_topic>/<node>
    prefix: str  # HA's discovery prefix
    model: str
    version: str
    support_url: str | None = None

    @property
    def node_id(self) -> str:
        """The discovery topic's node segment and the unique-id prefix. HA only accepts [a-zA-Z0-9_-] there;
        the `llmqtt_` prefix keeps us clear of other tools that name their node after the host."""
        return "llmqtt_" + re.sub(r"[^A-Za-z0-9_-]", "_", self.node)

    @property
    def topics(self) -> Topics:
        return Topics(root=self.root, discovery_prefix=self.prefix)


@dataclass(frozen=True)
class Entity:
    component: str  # sensor | text | binary_sensor
    object_id: str  # unique per component and node
    options: dict[str, Any] = field(default_factory=dict)
    available_with_daemon: bool = True  # False: no availability block (the connectivity sensor must show "off")


# -- entities ---------------------------------------------------------------------------------------

def entities(identity: Identity, tasks: Mapping[str, Task]) -> list[Entity]:
    out: list[Entity] = []
    for name, task in sorted(tasks.items()):
        out += [result_sensor(identity, name, task), request_text(identity, name, task), latency_sensor(identity, name)]
    return out + board_sensors(identity) + [connectivity(identity)]


def result_sensor(identity: Identity, name: str, task: Task) -> Entity:
    topic = identity.topics.ha_state(name)
    options: dict[str, Any] = {"name": _title(name), "state_topic": topic, "value_template": "{{ value_json.value }}",
                               "json_attributes_topic": topic}
    if isinstance(task, ClassifyTask):
        # enum: HA refuses a state that is not one of the options, and the classifier only ever answers a label.
        options.update(device_class="enum", options=list(task.labels), icon="mdi:tag-text-outline")
    else:
        options["icon"] = "mdi:robot-outline"
    return Entity("sensor", name, options)


def request_text(identity: Identity, name: str, task: Task) -> Entity:
    """A text box on the dashboard: typing into it sends a request on HA's own request topic; the answer (or
    the error) lands in the result sensor."""
    return Entity("text", f"{name}_input", {
        "name": f"{_title(name)} input",
        "command_topic": identity.topics.ha_request(name),
        "command_template": command_template(isinstance(task, GenerateTask)),
        "min": 1, "max": STATE_LIMIT, "mode": "text", "qos": 1, "retain": False,
        "icon": "mdi:message-text-outline",
    })


def command_template(with_session: bool) -> str:
    """HA renders this with the typed text as `value`: a JSON request with a fresh id and the text escaped by
    `tojson`. The id is HA's clock in microseconds plus a number below 1000, so two quick requests differ.
    Only what HA's sandbox allows: its `range` refuses more than 100,000 items (jinja2's MAX_RANGE), so no
    `range(100000, 1000000)`."""
    parts = ['"id": "ha-{{ (now().timestamp() * 1000000) | int }}-{{ range(1000) | random }}"',
             '"text": {{ value | tojson }}']
    if with_session:
        parts.append(f'"session": {json.dumps(HA_SESSION)}')
    return "{" + ", ".join(parts) + "}"


def latency_sensor(identity: Identity, name: str) -> Entity:
    # `.get`: the health snapshot lists a task only once it has answered something.
    template = "{{ (value_json.tasks.get('%s') or {}).get('p50_ms') }}" % name
    return Entity("sensor", f"{name}_latency", _diagnostic(identity, f"{_title(name)} latency p50", template,
                                                          device_class="duration", unit_of_measurement="ms",
                                                          icon="mdi:timer-outline"))


# (object id, name, value template over the health JSON, extra options); field names as in health.build_health.
_BOARD: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("cpu", "CPU", "{{ value_json.cpu_percent }}", {"unit_of_measurement": "%", "icon": "mdi:cpu-64-bit"}),
    ("memory", "Memory used", "{{ value_json.memory.used_mb }}",
     {"device_class": "data_size", "unit_of_measurement": "MiB", "icon": "mdi:memory"}),
    ("swap", "Swap used", "{{ value_json.swap.used_mb }}",
     {"device_class": "data_size", "unit_of_measurement": "MiB", "icon": "mdi:swap-horizontal"}),
    ("temperature", "Temperature", "{{ value_json.temperature_c }}",
     {"device_class": "temperature", "unit_of_measurement": "°C"}),
    ("queue_depth", "Queue depth", "{{ value_json.queue_depth }}", {"icon": "mdi:tray-full"}),
    ("tokens_per_s", "Tokens per second", "{{ value_json.tokens_per_s }}",
     {"unit_of_measurement": "tokens/s", "icon": "mdi:speedometer"}),
)


def board_sensors(identity: Identity) -> list[Entity]:
    return [Entity("sensor", f"board_{key}", _diagnostic(identity, name, template, **extra))
            for key, name, template, extra in _BOARD]


def _diagnostic(identity: Identity, name: str, template: str, **extra: Any) -> dict[str, Any]:
    # A null reading renders as "None", which HA takes as "unknown" (no temperature sensor, no swap).
    return {"name": name, "state_topic": identity.topics.health, "value_template": template,
            "state_class": "measurement", "entity_category": "diagnostic", **extra}


def connectivity(identity: Identity) -> Entity:
    # `stopping` counts as disconnected: the daemon takes no new requests then.
    return Entity("binary_sensor", "status", {
        "name": "Status", "device_class": "connectivity", "entity_category": "diagnostic",
        "state_topic": identity.topics.status,
        "value_template": "{{ 'ON' if value_json.state == 'online' else 'OFF' }}",
    }, available_with_daemon=False)


def _title(name: str) -> str:
    return re.sub(r"[_-]+", " ", name).strip().capitalize()


# -- discovery configs ------------------------------------------------------------------------------

def unique_id(identity: Identity, entity: Entity) -> str:
    return f"{identity.node_id}_{entity.object_id}"


def discovery_payload(identity: Identity, entity: Entity) -> dict[str, Any]:
    uid = unique_id(identity, entity)
    slug = re.sub(r"[^a-z0-9_]", "_", uid.lower())
    payload = {
        **entity.options,
        "unique_id": uid,
        # HA >= 2025.10 reads default_entity_id (domain included); older versions read object_id, which
        # 2026.4 ignores. Both together raise no warning in either.
        "default_entity_id": f"{entity.component}.{slug}",
        "object_id": slug,
        "device": device_block(identity),
        "origin": origin_block(identity),
    }
    if entity.available_with_daemon:
        payload["availability"] = [{"topic": identity.topics.status, "value_template": "{{ value_json.state }}",
                                    "payload_available": "online", "payload_not_available": "offline"}]
    return payload


def device_block(identity: Identity) -> dict[str, Any]:
    return {"identifiers": [identity.node_id], "name": f"llmqtt {identity.node}", "manufacturer": "llmqtt",
            "model": identity.model, "sw_version": identity.version}


def origin_block(identity: Identity) -> dict[str, Any]:
    origin: dict[str, Any] = {"name": "llmqtt", "sw_version": identity.version}
    if identity.support_url:
        origin["support_url"] = identity.support_url
    return origin


def discovery_messages(identity: Identity, tasks: Mapping[str, Task]) -> dict[str, dict[str, Any]]:
    """Discovery topic -> config, for every entity. A task whose name collides with another entity's object id
    (a task called `board_cpu`, or `x_latency` next to `x`) keeps the first and logs the clash."""
    messages: dict[str, dict[str, Any]] = {}
    for entity in entities(identity, tasks):
        topic = identity.topics.discovery(entity.component, identity.node_id, entity.object_id)
        if topic in messages:
            log.error("Home Assistant entity %s/%s is defined twice (rename the task); keeping the first",
                      entity.component, entity.object_id)
            continue
        messages[topic] = discovery_payload(identity, entity)
    return messages


def is_ours(identity: Identity, payload: bytes) -> bool:
    """A retained config that this node published (in this run or an earlier one): its unique id says so."""
    try:
        config = json.loads(payload)
    except ValueError:
        return False
    if not isinstance(config, dict):
        return False
    uid = config.get("unique_id", config.get("uniq_id"))
    return isinstance(uid, str) and uid.startswith(f"{identity.node_id}_")


# -- sensor states ----------------------------------------------------------------------------------

def result_state(task: Task, request_id: str | int, text: str, result: Mapping[str, Any], *, source: str,
                 latency_ms: float, ts: float) -> dict[str, Any]:
    """What a result sensor shows (`value`, at most STATE_LIMIT characters) and its attributes."""
    state: dict[str, Any] = {"value": None, "id": request_id, "status": "ok", "text": _clip(text), "source": source,
                             "latency_ms": latency_ms, "ts": ts}
    if isinstance(task, ClassifyTask):
        state.update(value=result["label"], score=result["score"], scores=result["scores"])
        return state
    answer = str(result.get("text", "")).strip()
    state.update(value=_clip(answer, STATE_LIMIT), answer=answer, finish_reason=result.get("finish_reason"),
                 tokens=result.get("tokens"), tokens_per_s=result.get("tokens_per_s"))
    return state


def error_state(previous: Mapping[str, Any] | None, request_id: str | int | None, text: str,
                error: Mapping[str, Any], *, ts: float) -> dict[str, Any]:
    """A failed request from HA, refused or not: the sensor keeps its last good value and attributes (an enum
    sensor cannot show an error), and `status`/`error`/`id` tell the waiting script what happened."""
    base = dict(previous) if previous else {"value": None, "text": _clip(text), "source": SOURCE_HA}
    return {**base, "id": request_id, "status": "error", "error": dict(error), "ts": ts}


def _clip(text: str, limit: int = TEXT_ATTRIBUTE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
