"""The composition root: config -> tasks -> warm engine (build.py) -> service -> MQTT (+ HTTP) -> extensions.

`main(config_path)` is what `llmqtt run` calls. `Daemon(config, engine)` builds the same daemon around a
warm engine you hand it (tests use a fake one), and `Daemon.run()` serves until SIGTERM/SIGINT.

Shutdown keeps the delivery promise: stop taking requests, let the running ones finish (or leave them
unacknowledged, so the broker redelivers them to the next start), publish `stopping` then `offline`, and
disconnect cleanly, so the broker does not publish the Last Will.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import __version__
from .build import START_ERRORS, EngineFactory, build_engine
from .config import Config, ConfigError, file_problems, load_config
from .engine.types import InferenceEngine
from .extensions.availability import AvailabilityExtension
from .extensions.base import Extension, start_all, stop_all
from .extensions.health import HealthExtension
from .extensions.homeassistant import HomeAssistantExtension
from .extensions.requests import RequestsExtension
from .jobs import Job, Outcome
from .memoryguard import MemoryGuard
from .mqtt.messages import Limits
from .mqtt.routes import ReplyRoutes, shorten
from .mqtt.topics import Topics
from .mqtt.transport import MqttTransport
from .service import Service
from .sessions import SessionStore
from .tasks import load_tasks

if TYPE_CHECKING:
    from .http.server import HttpTransport

log = logging.getLogger(__name__)


class _NoSystemd:
    """Stands in for systemd.Notifier and Watchdog when they are not wired (tests, no systemd)."""

    idle_wait_s = 5.0

    def _nothing(self, *args, **kwargs) -> None:
        return None

    ready = status = extend_timeout = stopping = start = stop = beat = _nothing


class Daemon:
    """Builds the object graph in the constructor; nothing runs or connects until `start()`."""

    def __init__(self, config: Config, engine: InferenceEngine, *, threads: int | None = None,
                 memory: MemoryGuard | None = None, notifier=None, watchdog=None,
                 request_log: Callable[[Job, Outcome], None] | None = None, stop_grace_s: float | None = None,
                 max_generations: int | None = None):
        self.config = config
        self.engine = engine
        self.notifier = notifier or _NoSystemd()  # HOOK(systemd): llmqtt.systemd.Notifier
        self.watchdog = watchdog or _NoSystemd()  # HOOK(systemd): llmqtt.systemd.Watchdog
        self.stop_grace_s = stop_grace_s if stop_grace_s is not None else config.runtime.stop_grace_s
        self.stop_requested = threading.Event()
        self.started = time.monotonic()
        runtime, mqtt = config.runtime, config.mqtt
        self.topics = Topics.from_config(mqtt, config.homeassistant)
        observers: list[Callable[[Job, Outcome], None]] = [request_log or log_outcome]  # HOOK(logs)
        self.service = Service(
            engine, sessions=SessionStore(runtime.sessions.max_sessions, runtime.sessions.idle_ttl_s),
            queue_size=runtime.queue_size,
            max_batch=min(runtime.max_batch, engine.max_batch),  # the planned batch
            max_generations=max_generations or runtime.max_generations,  # the plan's: their KV caches fit
            default_deadline_ms=runtime.default_deadline_ms, dedup_size=mqtt.dedup_cache_size,
            memory=memory,  # memoryguard.MemoryGuard, at the plan's threshold
            observer=_fan_out(observers),  # the request log line, then Home Assistant's sensors
            heartbeat=self.watchdog.beat, idle_wait_s=self.watchdog.idle_wait_s)
        # Receive Maximum = queue size: a backlog (requests sent while we were down) stays in the broker and
        # comes as the queue drains, instead of arriving at once and overflowing the queue as `busy`.
        self.transport = MqttTransport(mqtt, password=mqtt.read_password(), receive_maximum=runtime.queue_size)
        self.availability = AvailabilityExtension(self.transport, self.topics, {
            "node": mqtt.node, "model": engine.model_name, "dtype": engine.dtype,
            "tasks": sorted(engine.tasks), "version": __version__})
        self.homeassistant: HomeAssistantExtension | None = None
        if config.homeassistant.enabled:
            self.homeassistant = HomeAssistantExtension(
                self.transport, self.topics, config.homeassistant, engine.tasks, node=mqtt.node,
                model=engine.model_name, version=__version__)
            observers.append(self.homeassistant.observe)
        routes = ReplyRoutes.build(self.topics, mqtt.reply_topics)
        self.requests = RequestsExtension(self.transport, self.topics, self.service,
                                          Limits(runtime.max_payload_bytes, runtime.max_text_chars),
                                          model_name=engine.model_name, node=mqtt.node, routes=routes,
                                          hold_limit=mqtt.max_held_requests,
                                          ha_answer=self.homeassistant.answer if self.homeassistant else None)
        self.health = HealthExtension(self.transport, self.topics, self.service, mqtt.health_interval_s,
                                      threads=threads,
                                      started=self.started, memory_state=memory.state if memory else None)
        self.http: HttpTransport | None = None
        if config.http.enabled:
            from .http.server import HttpTransport  # aiohttp is imported only when HTTP is on

            self.http = HttpTransport(
                config.http, self.service, engine.tasks, model_name=engine.model_name, dtype=engine.dtype,
                limits=Limits(runtime.max_payload_bytes, runtime.max_text_chars), health=self.health.snapshot,
                size_bytes=engine.weight_bytes, conversation_stats=engine.conversation_stats)
        self.extensions: list[Extension] = []
        self._shut_down = False

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self.http is not None:
            self._start_http()
        self.service.start()
        # Subscriptions are registered before connecting: a persistent session delivers waiting requests
        # right after CONNACK, and each must find its handler.
        self.extensions = start_all([self.availability, self.requests, self.health,
                                     *([self.homeassistant] if self.homeassistant else [])])
        self.transport.start()
        self.availability.online()
        # READY once warm, whether or not the broker is up yet: a broker that is down at boot must not make
        # systemd kill us at TimeoutStartSec and reload the model in a loop; we keep reconnecting instead.
        self.notifier.ready()
        if self.http is not None:
            self.http.set_ready()
        self.notifier.status(f"serving {len(self.engine.tasks)} tasks with {self.engine.model_name}")
        self.engine.start_fast_decode()  # in the background, now that start-up no longer needs the CPU
        self.watchdog.start()
        log.info("serving %d task(s) on %s/request/<task>%s", len(self.engine.tasks), self.topics.root,
                 f" and fleet {self.topics.fleet}" if self.topics.fleet else "")

    def _start_http(self) -> None:
        assert self.http is not None
        try:
            self.http.start()
        except Exception as exc:  # e.g. the port is taken: MQTT goes on serving
            log.error("HTTP could not start on %s:%s (%s); serving MQTT only", self.config.http.host,
                      self.config.http.port, exc)
            self.http = None

    def request_stop(self) -> None:
        """Safe from a signal handler or any thread."""
        self.stop_requested.set()

    def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        log.info("stopping")
        self.notifier.stopping()
        self.notifier.extend_timeout(self.stop_grace_s + 15)  # the running request, then flush and offline
        self.requests.pause()
        if self.http is not None:
            self.http.pause()
        self.availability.stopping()
        if not self.service.stop(self.stop_grace_s):
            log.warning("the running requests did not finish within %.0fs; they stay unacknowledged and "
                        "are redelivered after a restart", self.stop_grace_s)
        if self.http is not None:
            self.http.stop()  # HTTP requests still waiting are answered `stopping` (retry)
        if not self.transport.flush(5.0):
            log.warning("some replies were not confirmed by the broker; their requests will be redelivered")
        stop_all(self.extensions)  # availability last: publishes `offline`
        self.transport.stop()
        self.watchdog.stop()
        log.info("stopped")

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or request_stop()); returns the exit status."""
        restore = _install_signal_handlers(self.request_stop)
        try:
            self.start()
            # A timed wait, not wait(): a SIGTERM the kernel hands to another thread (torch's and paho's
            # don't block it) leaves an untimed futex wait asleep, and Python runs handlers only in the main
            # thread. 1 in ~10 test runs hung that way until killed; the timeout lets the handler run.
            while not self.stop_requested.wait(0.5):
                pass
        finally:
            self.shutdown()
            restore()
        return 0


