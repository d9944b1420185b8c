"""Home Assistant discovery configs and sensor states, checked without a broker.

`HA_OPTIONS` is the set of options HA core's MQTT platforms accept (homeassistant/components/mqtt: schemas.py
MQTT_ENTITY_COMMON_SCHEMA, config.py MQTT_RO/RW_SCHEMA, sensor.py, text.py, binary_sensor.py, 2025.x). HA
validates discovery with `extra=REMOVE_EXTRA`: an option it does not know is dropped without a word, so
every option we send must be in this set. Templates are rendered in jinja2's immutable sandbox with HA's
limits (ha/templates.py), with HA's `value_json` / `value` variables and `now()`; test_homeassistant_real.py
renders them again in Home Assistant itself.
"""

from __future__ import annotations

import json
import re

import pytest
from fake_engine import write_prompts
from ha.templates import render

from llmqtt.extensions import ha_payloads as ha
from llmqtt.extensions.health import MachineReadings, build_health
from llmqtt.tasks import load_tasks

COMMON = {"availability", "availability_mode", "availability_template", "availability_topic", "payload_available",
          "payload_not_available", "device", "origin", "enabled_by_default", "entity_category", "entity_picture",
          "icon", "json_attributes_topic", "json_attributes_template", "object_id", "default_entity_id",
          "unique_id", "name", "qos", "encoding"}
HA_OPTIONS = {
    "sensor": COMMON | {"state_topic", "value_template", "device_class", "expire_after", "force_update",
                        "last_reset_value_template", "options", "suggested_display_precision", "state_class",
                        "unit_of_measurement"},
    "text": COMMON | {"command_topic", "command_template", "retain", "state_topic", "value_template", "max", "min",
                      "mode", "pattern", "optimistic"},
    "binary_sensor": COMMON | {"state_topic", "value_template", "device_class", "expire_after", "force_update",
                               "off_delay", "payload_on", "payload_off"},
}
REQUIRED = {"sensor": {"state_topic"}, "text": {"command_topic"}, "binary_sensor": {"state_topic"}}
DEVICE_OPTIONS = {"identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
                  "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url"}
AVAILABILITY_OPTIONS = {"topic", "payload_available", "payload_not_available", "value_template"}
# Units HA accepts for the device classes we use (SensorDeviceClass -> UnitOf...).
UNITS = {"duration": {"ms", "s", "min", "h", "d"}, "data_size": {"B", "kB", "MB", "GB", "KiB", "MiB", "GiB"},
         "temperature": {"°C", "°F", "K"}}
# HA's discovery topic rule (mqtt/discovery.py TOPIC_MATCHER).
DISCOVERY_TOPIC = re.compile(r"^homeassistant/(?P<component>\w+)/(?P<node_id>[a-zA-Z0-9_-]+)/"
                             r"(?P<object_id>[a-zA-Z0-9_-]+)/config$")


@pytest.fixture
def tasks(tmp_path):
    return load_tasks([write_prompts(tmp_path / "prompts")])


@pytest.fixture
def identity():
    return ha.Identity(node="kitchen", root="llmqtt/kitchen", prefix="homeassistant", model="fake-model",
                       version="0.1.0")


def test_one_config_per_entity_on_the_per_component_topic(identity, tasks):
    messages = ha.discovery_messages(identity, tasks)
    found = {(m["component"], m["object_id"]) for m in (DISCOVERY_TOPIC.match(t) for t in messages) if m}
    assert len(found) == len(messages)
    assert found == {("sensor", "chat"), ("sensor", "sentiment"), ("sensor", "topic"),
                     ("text", "chat_input"), ("text", "sentiment_input"), ("text", "topic_input"),
                     ("sensor", "chat_latency"), ("sensor", "sentiment_latency"), ("sensor", "topic_latency"),
                     ("sensor", "board_cpu"), ("sensor", "board_memory"), ("sensor", "board_swap"),
                     ("sensor", "board_temperature"), ("sensor", "board_queue_depth"),
                     ("sensor", "board_tokens_per_s"), ("binary_sensor", "status")}
    assert {DISCOVERY_TOPIC.match(t)["node_id"] for t in messages} == {"llmqtt_kitchen"}


def test_every_option_is_one_home_assistant_knows(identity, tasks):
    for topic, config in ha.discovery_messages(identity, tasks).items():
        component = DISCOVERY_TOPIC.match(topic)["component"]
        assert set(config) <= HA_OPTIONS[component], (topic, set(config) - HA_OPTIONS[component])
        assert REQUIRED[component] <= set(config), topic
        assert set(config["device"]) <= DEVICE_OPTIONS and config["device"]["identifiers"]
        assert set(config["origin"]) <= {"name", "sw_version", "support_url"} and config["origin"]["name"]
        for item in config.get("availability", []):
            assert set(item) <= AVAILABILITY_OPTIONS and "topic" in item
        if "unit_of_measurement" in config and config.get("device_class") in UNITS:
            assert config["unit_of_measurement"] in UNITS[config["device_class"]], topic
        assert config.get("entity_category", "diagnostic") in ("diagnostic", "config")


