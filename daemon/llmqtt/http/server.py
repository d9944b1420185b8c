"""The HTTP transport: aiohttp on its own thread and event loop, feeding the same Service as MQTT.

The only aiohttp importer. Requests are parsed by the pure modules beside this one (ollama.py, openai.py,
tasks.py) and run as service jobs, so HTTP shares MQTT's queue, batching, deadlines, busy refusals, sessions
and health. The worker thread hands chunks and answers to the event loop (`_Sink`); it never waits on a
client (a stream's buffer is bounded by the answer's token budget), and aiohttp's `write()` waits for a slow
client's socket. A stream's HTTP status is sent with its first piece, so everything refused before the
first token (busy, too long, bad text) is a proper 4xx/5xx; Home Assistant turns an error inside a stream
into a bare 500. A client that disconnects cancels its job: queued, it is dropped; running, it stops at
the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from .. import __version__
from ..config import HttpConfig
from ..mqtt.messages import BadRequest, Limits, chunk_message, outcome_reply, parse_request
from ..jobs import ORIGIN_HTTP, Failure, Job, JobQueue, Outcome, Submitted
from . import metrics, ollama, openai, tasks as task_api
from .messages import ApiError, ChatCall, Tasks, read_json

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("web") / "index.html"
OPEN_PATHS = ("/healthz", "/")  # no token: the liveness probe, and the page (its API calls send the token)
RETRY_STARTING_MS = 5000
NDJSON = "application/x-ndjson"


def _line(message: dict) -> bytes:
    return (json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


class _Sink:
    """The service's ReplySink for one HTTP request: from the worker thread into the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.events: asyncio.Queue[tuple[int, str] | Outcome] = asyncio.Queue()

    def _put(self, item: tuple[int, str] | Outcome) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server stopped and the client is gone with it
            pass

    def chunk(self, seq: int, delta: str) -> None:
        self._put((seq, delta))

    def finish(self, outcome: Outcome) -> None:
        self._put(outcome)


class _Pending:
    """One submitted job as the handler sees it: its events, and cancelling it if the handler leaves early."""

    def __init__(self, service: JobQueue, job: Job, sink: _Sink):
        self.service, self.job, self.sink = service, job, sink
        self.done = False

    async def next(self) -> tuple[int, str] | Outcome:
        event = await self.sink.events.get()
        self.done = isinstance(event, Outcome)
        return event

    async def outcome(self) -> Outcome:
        while True:
            event = await self.next()
            if isinstance(event, Outcome):
                return event

    def close(self) -> None:
        if not self.done:  # the client went away (or the server is stopping): stop the work
            self.done = True
            self.service.cancel(self.job.task, self.job.id)


def _api_error(outcome: Outcome) -> ApiError:
    failure = outcome.error or Failure("internal", "internal error")
    return ApiError(failure.code, failure.message, failure.retry_after_ms)


