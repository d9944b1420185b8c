"""The HTTP APIs on the real demo model, through the `ollama` client as Home Assistant's integration uses it:
a multi-turn conversation whose second turn runs only its new tokens (cross-request KV reuse), and the
`auto` router on the shipped route task."""

from __future__ import annotations

import json

import pytest
from test_http import HA_SYSTEM, Server, ollama_client

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(demo_engine, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("http-real"), engine=demo_engine, max_text_chars=4000, max_body_bytes=1 << 20)
    s.timeout_s = 300
    yield s
    s.close()


def test_ollama_conversation_second_turn_runs_only_its_new_tokens(server):
    client = ollama_client(server)
    options = {"num_ctx": 8192, "num_predict": 24, "temperature": 0}
    messages = [{"role": "system", "content": HA_SYSTEM},
                {"role": "user", "content": "What is the capital of France?"}]
    first = client.chat(model="chat:latest", messages=messages, options=options, keep_alive="-1.0s", tools=[])
    assert "paris" in first.message.content.lower()
    messages += [{"role": "assistant", "content": first.message.content},
                 {"role": "user", "content": "And of Italy?"}]
    parts = list(client.chat(model="chat:latest", messages=messages, options=options, stream=True,
                             keep_alive="-1.0s", tools=[]))
    second, final = "".join(p.message.content for p in parts), parts[-1]
    assert final.done and "rome" in second.lower()
    # Turn 1's prompt and answer came from the cache: what ran is the new message and a few template tokens.
    assert final.prompt_eval_count < 25 < first.prompt_eval_count


def test_auto_routes_texts_to_their_task(server):
    for text, task in (("The hotel room was filthy and the staff ignored us. One star.", "sentiment"),
                       ("How do I descale my coffee machine?", "chat")):
        status, _, body = server.request("POST", "/api/infer", {"task": "auto", "text": text, "max_new_tokens": 8})
        reply = json.loads(body)
        assert status == 200 and reply["route"]["task"] == task, reply