def _install_signal_handlers(handler: Callable[[], None]) -> Callable[[], None]:
    """SIGTERM/SIGINT -> handler (main thread only; in-process tests run the daemon in a thread)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, lambda signum, frame: handler()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _fan_out(observers: list[Callable[[Job, Outcome], None]]) -> Callable[[Job, Outcome], None]:
    """One service observer that calls each of `observers` in turn; one failing does not starve the next."""
    def observe(job: Job, outcome: Outcome) -> None:
        for observer in observers:
            try:
                observer(job, outcome)
            except Exception:
                log.exception("request observer %s failed", getattr(observer, "__qualname__", observer))

    return observe


def log_outcome(job: Job, outcome: Outcome) -> None:
    """The per-request log line (logs.log_request when available)."""
    status = outcome.code if outcome.code in ("ok", "cancelled") else "error"
    fields: dict[str, Any] = {} if outcome.ok else {"code": outcome.code}
    if outcome.cached:
        fields["cached"] = True
    result = outcome.result or {}
    if "tokens" in result:
        fields.update(tokens=result["tokens"], tokens_per_s=result["tokens_per_s"])
    elif "label" in result:
        fields["label"] = result["label"]
    try:
        from .logs import log_request
    except ImportError:
        log.info("request id=%s task=%s status=%s latency_ms=%.1f %s", job.id, shorten(job.task), status,
                 outcome.latency_ms, fields)
        return
    # shortened: an unknown task's name comes from the request topic, which may be 64 KB long
    log_request(log, request_id=str(job.id), task=shorten(job.task), status=status, latency_ms=outcome.latency_ms,
                queue_ms=outcome.queue_ms, **fields)


# -- the real thing ------------------------------------------------------------------------------------

def main(config_path: Path | None, *, engine_factory: EngineFactory | None = None) -> int:
    """`llmqtt run`: load once, serve until SIGTERM/SIGINT. ConfigError/TaskFileError (a task the model cannot
    serve included) propagate to the CLI, which says so in one line. `engine_factory`: tests pass a fake."""
    config = load_config(config_path)
    problems = file_problems(config)  # before minutes of model loading, not after
    if problems:
        raise ConfigError("; ".join(problems))
    notifier, watchdog = _systemd()
    _setup_logging(config)
    tasks = load_tasks(config.prompt_dirs())
    notifier.extend_timeout(600)  # fetching/converting/loading a model can take minutes on a board
    notifier.status("loading model")
    try:
        warm = build_engine(config, tasks, factory=engine_factory, progress=_startup_progress(notifier))
    except START_ERRORS as exc:
        log.error("%s", exc)
        return 1
    daemon = Daemon(config, warm.engine, threads=warm.threads, memory=warm.memory, notifier=notifier,
                    watchdog=watchdog, max_generations=warm.plan.max_generations)
    code = daemon.run()
    _exit_past_background_work(code)
    return code


def _exit_past_background_work(code: int) -> None:
    """Leave at once if a background thread is still busy after a clean shutdown. A decode compile
    (torch.compile, 3-13 s after READY) still inside native code when the interpreter finalizes aborts the
    process ("terminate called without an active exception", exit -6): systemd would log a crash for a
    clean stop. Replies, acks and the offline status are already sent by now; nothing is left to flush but logs."""
    busy = [t.name for t in threading.enumerate() if t.daemon and t.is_alive() and t is not threading.current_thread()]
    if busy:
        log.info("exiting with background work unfinished (%s)", ", ".join(busy))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _startup_progress(notifier) -> Callable[[str, int, int], None]:
    """Model fetch/convert progress -> log lines, systemd STATUS, and more start-up time while it moves."""
    last = {"stage": None, "at": 0.0}

    def report(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage == last["stage"] and now - last["at"] < 5:
            return
        if stage != last["stage"]:
            log.info("%s", stage)
        last.update(stage=stage, at=now)
        percent = f" ({100 * done // total}%)" if total else ""
        notifier.status(f"{stage}{percent}")
        notifier.extend_timeout(300)  # each sign of progress buys five more minutes

    return report


def _setup_logging(config: Config) -> None:
    try:
        from .logs import setup_logging
    except ImportError:
        logging.basicConfig(level=config.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    setup_logging(config.logging)


def _systemd():
    try:
        from .systemd import Notifier, Watchdog
    except ImportError:
        return _NoSystemd(), _NoSystemd()
    notifier = Notifier()
    return notifier, Watchdog.from_environ(notifier)