class HttpTransport:
    """`start()` binds and serves on a thread; `set_ready()` once warm; `pause()` then `stop()` at shutdown."""

    name = "http"

    def __init__(self, config: HttpConfig, service: JobQueue, tasks: Tasks, *, model_name: str, dtype: str,
                 limits: Limits, health: Callable[[], dict], size_bytes: int = 0,
                 conversation_stats: Callable[[], dict] | None = None):
        self.config, self.service, self.tasks = config, service, tasks
        self.model_name, self.dtype, self.size_bytes = model_name, dtype, size_bytes
        self.limits, self.health, self.conversation_stats = limits, health, conversation_stats
        self.ready = threading.Event()
        self.port: int | None = None  # the bound port (config.port 0 picks a free one)
        self.started = time.time()
        self._token = config.read_token()
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._pending: set[_Pending] = set()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        bound = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(bound, failure), name="llmqtt-http", daemon=True)
        self._thread.start()
        bound.wait(30)
        if failure:
            raise failure[0]
        log.info("HTTP on http://%s:%s (Ollama /api, OpenAI /v1, tasks /api/tasks, page /)%s",
                 self.config.host, self.port, " with a bearer token" if self._token else "")

    def set_ready(self) -> None:
        self.ready.set()

    def pause(self) -> None:
        """Shutdown: new requests get 503 `stopping` with Retry-After; running ones finish."""
        self._accepting = False

    def stop(self) -> None:
        """Answer what is still waiting with `stopping` (the service dropped it), then close the server."""
        if self._loop is None or self._thread is None:
            return
        loop = self._loop

        def stop_serving() -> None:
            for pending in list(self._pending):
                if not pending.done:
                    pending.sink.events.put_nowait(Outcome(pending.job.task, pending.job.id, error=Failure(
                        "stopping", "the daemon is stopping; retry shortly", retry_after_ms=RETRY_STARTING_MS)))
            assert self._stopped is not None
            self._stopped.set()

        try:
            loop.call_soon_threadsafe(stop_serving)
        except RuntimeError:
            return
        self._thread.join(15)

    def _serve(self, bound: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._stopped = asyncio.Event()
        # handler_cancellation: a client that disconnects cancels its handler, which cancels its job.
        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.config.host, self.config.port, shutdown_timeout=5)
            loop.run_until_complete(site.start())
            server = site._server
            self.port = server.sockets[0].getsockname()[1] if server is not None else self.config.port
        except BaseException as exc:  # e.g. the port is taken: the daemon goes on without HTTP
            failure.append(exc)
            bound.set()
            loop.run_until_complete(runner.cleanup())
            loop.close()
            return
        bound.set()
        loop.run_until_complete(self._stopped.wait())
        loop.run_until_complete(asyncio.sleep(0.2))  # let handlers write the `stopping` answers
        loop.run_until_complete(runner.cleanup())
        loop.close()

    # -- the application --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._guard])
        app.router.add_get("/", self.page)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/chat", self.ollama_chat)
        app.router.add_post("/api/generate", self.ollama_generate)
        app.router.add_get("/v1/models", self.openai_models)
        app.router.add_post("/v1/chat/completions", self.openai_chat)
        app.router.add_get("/api/tasks", self.task_list)
        app.router.add_post("/api/tasks/{task}", self.task_request)
        app.router.add_post("/api/infer", self.infer)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """Bearer token on everything but OPEN_PATHS; our coded errors for aiohttp's own 404/405/413."""
        if self._token and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
                return self._error(request, ApiError("unauthorized", "missing or wrong bearer token"),
                                   {"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return self._error(request, ApiError(
                "too_long", f"body is larger than http.max_body_bytes={self.config.max_body_bytes}"))
        except web.HTTPNotFound:
            return self._error(request, ApiError("not_found", f"no endpoint {request.path}"))
        except web.HTTPMethodNotAllowed as exc:
            return self._error(request, ApiError("bad_request", f"{request.method} is not allowed on "
                                                                f"{request.path}"), {"Allow": ",".join(exc.allowed_methods)})

    def _error(self, request: web.Request, error: ApiError, headers: dict | None = None) -> web.Response:
        """A coded error in the shape the path's API uses."""
        if request.path.startswith("/v1/"):
            body = openai.error_body(error)
        elif request.path.startswith(("/api/tasks", "/api/infer")):
            body = {"status": "error", "error": {"code": error.code, "message": error.message}}
            if error.retry_after_ms is not None:
                body["error"]["retry_after_ms"] = error.retry_after_ms
        else:
            body = ollama.error_body(error)
        return web.json_response(body, status=error.status, headers={**error.headers(), **(headers or {})})

    async def _body(self, request: web.Request) -> dict | ApiError:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return ApiError("too_long", f"body is larger than http.max_body_bytes={self.config.max_body_bytes}")
        return read_json(raw)

    # -- running a job ----------------------------------------------------------------------------

    def _refusal(self) -> ApiError | None:
        if not self._accepting:
            return ApiError("stopping", "the daemon is stopping; retry shortly", RETRY_STARTING_MS)
        if not self.ready.is_set():
            return ApiError("starting", "the model is still warming up; retry shortly", RETRY_STARTING_MS)
        return None

    def _submit(self, job_fields: dict[str, Any]) -> _Pending | ApiError:
        refusal = self._refusal()
        if refusal:
            return refusal
        sink = _Sink(asyncio.get_running_loop())
        job = Job(id=f"http-{uuid.uuid4().hex[:16]}", sink=sink, origin=ORIGIN_HTTP, **job_fields)
        pending = _Pending(self.service, job, sink)
        if self.service.submit(job) is Submitted.STOPPED:
            return ApiError("stopping", "the daemon is stopping; retry shortly", RETRY_STARTING_MS)
        self._pending.add(pending)
        return pending

    def _chat_job(self, call: ChatCall) -> _Pending | ApiError:
        if len(call.text) > self.limits.max_text_chars:
            return ApiError("too_long", f"the last message has {len(call.text)} characters; the limit is "
                                        f"{self.limits.max_text_chars} (runtime.max_text_chars)")
        return self._submit({"task": call.task, "text": call.text, "stream": call.stream,
                             "max_new_tokens": call.max_new_tokens, "history": call.history,
                             "options": call.options})

    async def _stream(self, request: web.Request, pending: _Pending, content_type: str,
                      piece: Callable[[str], bytes], final: Callable[[Outcome], bytes],
                      failed: Callable[[ApiError], bytes]) -> web.StreamResponse:
        """Status and headers go out with the first piece: a refusal before it is a plain error reply."""
        event = await pending.next()
        if isinstance(event, Outcome) and not event.ok:
            return self._error(request, _api_error(event))
        response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        await response.prepare(request)
        while not isinstance(event, Outcome):
            await response.write(piece(event[1]))
            event = await pending.next()
        await response.write(final(event) if event.ok else failed(_api_error(event)))
        await response.write_eof()
        return response

    async def _answer(self, request: web.Request, call: ChatCall, piece: Callable[[str], bytes],
                      final: Callable[[Outcome], bytes], failed: Callable[[ApiError], bytes],
                      whole: Callable[[Outcome], dict], content_type: str = NDJSON) -> web.StreamResponse:
        pending = self._chat_job(call)
        if isinstance(pending, ApiError):
            return self._error(request, pending)
        try:
            if call.stream:
                return await self._stream(request, pending, content_type, piece, final, failed)
            outcome = await pending.outcome()
            if not outcome.ok:
                return self._error(request, _api_error(outcome))
            return web.json_response(whole(outcome))
        finally:
            pending.close()
            self._pending.discard(pending)

    # -- pages and probes -------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=PAGE.read_bytes(), content_type="text/html", charset="utf-8")

    async def healthz(self, request: web.Request) -> web.Response:
        refusal = self._refusal()
        state = "ok" if refusal is None else refusal.code
        return web.json_response({"status": state, "model": self.model_name, "version": __version__},
                                 status=200 if refusal is None else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        health = await asyncio.to_thread(self.health)  # reads the machine (psutil, sysfs)
        stats = self.conversation_stats() if self.conversation_stats else None
        return web.Response(body=metrics.prometheus(health, self.ready.is_set(), stats).encode("utf-8"),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # -- Ollama -----------------------------------------------------------------------------------

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": ollama.model_entries(self.tasks, self.model_name, self.dtype,
                                                                  self.size_bytes, self.started)})

    async def ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": ollama.running_entries(self.tasks, self.model_name, self.dtype,
                                                                    self.size_bytes, self.started)})

    async def show(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, ApiError):
            return self._error(request, body)
        shown = ollama.show(self.tasks, body.get("model", body.get("name")), self.model_name, self.dtype)
        return self._error(request, shown) if isinstance(shown, ApiError) else web.json_response(shown)

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama(request, ollama.parse_chat, ollama.chat_line, ollama.chat_final)

    async def ollama_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama(request, ollama.parse_generate, ollama.generate_line, ollama.generate_final)

    async def _ollama(self, request, parse, line, final_message) -> web.StreamResponse:
        body = await self._body(request)
        call = body if isinstance(body, ApiError) else parse(body, self.tasks)
        if isinstance(call, ApiError):
            return self._error(request, call)
        model = call.model
        return await self._answer(
            request, call,
            piece=lambda delta: _line(line(model, delta)),
            final=lambda o: _line(final_message(model, o.result or {}, o.latency_ms)),
            failed=lambda error: _line(ollama.error_body(error)),
            whole=lambda o: final_message(model, o.result or {}, o.latency_ms, (o.result or {}).get("text", "")))

    # -- OpenAI -----------------------------------------------------------------------------------

    async def openai_models(self, request: web.Request) -> web.Response:
        return web.json_response(openai.model_list(self.tasks, self.started))

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        call = body if isinstance(body, ApiError) else openai.parse_chat(body, self.tasks)
        if isinstance(call, ApiError):
            return self._error(request, call)
        call_id, model = openai.completion_id(), call.model
        with_usage = isinstance(body, dict) and bool((body.get("stream_options") or {}).get("include_usage"))
        started = {"role": False}

        def piece(delta: str) -> bytes:
            first = {"role": "assistant"} if not started["role"] else {}
            started["role"] = True
            return openai.sse(openai.chunk(call_id, model, {**first, "content": delta}))

        return await self._answer(
            request, call, piece=piece,
            final=lambda o: openai.sse(openai.last_chunk(call_id, model, o.result or {}, with_usage))
            + openai.sse("[DONE]"),
            failed=lambda error: openai.sse(openai.error_body(error)) + openai.sse("[DONE]"),
            whole=lambda o: openai.completion(call_id, model, o.result or {}),
            content_type="text/event-stream")

    # -- the task endpoints (the MQTT API's JSON over HTTP) ---------------------------------------

    async def task_list(self, request: web.Request) -> web.Response:
        return web.json_response({"tasks": task_api.describe(self.tasks),
                                  "router": self.config.router_task if self._router_ok() else None})

    def _router_ok(self) -> bool:
        return task_api.router_error(self.tasks, self.config.router_task) is None

    async def task_request(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        return await self._task_call(request, raw, request.match_info["task"])

    async def infer(self, request: web.Request) -> web.StreamResponse:
        """`{"task": "auto" | <task>, "text": ...}`; `auto` asks the router task which task the text is for."""
        raw = await request.read()
        body = read_json(raw)
        if isinstance(body, ApiError):
            return self._error(request, body)
        task = body.get("task", "auto")
        if task != "auto":
            return await self._task_call(request, raw, str(task))
        error = task_api.router_error(self.tasks, self.config.router_task)
        if error:
            return self._error(request, error)
        routed = await self._run_task(raw, self.config.router_task)
        if isinstance(routed, ApiError):
            return self._error(request, routed)
        outcome = routed
        if not outcome.ok:
            return self._error(request, _api_error(outcome))
        choice = (outcome.result or {})["label"]
        route = {"task": choice, "score": outcome.result["score"]}  # type: ignore[index]
        return await self._task_call(request, raw, choice, route)

    async def _run_task(self, raw: bytes, task: str) -> Outcome | ApiError:
        """One task's outcome, not streamed (the router's pass for `auto`)."""
        parsed = parse_request(raw, task, self.limits)
        if isinstance(parsed, BadRequest):
            return ApiError(parsed.code, parsed.message)
        pending = self._submit({"task": task, "text": parsed.text, "stream": False})
        if isinstance(pending, ApiError):
            return pending
        try:
            return await pending.outcome()
        finally:
            pending.close()
            self._pending.discard(pending)

    async def _task_call(self, request: web.Request, raw: bytes, task: str,
                         route: dict | None = None) -> web.StreamResponse:
        parsed = parse_request(raw, task, self.limits)
        if isinstance(parsed, BadRequest):
            return self._error(request, ApiError(parsed.code, parsed.message))
        extra = {"route": route} if route else {}

        def reply(outcome: Outcome) -> dict:
            return {**outcome_reply(outcome, model=self.model_name, **extra), "id": parsed.id}

        pending = self._submit({"task": task, "text": parsed.text, "session": parsed.session,
                                "stream": parsed.stream, "max_new_tokens": parsed.max_new_tokens,
                                "deadline_ms": parsed.deadline_ms})
        if isinstance(pending, ApiError):
            return self._error(request, pending)
        try:
            if parsed.stream:
                return await self._stream(
                    request, pending, NDJSON, piece=_Counter(lambda seq, d: _line(chunk_message(task, parsed.id, seq, d))),
                    final=lambda o: _line(reply(o)),
                    failed=lambda error: _line({"id": parsed.id, "task": task, "status": "error",
                                                "error": {"code": error.code, "message": error.message}}))
            outcome = await pending.outcome()
            status = 200 if outcome.ok else _api_error(outcome).status
            return web.json_response(reply(outcome), status=status, headers=_api_error(outcome).headers()
                                     if not outcome.ok else None)
        finally:
            pending.close()
            self._pending.discard(pending)


class _Counter:
    """Numbers the pieces of a task stream (seq), as the MQTT chunks are numbered."""

    def __init__(self, build: Callable[[int, str], bytes]):
        self.build, self.seq = build, 0

    def __call__(self, delta: str) -> bytes:
        out = self.build(self.seq, delta)
        self.seq += 1
        return out
