import json

import pytest

from llmqtt.config import MqttConfig
from llmqtt.mqtt.messages import (BadRequest, Limits, Request, chunk_message, encode, error_reply, ok_reply,
                                  parse_cancel, parse_request)
from llmqtt.mqtt.topics import Topics

LIMITS = Limits(max_payload_bytes=200, max_text_chars=50)


def parse(payload, **kwargs):
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return parse_request(payload, "chat", LIMITS, **kwargs)


def test_json_request_all_fields():
    req = parse({"id": "r1", "text": "hello", "reply_to": "me/inbox", "session": "s", "stream": True,
                 "deadline_ms": 500, "max_new_tokens": 20, "future_field": 1})
    assert req == Request(task="chat", id="r1", text="hello", reply_to="me/inbox", session="s", stream=True,
                          deadline_ms=500, max_new_tokens=20)


def test_integer_ids_are_kept_as_sent():
    assert parse({"id": 7, "text": "x"}).id == 7


def test_plain_text_gets_a_generated_id():
    a, b = parse("the kitchen is too warm"), parse("[1, 2]")
    assert isinstance(a, Request) and a.text == "the kitchen is too warm" and a.id
    assert b.text == "[1, 2]" and a.id != b.id


def test_json_without_id_gets_one():
    assert parse({"text": "x"}).id


def test_response_topic_and_correlation_data_win_over_reply_to():
    req = parse({"id": 1, "text": "x", "reply_to": "a/b"}, response_topic="c/d", correlation_data=b"\x01")
    assert req.reply_to == "c/d" and req.correlation_data == b"\x01"
    # the route is not judged here (mqtt.routes does): an unusable Response Topic is kept, to be refused
    req = parse({"id": 1, "text": "x", "reply_to": "a/b"}, response_topic="bad/#")
    assert req.reply_to == "bad/#"


@pytest.mark.parametrize("payload, code, field", [
    ("{not json", "bad_json", None),
    ('  {"id": 1', "bad_json", None),
    ('{"id": 1}', "bad_request", "text"),
    ('{"id": 1, "text": 5}', "bad_request", "text"),
    ('{"id": 1, "text": "x", "stream": "yes"}', "bad_request", "stream"),
    ('{"id": true, "text": "x"}', "bad_request", "id"),
    ('{"id": [1], "text": "x"}', "bad_request", "id"),
    ('{"id": 1, "text": "x", "deadline_ms": 0}', "bad_request", "deadline_ms"),
    ('{"id": 1, "text": "x", "max_new_tokens": "5"}', "bad_request", "max_new_tokens"),
    ('{"id": 1, "text": "x", "reply_to": 5}', "bad_request", "reply_to"),
    ('{"id": 1, "text": "x", "session": ""}', "bad_request", "session"),
    ('{"id": 1, "text": "   "}', "bad_request", "text"),
    ("", "bad_request", "text"),
    ('{"id": 1, "text": "' + "x" * 51 + '"}', "too_long", "text"),
    ("y" * 201, "too_long", "payload"),
])
def test_bad_requests_are_coded_and_name_the_field(payload, code, field):
    bad = parse(payload)
    assert isinstance(bad, BadRequest) and bad.code == code and bad.task == "chat"
    if field:
        assert field in bad.message


@pytest.mark.parametrize("payload, message", [
    ('{"a":' * 3000, "nested too deeply"),  # 15 KB: json's parser recurses once per level
    ('{"text": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ('{"id": 1' + "0" * 5000 + ', "text": "x"}', "digits"),
])
def test_hostile_json_is_bad_json_not_a_crash(payload, message):
    bad = parse_request(payload.encode(), "chat", Limits(max_payload_bytes=16384, max_text_chars=50))
    assert bad.code == "bad_json" and message in bad.message
    assert parse_cancel(payload.encode()) is None


def test_invalid_utf8():
    bad = parse(b'{"id": 1, "text": "\xff\xfe"}')
    assert bad.code == "bad_encoding"


def test_escaped_lone_surrogates_are_bad_encoding_not_an_unencodable_reply():
    for payload in (r'{"id": 1, "text": "a\ud800b"}', r'{"id": "\udfff", "text": "x"}'):
        bad = parse(payload)
        assert bad.code == "bad_encoding" and bad.id is None
        encode(error_reply("chat", bad.id, bad.code, bad.message, model="m"))  # the error reply itself encodes
    assert parse(r'{"id": 1, "text": "a\ud83d\ude00b"}').text == "a\U0001F600b"  # a surrogate *pair* is fine


def test_errors_keep_the_valid_id_and_reply_route():
    bad = parse({"id": "keep", "text": 3, "reply_to": "dev/1"})
    assert (bad.id, bad.reply_to) == ("keep", "dev/1")
    bad = parse({"id": {"x": 1}, "text": 3, "reply_to": ["dev"]})
    assert (bad.id, bad.reply_to) == (None, None)
    bad = parse("{oops", response_topic="rt/1", correlation_data=b"c")
    assert (bad.reply_to, bad.correlation_data) == ("rt/1", b"c")


def test_cancel_payloads():
    assert parse_cancel(b"abc") == "abc"
    assert parse_cancel(b'{"id": 5}') == 5
    assert parse_cancel(b'{"id": true}') is None
    assert parse_cancel(b"{bad") is None
    assert parse_cancel(b"  ") is None
    assert parse_cancel(b"\xff") is None


def test_reply_builders():
    ok = ok_reply("sentiment", "1", {"label": "positive"}, model="m", latency_ms=3.0, queue_ms=1.0)
    assert ok == {"id": "1", "task": "sentiment", "status": "ok", "result": {"label": "positive"},
                  "latency_ms": 3.0, "queue_ms": 1.0, "model": "m"}
    err = error_reply("chat", None, "busy", "full", model="m", details={"retry_after_ms": 200})
    assert err["status"] == "error" and err["error"] == {"code": "busy", "message": "full", "retry_after_ms": 200}
    assert chunk_message("chat", 1, 0, "hi") == {"id": 1, "task": "chat", "seq": 0, "delta": "hi"}
    assert json.loads(encode({"t": "é"}).decode()) == {"t": "é"}


def test_topics():
    cfg = MqttConfig(base_topic="home/llm/", node_id="pi", fleet={"enabled": True, "topic": "fleet/x/"})
    topics = Topics.from_config(cfg)
    assert topics.root == "home/llm/pi" and topics.status == "home/llm/pi/status"
    assert topics.request_bases() == ["home/llm/pi", "fleet/x"]
    assert topics.subscription("fleet/x/request/+", "fleet/x") == "$share/llmqtt/fleet/x/request/+"
    assert topics.subscription("fleet/x/cancel/+", "fleet/x") == "fleet/x/cancel/+"
    assert topics.subscription("home/llm/pi/request/+", "home/llm/pi") == "home/llm/pi/request/+"
    assert topics.task_of("home/llm/pi/request/chat") == ("home/llm/pi", "chat")
    assert topics.task_of("fleet/x/request/sentiment") == ("fleet/x", "sentiment")
    assert topics.task_of("elsewhere/request/chat") is None
    assert Topics.from_config(MqttConfig(node_id="n")).fleet is None
