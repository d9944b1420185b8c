"""The HTTP transport on the fake engine, spoken to by real clients: the `ollama` and `openai` packages, curl,
and raw HTTP where the exact bytes matter (NDJSON lines, SSE framing, status codes, Retry-After)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from fake_engine import make_engine
from needs import missing
from polling import wait_until

from llmqtt.config import HttpConfig
from llmqtt.extensions.health import MachineReadings, build_health
from llmqtt.mqtt.messages import Limits
from llmqtt.service import Service
from llmqtt.sessions import SessionStore

ROUTE = """\
kind: classify
system: Which task is this text for?
labels: [sentiment, chat]
"""
# What Home Assistant 2025's Ollama integration sends for a conversation's second turn (recorded).
HA_SYSTEM = "Current time is 07:12:03. Today's date is 2026-11-29.\nYou are a voice assistant for Home Assistant."
HA_TURN_2 = {
    "model": "chat:latest", "stream": True, "options": {"num_ctx": 8192}, "keep_alive": "-1.0s",
    "messages": [{"role": "system", "content": HA_SYSTEM}, {"role": "user", "content": "hello there"},
                 {"role": "assistant", "content": "echo hello there"}, {"role": "user", "content": "and again"}],
    "tools": [],
}


class Server:
    def __init__(self, tmp_path, token: str | None = None, queue_size: int = 64, ready: bool = True,
                 token_delay_s: float = 0.0, engine=None, max_text_chars: int = 200,
                 max_body_bytes: int = 4096):
        from llmqtt.http.server import HttpTransport
        from llmqtt.tasks import load_tasks

        if engine is None:
            prompts = tmp_path / "prompts"
            engine = make_engine(prompts, token_delay_s=token_delay_s)
            (prompts / "route.yaml").write_text(ROUTE)
            engine.tasks = load_tasks([prompts])
        self.engine = engine
        self.service = Service(self.engine, sessions=SessionStore(8, 60), queue_size=queue_size)
        self.service.start()
        token_file = None
        if token:
            token_file = tmp_path / "token"
            token_file.write_text(token + "\n")
        config = HttpConfig(enabled=True, port=0, token_file=token_file, max_body_bytes=max_body_bytes)
        health = lambda: build_health(MachineReadings(), self.service.stats.snapshot(), queue_depth=0,  # noqa: E731
                                      sessions=0, uptime_s=1.0, model="fake", dtype="float32", threads=1)
        self.http = HttpTransport(config, self.service, self.engine.tasks, model_name="fake-model",
                                  dtype="float32", limits=Limits(16384, max_text_chars), health=health)
        self.http.start()
        if ready:
            self.http.set_ready()
        self.url = f"http://127.0.0.1:{self.http.port}"
        self.timeout_s = 10.0  # per raw request; the real model on a loaded machine needs more

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        """(status, headers, body bytes)"""
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=self.timeout_s)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        out = response.status, dict(response.getheaders()), response.read()
        conn.close()
        return out

    def close(self) -> None:
        self.http.pause()
        self.service.stop(5)
        self.http.stop()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.close()


def ollama_client(server: Server, **kwargs):
    _need("ollama")
    import ollama

    return ollama.Client(host=server.url, **kwargs)


def openai_client(server: Server, api_key: str = "unused"):
    _need("openai")
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        missing(f"the {module} Python package")


# -- Ollama ------------------------------------------------------------------------------------------

def test_ollama_list_shows_generate_tasks_with_name_and_model(server):
    models = ollama_client(server).list().models
    assert [m.model for m in models] == ["chat:latest"]  # classify tasks are not chat models
    status, _, body = server.request("GET", "/api/tags")
    entry = json.loads(body)["models"][0]
    assert entry["name"] == entry["model"] == "chat:latest" and len(entry["digest"]) == 64
    assert {"size", "details", "modified_at"} <= set(entry)


def test_ollama_chat_streams_and_answers_multi_turn(server):
    client = ollama_client(server)
    parts = list(client.chat(model="chat:latest", messages=[{"role": "user", "content": "hello there"}], stream=True))
    assert "".join(p.message.content for p in parts) == "echo hello there"
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == 3
    reply = client.chat(model="chat", messages=[{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "echo hi"},
                                                {"role": "user", "content": "more words"}])
    assert reply.message.content == "echo more words" and reply.message.role == "assistant"
    assert [(t.role, t.content) for t in server.engine.histories[-1]] == [("user", "hi"), ("assistant", "echo hi")]


def test_the_home_assistant_request_streams_clean_ndjson(server):
    status, headers, body = server.request("POST", "/api/chat", HA_TURN_2)
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson")
    lines = body.decode().split("\n")
    assert lines[-1] == "" and all(lines[:-1])  # newline-terminated, no blank lines
    messages = [json.loads(line) for line in lines[:-1]]
    assert all(m["message"]["role"] == "assistant" for m in messages)
    final = messages[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert {"eval_count", "prompt_eval_count", "total_duration", "eval_duration", "load_duration"} <= set(final)
    assert "".join(m["message"]["content"] for m in messages) == "echo and again"
    assert server.engine.options[-1].system == HA_SYSTEM  # the request's system prompt replaces the task's
    assert [t.content for t in server.engine.histories[-1]] == ["hello there", "echo hello there"]


def test_ollama_generate_and_show(server):
    client = ollama_client(server)
    assert client.generate(model="chat:latest", prompt="one two").response == "echo one two"
    streamed = list(client.generate(model="chat:latest", prompt="one two", stream=True, system="be brief"))
    assert "".join(p.response for p in streamed) == "echo one two" and streamed[-1].done
    assert server.engine.options[-1].system == "be brief"
    shown = client.show("chat:latest")
    assert "helpful assistant" in shown.modelfile and shown.details.family
    assert server.request("GET", "/api/version")[0] == 200 and server.request("GET", "/api/ps")[0] == 200


def test_ollama_options_reach_the_engine(server):
    ollama_client(server).chat(model="chat:latest", messages=[{"role": "user", "content": "a b c d e"}],
                               options={"temperature": 0.2, "top_p": 0.5, "seed": 7, "stop": ["x"],
                                        "num_predict": 2, "num_ctx": 8192}, keep_alive="5m")
    options = server.engine.options[-1]
    assert (options.temperature, options.top_p, options.seed, options.stop) == (0.2, 0.5, 7, ("x",))


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "bad_json"),
    ({"model": "nope:latest", "messages": [{"role": "user", "content": "x"}]}, 404, "not_found"),
    ({"model": "sentiment", "messages": [{"role": "user", "content": "x"}]}, 400, "wrong_task_kind"),
    ({"model": "chat", "messages": []}, 400, "bad_request"),
    ({"model": "chat", "messages": [{"role": "assistant", "content": "x"}]}, 400, "bad_request"),
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "format": "json"}, 400, "format_unsupported"),
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "keep_alive": "soon"}, 400, "bad_request"),
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "options": {"temperature": "hot"}}, 400,
     "bad_request"),
    ({"model": "chat", "messages": [{"role": "user", "content": "<|im_start|>system"}]}, 400, "invalid_text"),
    ({"model": "chat", "messages": [{"role": "user", "content": "x" * 300}]}, 413, "too_long"),
    (b'{"model": "chat", "pad": "' + b"x" * 5000 + b'"}', 413, "too_long"),
])
def test_bad_chat_requests_get_coded_errors_before_any_stream(server, body, status, code):
    got, headers, raw = server.request("POST", "/api/chat", body)
    assert got == status, raw
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(raw)["code"] == code and json.loads(raw)["error"]


def test_the_ollama_client_sees_errors_as_response_errors(server):
    import ollama

    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client(server).chat(model="missing:latest", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404 and "not found" in caught.value.error


# -- OpenAI ------------------------------------------------------------------------------------------

def test_openai_models_and_completions(server):
    client = openai_client(server)
    assert [m.id for m in client.models.list().data] == ["chat"]
    done = client.chat.completions.create(model="chat", messages=[{"role": "system", "content": "terse"},
                                                                  {"role": "user", "content": "one two"}],
                                          max_tokens=50, temperature=0.1, seed=1, tools=[
                                              {"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert done.choices[0].message.content == "echo one two" and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == 3
    assert server.engine.options[-1].system == "terse"


def test_openai_streaming_ends_with_done(server):
    client = openai_client(server)
    chunks = list(client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "a b"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo a b"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 3
    status, headers, body = server.request("POST", "/v1/chat/completions",
                                           {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    events = body.decode().split("\n\n")
    assert headers["Content-Type"].startswith("text/event-stream")
    assert events[-2] == "data: [DONE]" and events[-1] == "" and all(e.startswith("data: ") for e in events[:-1])


def test_concurrent_streams_from_ollama_and_openai_clients_share_the_steps(tmp_path):
    """Two clients streaming at once: each stream is whole and in order, and their tokens came from shared
    decode steps (the step loop), not one answer after the other."""
    server = Server(tmp_path, token_delay_s=0.05)
    try:
        words = " ".join(f"w{i}" for i in range(20))
        got = {}
        ollama, openai = ollama_client(server), openai_client(server)  # imported and built before the race
        both = threading.Barrier(2)

        def ask_ollama():
            both.wait()
            parts = ollama.chat(model="chat", messages=[{"role": "user", "content": words}], stream=True)
            got["ollama"] = "".join(p.message.content for p in parts)

        def ask_openai():
            both.wait()
            chunks = openai.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": words}], stream=True)
            got["openai"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        threads = [threading.Thread(target=fn) for fn in (ask_ollama, ask_openai)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert got == {"ollama": "echo " + words, "openai": "echo " + words}
        assert server.engine.steps.count(2) >= 10  # most of both answers were decoded side by side
    finally:
        server.close()


def test_openai_errors_have_openai_shape(server):
    import openai

    with pytest.raises(openai.NotFoundError) as caught:
        openai_client(server).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "not_found"
    status, _, body = server.request("POST", "/v1/chat/completions", b"[1,2")
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_json"


# -- task endpoints, router, probes -------------------------------------------------------------------

def test_task_endpoint_answers_like_mqtt(server):
    status, _, body = server.request("POST", "/api/tasks/sentiment", {"id": "r1", "text": "I love it"})
    reply = json.loads(body)
    assert status == 200 and reply["id"] == "r1" and reply["status"] == "ok"
    assert reply["result"]["label"] == "positive" and set(reply["result"]["scores"]) == {"positive", "negative"}
    status, _, body = server.request("POST", "/api/tasks/chat", {"text": "a b", "stream": True, "session": "s1"})
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert [line["seq"] for line in lines[:-1]] == [0, 1, 2] and lines[-1]["result"]["text"] == "echo a b"
    status, _, body = server.request("POST", "/api/tasks/nope", {"text": "x"})
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_task"
    status, _, body = server.request("POST", "/api/tasks/sentiment", {"text": ""})
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"


def test_infer_auto_routes_by_the_router_task(server):
    status, _, body = server.request("POST", "/api/infer", {"task": "auto", "text": "I love rainy days"})
    reply = json.loads(body)
    assert status == 200 and reply["task"] == "sentiment" and reply["route"]["task"] == "sentiment"
    status, _, body = server.request("POST", "/api/infer", {"task": "auto", "text": "what is up"})
    reply = json.loads(body)
    assert reply["task"] == "chat" and reply["result"]["text"] == "echo what is up"
    status, _, body = server.request("POST", "/api/infer", {"task": "sentiment", "text": "meh"})
    assert json.loads(body)["result"]["label"] == "negative"
    assert server.engine.batches.count(("route", 1)) == 2  # one cheap classify pass per routed request


def test_healthz_metrics_and_task_list(server):
    status, _, body = server.request("GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    server.request("POST", "/api/tasks/sentiment", {"text": "I love it"})
    status, headers, body = server.request("GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'llmqtt_requests_total{task="sentiment",status="ok"} 1' in text and "llmqtt_ready 1" in text
    tasks = json.loads(server.request("GET", "/api/tasks")[2])
    assert tasks["router"] == "route" and {t["name"] for t in tasks["tasks"]} >= {"chat", "sentiment"}


def test_not_ready_is_503_with_retry_after(tmp_path):
    server = Server(tmp_path, ready=False)
    try:
        status, headers, body = server.request("GET", "/healthz")
        assert status == 503 and json.loads(body)["status"] == "starting"
        status, headers, body = server.request("POST", "/api/chat", HA_TURN_2)
        assert status == 503 and int(headers["Retry-After"]) >= 1 and json.loads(body)["code"] == "starting"
    finally:
        server.close()


# -- safety ------------------------------------------------------------------------------------------

def test_token_guards_every_endpoint_but_healthz_and_the_page(tmp_path):
    server = Server(tmp_path, token="s3cret")
    try:
        assert server.request("GET", "/healthz")[0] == 200
        assert server.request("GET", "/")[0] == 200
        for method, path in (("GET", "/api/tags"), ("POST", "/api/chat"), ("GET", "/v1/models"),
                             ("GET", "/metrics"), ("POST", "/api/tasks/sentiment"), ("POST", "/api/infer")):
            status, headers, _ = server.request(method, path, {"text": "x"})
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer", path
        assert server.request("GET", "/api/tags", headers={"Authorization": "Bearer wrong"})[0] == 401
        good = ollama_client(server, headers={"Authorization": "Bearer s3cret"})
        assert good.list().models
        assert openai_client(server, api_key="s3cret").models.list().data
    finally:
        server.close()


def test_busy_is_503_with_retry_after_before_the_stream(tmp_path):
    server = Server(tmp_path, queue_size=1)
    server.engine.gate = threading.Event()  # generation waits until released
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(server.request("POST", "/api/chat", HA_TURN_2)))
                   for _ in range(2)]
        threads[0].start()
        wait_until(lambda: len(server.engine.histories) == 1, 10)  # running
        threads[1].start()
        wait_until(lambda: server.service.queue_depth() == 1, 10)  # and one waiting: the queue is full
        status, headers, body = server.request("POST", "/api/chat", HA_TURN_2)
        assert status == 503 and int(headers["Retry-After"]) >= 1 and json.loads(body)["code"] == "busy"
        server.engine.gate.set()
        for t in threads:
            t.join(10)
        assert [r[0] for r in results] == [200, 200]
    finally:
        server.engine.gate.set()
        server.close()


def test_client_disconnect_mid_stream_cancels_the_generation(tmp_path):
    server = Server(tmp_path, token_delay_s=0.1)
    try:
        words = " ".join(f"w{i}" for i in range(40))  # 4 s of tokens, within the test's 200-character limit
        body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": words}],
                           "options": {"num_predict": 100}}).encode()
        sock = socket.create_connection(("127.0.0.1", server.http.port), timeout=10)
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b'"done":false' not in received:  # streaming has begun
            received += sock.recv(4096)
        sock.close()  # the client goes away
        wait_until(lambda: server.service.stats.snapshot()["errors_by_code"].get("cancelled") == 1, 10)
        assert len(server.engine.histories) == 1 and server.service.queue_depth() == 0
    finally:
        server.close()


def test_curl_speaks_to_every_api(server):
    curl = shutil.which("curl") or missing("curl")
    chat = subprocess.run([curl, "-sS", "-N", f"{server.url}/api/chat", "-d", json.dumps(HA_TURN_2)],
                          capture_output=True, text=True, timeout=30)
    assert json.loads(chat.stdout.splitlines()[-1])["done"] is True
    models = subprocess.run([curl, "-sS", f"{server.url}/v1/models"], capture_output=True, text=True, timeout=30)
    assert json.loads(models.stdout)["data"][0]["id"] == "chat"
    task = subprocess.run([curl, "-sS", "-w", "\n%{http_code}", f"{server.url}/api/tasks/sentiment", "-d",
                           '{"text": "great stuff"}'], capture_output=True, text=True, timeout=30)
    body, code = task.stdout.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["result"]["label"] == "positive"


@pytest.mark.broker
def test_llmqtt_run_serves_http_beside_mqtt_and_stops_cleanly(broker, tmp_path):
    """The real command line (fake engine): HTTP on the same service as MQTT, a clean SIGTERM."""
    from broker import DaemonProcess, daemon_config, free_port, wait_online
    from fake_engine import write_model_dir, write_prompts

    port = free_port()
    config = daemon_config(broker, write_prompts(tmp_path / "prompts"), http={"enabled": True, "port": port})
    config["model"] = str(write_model_dir(tmp_path / "model"))
    daemon = DaemonProcess(tmp_path, config, fake_engine=True).start()
    try:
        client = broker.client()
        wait_online(client, daemon.root, timeout=30)
        wait_until(lambda: _get(port, "/healthz") == 200, 30)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/api/chat", body=json.dumps({"model": "chat:latest", "stream": False,
                                                          "messages": [{"role": "user", "content": "via http"}]}))
        assert json.loads(conn.getresponse().read())["message"]["content"] == "echo via http"
        client.subscribe(f"{daemon.root}/response/sentiment")
        client.publish(f"{daemon.root}/request/sentiment", {"id": "m1", "text": "I love it"})
        assert client.expect_json(f"{daemon.root}/response/sentiment")["result"]["label"] == "positive"
        health = _metrics(port)
        assert 'llmqtt_requests_total{task="chat",status="ok"} 1' in health  # one service, both transports
        assert 'llmqtt_requests_total{task="sentiment",status="ok"} 1' in health
        assert daemon.terminate() == 0, daemon.log()
    finally:
        daemon.close()


def _get(port: int, path: str) -> int:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0


def _metrics(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/metrics")
    return conn.getresponse().read().decode()


# -- the web page, in a real headless Chromium ----------------------------------------------------------

def test_web_page_classifies_and_chats_in_chromium(tmp_path):
    import asyncio

    from browser import Browser

    server = Server(tmp_path, token_delay_s=0.05)
    shots = tmp_path / "shots"
    shots.mkdir()

    async def scenario():
        async with Browser(tmp_path) as browser:
            await browser.open(server.url + "/")
            await browser.wait_for("document.querySelectorAll('#classify-task option').length > 0")
            assert await browser.js("[...document.querySelectorAll('#chat-task option')].map(o => o.value)") == ["chat"]
            # classify: a label, and a bar per label score
            await browser.js("document.getElementById('classify-task').value = 'sentiment';"
                             "document.getElementById('classify-text').value = 'I love this phone';"
                             "document.getElementById('classify-go').click()")
            await browser.wait_for("document.getElementById('label').textContent === 'positive'")
            bars = await browser.js("[...document.querySelectorAll('.score')].map(r => [r.dataset.label, "
                                    "r.querySelector('.fill').style.width])")
            assert bars == [["positive", "90%"], ["negative", "10%"]]  # the browser normalises "90.0%"
            await browser.screenshot(shots / "classify.png")
            # chat: two turns, streaming, the history sent back with the second
            await browser.js("document.getElementById('tab-chat').click()")
            for text in ("hello there", "and again"):
                await browser.js(f"document.getElementById('chat-text').value = {json.dumps(text)};"
                                 "document.getElementById('chat-send').click()")
                await browser.wait_for(f"[...document.querySelectorAll('.msg.assistant')].some("
                                       f"m => m.textContent === 'echo {text}')")
                await browser.wait_for("!document.getElementById('chat-send').disabled")
            assert [t.content for t in server.engine.histories[-1]] == ["hello there", "echo hello there"]
            assert "tokens" in await browser.js("document.getElementById('chat-meta').textContent")
            await browser.screenshot(shots / "chat.png")
            # stop: a long answer stopped mid-stream cancels the generation on the server
            long_text = " ".join(f"w{i}" for i in range(30))
            await browser.js(f"document.getElementById('chat-text').value = {json.dumps(long_text)};"
                             "document.getElementById('chat-send').click()")
            await browser.wait_for("document.querySelectorAll('.msg.assistant')[2].textContent.length > 0")
            await browser.js("document.getElementById('chat-stop').click()")
            await browser.wait_for("document.getElementById('chat-meta').textContent === 'Stopped.'")

    try:
        asyncio.run(scenario())
        wait_until(lambda: server.service.stats.snapshot()["errors_by_code"].get("cancelled") == 1, 10)
        for name in ("classify.png", "chat.png"):
            assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.close()
        keep = Path("/tmp/llmqtt-http-shots")  # for a look by hand; the test needs no human
        keep.mkdir(exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy(shot, keep / shot.name)
