"""deploy/homeassistant without Home Assistant: every template rendered in HA's sandbox (ha/templates.py; the
MQTT trigger's topic and payload as HA's "limited" templates), and the script's steps played against a real
broker and daemon as HA would run them (the MQTT trigger matches when its value_template, rendered on a
message, equals its rendered payload). test_homeassistant_real.py runs the same files in Home Assistant."""

from __future__ import annotations

import ast
import json

import pytest
import yaml
from ha.templates import render, templates_in

DEPLOY = "deploy/homeassistant"
CONTEXT = {"id": "01JD4X2V5W7K3M9Q8R6T0Y1ZAB"}  # a run's context id: a ULID
# A request's state as the daemon publishes it, and an error state.
STATE = {"value": "negative", "id": "ha-script-" + CONTEXT["id"], "status": "ok", "text": "x", "score": 0.93,
         "scores": {"positive": 0.07, "negative": 0.93}, "source": "homeassistant", "latency_ms": 4.0, "ts": 1.0}
ERROR_STATE = {**STATE, "status": "error", "error": {"code": "too_long", "message": "text: 300 characters"}}
# Everything a template of ours may see where HA renders it.
VARIABLES = {"task": "sentiment", "text": 'He said "hi"', "node": "", "context": CONTEXT, "root": "llmqtt/kitchen",
             "request_id": STATE["id"], "value_json": STATE, "state": STATE,
             "wait": {"trigger": {"payload_json": STATE}},
             "trigger": {"payload": "The parcel arrived broken"},
             "sentiment": {"status": "ok", "value": "negative", "score": 0.93},
             "state_attr": lambda entity_id, name: "The parcel arrived broken"}  # HA's, in full templates
LIMITED = (".topic", ".payload")  # in an MQTT trigger: rendered with limited=True (no now(), no states)


@pytest.fixture
def script(repo_root) -> dict:
    return yaml.safe_load((repo_root / DEPLOY / "script.yaml").read_text(encoding="utf-8"))["llmqtt_ask"]


@pytest.fixture
def automations(repo_root) -> list:
    return yaml.safe_load((repo_root / DEPLOY / "automation.yaml").read_text(encoding="utf-8"))


def test_every_template_renders_in_home_assistants_sandbox(script, automations):
    found = templates_in(script, "script") + templates_in(automations, "automations")
    assert len(found) >= 10
    for path, template in found:
        in_trigger = ".wait_for_trigger" in path or ".triggers" in path
        limited = in_trigger and path.endswith(LIMITED)
        try:
            render(template, limited=limited, **VARIABLES)
        except Exception as exc:  # noqa: BLE001 - name the template that failed
            raise AssertionError(f"{path}: {template!r} fails in HA's sandbox: {exc!r}") from exc


def triggered(trigger: dict, variables: dict, payload: bytes) -> bool:
    """HA's MQTT trigger: value_template over the message, compared with the rendered payload."""
    try:
        value_json = json.loads(payload)
    except ValueError:
        return False
    return render(trigger["value_template"], value_json=value_json) == render(trigger["payload"], limited=True,
                                                                              **variables)


def script_request(script: dict, **fields) -> tuple[dict, str, str]:
    """The variables the script sets, the topic it publishes to and the payload."""
    steps = script["sequence"]
    variables = {"context": CONTEXT, **fields}
    variables.update({k: render(v, **variables) for k, v in steps[0]["variables"].items()})
    publish = steps[1]["data"]
    return variables, render(publish["topic"], **variables), render(publish["payload"], **variables)


@pytest.mark.broker
def test_the_script_gets_its_answer_even_when_it_arrived_before_the_wait(broker, start_daemon, script):
    daemon = start_daemon(node_id="kitchen", homeassistant={"enabled": True})
    variables, topic, payload = script_request(script, task="sentiment", text='The "new" kettle leaks', node="")
    assert variables["root"] == daemon.topics.root and topic == daemon.topics.ha_request("sentiment")
    assert json.loads(payload) == {"id": f"ha-script-{CONTEXT['id']}", "text": 'The "new" kettle leaks'}
    client = broker.client().subscribe(daemon.topics.ha_state("sentiment"))
    client.publish(topic, payload)
    client.expect_json(where=lambda r: r.get("id") == variables["request_id"])  # answered before the wait below
    [state_trigger] = script["sequence"][2]["wait_for_trigger"]
    late = broker.client().subscribe(render(state_trigger["topic"], limited=True, **variables))
    [answer] = [m for m in late.drain(quiet_s=0.3) if triggered(state_trigger, variables, m.payload)]
    state = json.loads(answer.payload)
    # HA turns a rendered dict back into one (literal_eval, its parse_result).
    response = ast.literal_eval(render(script["sequence"][5]["variables"]["answer"], state=state))
    assert response["status"] == "ok" and response["value"] == "negative" and response["text"] == variables["text"]


def test_an_error_answer_carries_only_the_error(script):
    template = script["sequence"][5]["variables"]["answer"]
    shown = render(template, state=ERROR_STATE)
    assert "negative" not in shown and "too_long" in shown and ERROR_STATE["id"] in shown


def test_the_script_returns_a_mapping_on_timeout(script):
    on_timeout = script["sequence"][3]
    assert on_timeout["if"] == "{{ wait.trigger is none }}"
    assert on_timeout["then"][1] == {"stop": "llmqtt did not answer", "response_variable": "answer"}
    assert set(on_timeout["then"][0]["variables"]["answer"]) == {"id", "status", "error"}
    assert script["sequence"][-1] == {"stop": "llmqtt answered", "response_variable": "answer"}
    assert script["mode"] == "parallel"  # queued scripts return an empty response before HA 2025


def test_the_automations_use_the_script_response_and_the_sensor(automations):
    ask, sensor = automations
    assert ask["actions"][0]["action"] == "script.llmqtt_ask" and ask["actions"][0]["response_variable"] == "sentiment"
    condition = ask["actions"][1]["value_template"]
    negative = {"status": "ok", "value": "negative", "score": 0.93}
    assert render(condition, sentiment=negative) == "True"
    assert render(condition, sentiment={"status": "error", "error": {"code": "timeout"}}) == "False"
    assert sensor["triggers"][0]["entity_id"] == "sensor.llmqtt_kitchen_sentiment"