def test_shared_device_origin_and_availability(identity, tasks):
    configs = ha.discovery_messages(identity, tasks)
    devices = {json.dumps(c["device"], sort_keys=True) for c in configs.values()}
    assert len(devices) == 1
    device = json.loads(devices.pop())
    assert device == {"identifiers": ["llmqtt_kitchen"], "name": "llmqtt kitchen", "manufacturer": "llmqtt",
                      "model": "fake-model", "sw_version": "0.1.0"}
    assert all(c["origin"] == {"name": "llmqtt", "sw_version": "0.1.0"} for c in configs.values())
    for topic, config in configs.items():
        if topic.endswith("/status/config"):  # the connectivity sensor must read "off", not "unavailable"
            assert "availability" not in config
            continue
        assert config["availability"] == [{"topic": "llmqtt/kitchen/status", "value_template": "{{ value_json.state }}",
                                           "payload_available": "online", "payload_not_available": "offline"}]
        for state in ("online", "offline"):
            assert render(config["availability"][0]["value_template"], value_json={"state": state}) == state


def test_unique_ids_and_entity_ids_are_stable_and_readable(identity, tasks):
    first = ha.discovery_messages(identity, tasks)
    # Another run, another model: same topics, same ids; only the device's model changes.
    again = ha.discovery_messages(ha.Identity("kitchen", "llmqtt/kitchen", "homeassistant", "other", "0.2.0"), tasks)
    assert list(first) == list(again)
    for topic, config in first.items():
        component, object_id = DISCOVERY_TOPIC.match(topic).group("component", "object_id")
        assert config["unique_id"] == f"llmqtt_kitchen_{object_id}" == again[topic]["unique_id"]
        assert config["default_entity_id"] == f"{component}.llmqtt_kitchen_{object_id}"
        assert config["object_id"] == f"llmqtt_kitchen_{object_id}"
        assert len(config["name"]) <= 30 and not config["name"].startswith("llmqtt")  # HA prefixes the device name


def test_node_and_task_names_are_made_safe_for_topics_and_entity_ids(tasks):
    identity = ha.Identity(node="Küche-2", root="llmqtt/Küche-2", prefix="homeassistant", model="m", version="v")
    assert identity.node_id == "llmqtt_K_che-2"
    config = ha.discovery_payload(identity, ha.Entity("sensor", "my-task", {"state_topic": "x"}))
    assert config["default_entity_id"] == "sensor.llmqtt_k_che_2_my_task"
    assert DISCOVERY_TOPIC.match(identity.topics.discovery("sensor", identity.node_id, "my-task"))


def test_classify_sensor_is_an_enum_of_the_labels(identity, tasks):
    config = ha.discovery_messages(identity, tasks)["homeassistant/sensor/llmqtt_kitchen/topic/config"]
    assert config["device_class"] == "enum" and config["options"] == ["weather", "music", "other"]
    assert "state_class" not in config and "unit_of_measurement" not in config  # HA refuses options with these
    assert config["state_topic"] == config["json_attributes_topic"] == "llmqtt/kitchen/ha/topic/state"
    result = {"label": "music", "score": 0.9, "scores": {"weather": 0.05, "music": 0.9, "other": 0.05}}
    state = ha.result_state(tasks["topic"], "q1", "play jazz", result, source="homeassistant", latency_ms=4.0, ts=1.0)
    assert render(config["value_template"], value_json=state) == "music"
    assert state["score"] == 0.9 and state["text"] == "play jazz" and state["id"] == "q1"


def test_generate_state_is_cut_to_255_characters_with_the_whole_answer_in_attributes(identity, tasks):
    config = ha.discovery_messages(identity, tasks)["homeassistant/sensor/llmqtt_kitchen/chat/config"]
    assert "device_class" not in config and "options" not in config
    answer = "word " * 200
    state = ha.result_state(tasks["chat"], 7, "hi", {"text": answer, "finish_reason": "length", "tokens": 200},
                            source="mqtt", latency_ms=1.0, ts=1.0)
    shown = render(config["value_template"], value_json=state)
    assert len(shown) == ha.STATE_LIMIT and shown.endswith("…")
    assert state["answer"] == answer.strip() and state["finish_reason"] == "length"
    short = ha.result_state(tasks["chat"], 8, "hi", {"text": " Hello! "}, source="mqtt", latency_ms=1.0, ts=1.0)
    assert render(config["value_template"], value_json=short) == "Hello!"


def test_an_error_keeps_the_last_value_and_says_what_failed(tasks):
    good = ha.result_state(tasks["sentiment"], "a", "great", {"label": "positive", "score": 0.9, "scores": {}},
                           source="homeassistant", latency_ms=1.0, ts=1.0)
    failed = ha.error_state(good, "b", "<|im_start|>", {"code": "invalid_text", "message": "no"}, ts=2.0)
    assert failed["value"] == "positive" and failed["text"] == "great" and failed["id"] == "b"
    assert failed["status"] == "error" and failed["error"] == {"code": "invalid_text", "message": "no"}
    first = ha.error_state(None, "c", "x", {"code": "busy", "message": "queue full"}, ts=3.0)
    assert first["value"] is None  # renders "None": HA shows "unknown"


