"""Logging set-up: journald with structured fields, text on stderr, or JSON lines.

`setup_logging(cfg.logging)` once at start-up (calling it again replaces, never duplicates, our handler).
`log_request(...)` writes the one line per request: `key=value` text for people, and the same values as
journal fields (`journalctl -u llmqtt TASK=summarize STATUS=error`) or JSON keys for machines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, TextIO

from .config import LoggingConfig

_OUR_HANDLER = "_llmqtt_handler"
# Libraries that are chatty at INFO/DEBUG (every HTTP request of a model download); their warnings still show.
_NOISY_LOGGERS = ("urllib3", "filelock", "httpx", "httpcore", "fsspec")
# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# Fields systemd.journal.JournalHandler fills itself; an `extra` of the same name would clash.
_JOURNAL_RESERVED = frozenset({"MESSAGE", "MESSAGE_ID", "PRIORITY", "LOGGER", "THREAD_NAME", "PROCESS_NAME",
                               "CODE_FILE", "CODE_LINE", "CODE_FUNC", "CODE_ARGS", "SYSLOG_IDENTIFIER"})

# ---- secrets ------------------------------------------------------------------------------------------

_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(password|passwd|passphrase|secret|api[_-]?key|access[_-]?token|auth[_-]?token)"
    r"""(["']?\s*[=:]\s*)("[^"]*"|'[^']*'|[^\s,;&}\]]+)""")
_URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """`password=hunter2` -> `password=***`, `mqtt://u:pw@host` -> `mqtt://u:***@host`."""
    def hide(match: re.Match[str]) -> str:
        value = match.group(3)
        quote = value[0] if value[0] in "\"'" else ""
        return f"{match.group(1)}{match.group(2)}{quote}***{quote}"

    return _URL_CREDENTIALS.sub(r"\1***@", _SECRET_ASSIGNMENT.sub(hide, text))


class RedactSecrets(logging.Filter):
    """Rewrites a record's message (and traceback) with secrets masked, before any output sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info:
            # Another handler may have formatted (and cached) the traceback already; redact that text too.
            record.exc_text = redact(record.exc_text or logging.Formatter().formatException(record.exc_info))
        return True


# ---- formatters -----------------------------------------------------------------------------------------

def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What the caller passed with `extra=`, keyed in lower case (`REQUEST_ID` -> `request_id`)."""
    return {key.lower(): value for key, value in record.__dict__.items() if key not in _RECORD_ATTRS}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(extra_fields(record))
        if record.exc_info:
            line["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class JournalStreamFormatter(logging.Formatter):
    """Text for a stderr that systemd already routes to the journal (no systemd-python).

    journald stamps the time itself and reads a `<N>` syslog prefix as the priority, so
    `journalctl -p warning` still works.
    """

    _PRIORITIES = ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3))

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in self._PRIORITIES if record.levelno <= level), 2)
        return f"<{priority}>{super().format(record)}"


def _text_formatter() -> logging.Formatter:
    return logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


# ---- where the output goes --------------------------------------------------------------------------------

def stderr_is_journal(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected `stream` (default stderr) to the journal.

    systemd sets `JOURNAL_STREAM=<st_dev>:<st_ino>` of the journal socket it hands the service; if our
    stderr is that same file, we are logging into the journal (and not, say, redirected by the user).
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        info = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (ValueError, OSError, AttributeError):  # unset or odd variable; a stream without a file
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def _journal_handler_class() -> Callable[..., logging.Handler] | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler


def _build_handler(fmt: str, stream: TextIO | None) -> tuple[logging.Handler, str]:
    """The handler for a configured format, and the format it really is."""
    journal_class = _journal_handler_class()
    on_journal = fmt == "auto" and stderr_is_journal(stream)
    if fmt == "journal" or on_journal:
        if journal_class is not None:
            handler = journal_class(SYSLOG_IDENTIFIER="llmqtt")
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            return handler, "journal"
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonLinesFormatter())
        return handler, "json"
    handler.setFormatter(JournalStreamFormatter() if on_journal else _text_formatter())
    return handler, "text"


def setup_logging(cfg: LoggingConfig, *, stream: TextIO | None = None) -> str:
    """Route all logging through one handler for `cfg.format`; returns the format in use.

    Idempotent: a second call replaces the handler the first one added.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OUR_HANDLER, False)]:
        root.removeHandler(old)
        old.close()
    handler, used = _build_handler(cfg.format, stream)
    handler.addFilter(RedactSecrets())
    setattr(handler, _OUR_HANDLER, True)
    root.addHandler(handler)
    root.setLevel(cfg.level)
    level = logging.getLevelName(cfg.level)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)  # Python warnings (deprecations in libraries) go to the same place
    if cfg.format == "journal" and used != "journal":
        logging.getLogger(__name__).warning(
            "logging.format is journal but systemd-python is not installed; logging text to stderr")
    return used


# ---- the per-request line -----------------------------------------------------------------------------------

def _logfmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    if not text or any(c in text for c in " =\"'\n\t"):
        return json.dumps(text, ensure_ascii=False)
    return text


def _journal_key(name: str) -> str:
    key = re.sub(r"[^A-Z0-9_]", "_", name.upper()).lstrip("_")[:64] or "FIELD"
    return f"LLMQTT_{key}" if key in _JOURNAL_RESERVED else key


def log_request(logger: logging.Logger, *, request_id: str | None, task: str, status: str,
                latency_ms: float, queue_ms: float | None = None, level: int | None = None,
                **fields: Any) -> None:
    """Log one finished request: `request id=... task=... status=ok latency_ms=812.4 queue_ms=3.0 ...`.

    The values also travel as journal fields (REQUEST_ID, TASK, STATUS, LATENCY_MS, QUEUE_MS and each of
    `fields` upper-cased) and JSON keys. Level: INFO for ok/cancelled, WARNING otherwise, unless given.
    """
    values = {"request_id": request_id, "task": task, "status": status,
              "latency_ms": float(latency_ms), "queue_ms": None if queue_ms is None else float(queue_ms), **fields}
    present = {name: value for name, value in values.items() if value is not None}
    text = " ".join(f"{name}={_logfmt_value(value)}" for name, value in present.items())
    if level is None:
        level = logging.INFO if status in ("ok", "cancelled") else logging.WARNING
    extra = {_journal_key(name): round(value, 1) if isinstance(value, float) else value
             for name, value in present.items()}
    # Pre-formatted (no %-args): the journal would otherwise repeat the values once more as CODE_ARGS.
    logger.log(level, "request " + text, extra=extra)
