"""Talking to systemd: sd_notify (READY/STATUS/EXTEND_TIMEOUT/STOPPING/WATCHDOG) and a progress watchdog.

Everything here is a silent no-op without `NOTIFY_SOCKET`, so tests and laptops need no systemd.

    notifier = Notifier()
    notifier.extend_timeout(120)              # before a slow step during start-up
    notifier.ready()
    watchdog = Watchdog.from_environ(notifier)
    watchdog.start()
    ...                                       # worker: watchdog.beat() per unit of work and per idle wait
    notifier.stopping(); watchdog.stop()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Literal, Mapping

log = logging.getLogger(__name__)

Backend = Literal["libsystemd", "socket", "none"]
Sender = Callable[[str], bool]


def _libsystemd_sender() -> Sender | None:
    """systemd-python's `daemon.notify` (libsystemd's sd_notify), or None if it is not installed."""
    try:
        from systemd import daemon
    except ImportError:
        return None
    return lambda state: bool(daemon.notify(state))


def _socket_sender(address: str) -> Sender:
    """sd_notify in a few lines of Python.

    systemd-python needs libsystemd-dev and a compiler to install, which a plain venv on a board may not
    have; the protocol itself is one datagram of `KEY=value` lines to an AF_UNIX socket, so the daemon
    still gets READY/WATCHDOG right without it instead of being killed by TimeoutStartSec.
    """
    # `@name` is Linux's abstract namespace: the kernel wants a leading NUL byte instead of the `@`.
    target = "\0" + address[1:] if address.startswith("@") else address

    def send(state: str) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode("utf-8"))
        return True

    return send


class Notifier:
    """sd_notify messages to the service manager; does nothing (and returns False) outside systemd."""

    def __init__(self, *, backend: Literal["auto", "libsystemd", "socket"] = "auto") -> None:
        self._send, self.backend = self._pick_sender(os.environ.get("NOTIFY_SOCKET", ""), backend)
        self._warned = False

    @staticmethod
    def _pick_sender(address: str, wanted: str) -> tuple[Sender | None, Backend]:
        if not address:
            return None, "none"
        if wanted in ("auto", "libsystemd"):
            sender = _libsystemd_sender()
            if sender is not None:
                return sender, "libsystemd"
            if wanted == "libsystemd":
                raise RuntimeError("systemd-python is not installed (pip install 'llmqtt[systemd]')")
        if not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%s is not a path or an abstract socket; not notifying systemd", address)
            return None, "none"
        return _socket_sender(address), "socket"

    @property
    def enabled(self) -> bool:
        return self._send is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments in one message; True if it was delivered."""
        if self._send is None:
            return False
        try:
            return self._send("\n".join(assignments))
        except OSError as exc:
            # Losing one notification must not take the daemon down; say so once, not on every ping.
            if not self._warned:
                log.warning("sd_notify failed: %s", exc)
                self._warned = True
            return False

    def ready(self) -> bool:
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        # A newline would start a new assignment in the message; keep STATUS on one line.
        return self.notify("STATUS=" + " ".join(text.split()))

    def extend_timeout(self, seconds: float) -> bool:
        """Move the start-up (or stop) deadline to `seconds` from now, for one slow step at a time."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")


def watchdog_interval_s(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog interval systemd asks for (`WATCHDOG_USEC`), or None if there is none for this process."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    # WATCHDOG_PID names the process systemd watches; an inherited variable in a child is not for it.
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return usec / 1_000_000 if usec > 0 else None


class Watchdog:
    """Pings WATCHDOG=1 at half the interval, but only while the worker shows progress.

    The worker calls `beat()` after each unit of work (a request, a decoded token) and each time its idle
    wait times out; an idle daemon therefore keeps beating. A hung inference stops beating, the pings stop
    once the last beat is older than the interval, and systemd kills and restarts the service.
    """

    def __init__(self, notifier: Notifier, interval_s: float | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._notifier = notifier
        self.interval_s = interval_s if notifier.enabled else None
        self._clock = clock
        self._last_beat = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled = False

    @classmethod
    def from_environ(cls, notifier: Notifier) -> Watchdog:
        return cls(notifier, watchdog_interval_s())

    @property
    def idle_wait_s(self) -> float:
        """How long the worker's idle wait may block before it beats; well under the interval."""
        return min(self.interval_s / 4, 5.0) if self.interval_s else 5.0

    def beat(self) -> None:
        """Progress was made (cheap: one timestamp, safe from any thread)."""
        self._last_beat = self._clock()

    def seconds_since_beat(self) -> float:
        return self._clock() - self._last_beat

    def tick(self) -> bool:
        """One watchdog round: ping if the last beat is recent enough; True if it pinged."""
        if self.interval_s is None:
            return False
        if self.seconds_since_beat() > self.interval_s:
            self._note_stall()
            return False
        if self._stalled:
            log.info("worker is making progress again; watchdog pings resume")
            self._stalled = False
        return self._notifier.watchdog()

    def _note_stall(self) -> None:
        if not self._stalled:
            log.error("no progress for %.1fs (watchdog interval %.1fs); letting systemd restart the service",
                      self.seconds_since_beat(), self.interval_s)
            self._stalled = True

    def start(self) -> None:
        """Start pinging (counts as a beat); does nothing when systemd set no watchdog."""
        if self.interval_s is None or self._thread is not None:
            return
        self.beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(self.interval_s / 2,), name="llmqtt-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None

    def _run(self, period: float) -> None:
        self.tick()
        while not self._stop.wait(period):
            self.tick()