def test_diagnostic_sensors_read_the_health_snapshot(identity, tasks):
    stats = {"ok": 1, "error": 0, "errors_by_code": {}, "tokens_per_s": 11.5,
             "tasks": {"chat": {"ok": 1, "error": 0, "p50_ms": 120.0, "p95_ms": 130.0}}}
    machine = MachineReadings(cpu_percent=23.0, ram_total=4096 * 2**20, ram_available=1024 * 2**20,
                              swap_total=512 * 2**20, swap_free=256 * 2**20, rss=2**28, temperature_c=58.44)
    health = json.loads(json.dumps(build_health(machine, stats, queue_depth=2, sessions=0, uptime_s=1.0,
                                                model="m", dtype="float32", threads=2)))
    configs = ha.discovery_messages(identity, tasks)

    def shown(object_id: str, snapshot: dict) -> str:
        config = configs[f"homeassistant/sensor/llmqtt_kitchen/{object_id}/config"]
        assert config["entity_category"] == "diagnostic" and config["state_topic"] == "llmqtt/kitchen/health"
        return render(config["value_template"], value_json=snapshot)

    assert shown("board_cpu", health) == "23.0" and shown("board_memory", health) == "3072.0"
    assert shown("board_swap", health) == "256.0" and shown("board_temperature", health) == "58.4"
    assert shown("board_queue_depth", health) == "2" and shown("board_tokens_per_s", health) == "11.5"
    assert shown("chat_latency", health) == "120.0"
    assert shown("sentiment_latency", health) == "None"  # no answers yet: HA shows "unknown"
    empty = json.loads(json.dumps(build_health(MachineReadings(), {**stats, "tokens_per_s": None}, queue_depth=0,
                                               sessions=0, uptime_s=0, model="m", dtype="x", threads=None)))
    assert shown("board_temperature", empty) == "None" and shown("board_tokens_per_s", empty) == "None"


def test_connectivity_sensor_follows_the_status_topic(identity, tasks):
    config = ha.discovery_messages(identity, tasks)["homeassistant/binary_sensor/llmqtt_kitchen/status/config"]
    assert config["device_class"] == "connectivity" and config["state_topic"] == "llmqtt/kitchen/status"
    shown = {s: render(config["value_template"], value_json={"state": s}) for s in ("online", "stopping", "offline")}
    assert shown == {"online": "ON", "stopping": "OFF", "offline": "OFF"}


@pytest.mark.parametrize("text", ['He said "hi"\nthen left', "房间干净", "{{ not a template }}", "back\\slash"])
def test_text_entity_command_template_builds_a_valid_request(identity, tasks, text):
    configs = ha.discovery_messages(identity, tasks)
    config = configs["homeassistant/text/llmqtt_kitchen/chat_input/config"]
    assert config["command_topic"] == "llmqtt/kitchen/ha/chat/request" and config["max"] == 255
    request = json.loads(render(config["command_template"], value=text))
    assert request["text"] == text and request["session"] == "homeassistant" and "reply_to" not in request
    assert re.fullmatch(r"ha-\d{16}-\d{1,3}", request["id"])
    ids = {json.loads(render(config["command_template"], value=text))["id"] for _ in range(20)}
    assert len(ids) == 20  # microseconds plus a random number: quick requests differ
    sentiment = configs["homeassistant/text/llmqtt_kitchen/sentiment_input/config"]
    assert "session" not in json.loads(render(sentiment["command_template"], value=text))


def test_a_task_colliding_with_another_entity_is_left_out(identity, tasks, caplog):
    clashing = {**tasks, "board_cpu": tasks["sentiment"]}
    messages = ha.discovery_messages(identity, clashing)
    assert messages["homeassistant/sensor/llmqtt_kitchen/board_cpu/config"]["device_class"] == "enum"
    assert "defined twice" in caplog.text


def test_only_configs_with_our_unique_id_count_as_ours(identity):
    assert ha.is_ours(identity, b'{"unique_id": "llmqtt_kitchen_gone"}')
    assert ha.is_ours(identity, b'{"uniq_id": "llmqtt_kitchen_gone"}')
    assert not ha.is_ours(identity, b'{"unique_id": "zigbee_kitchen_lamp"}')
    assert not ha.is_ours(identity, b'{"unique_id": "llmqtt_kitchenette_x"}')
    assert not ha.is_ours(identity, b"not json") and not ha.is_ours(identity, b"[1]")


def test_no_template_needs_more_than_home_assistants_sandbox(identity, tasks):
    """HA's sandbox refuses `range()` over 100,000 items (what broke every text box in 2024.1-2025.x)."""
    with pytest.raises(OverflowError):
        render("{{ range(100000, 1000001) | random }}")
    texts = [c for t, c in ha.discovery_messages(identity, tasks).items() if "/text/" in t]
    assert len(texts) == len(tasks)
    for config in texts:  # the value templates are rendered in the tests above, in the same sandbox
        assert json.loads(render(config["command_template"], value="hi"))["text"] == "hi"
