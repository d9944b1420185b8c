"""Request parsing and reply building: bytes in, a typed `Request` or a coded `BadRequest` out. Pure.

A payload that starts with `{` is a JSON request; anything else is the text itself (small devices just
publish text). Checks run cheapest first: size, encoding, JSON, fields, text length.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

from ..validation import describe

if TYPE_CHECKING:
    from ..jobs import Outcome

RequestId = Union[StrictStr, StrictInt]


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int
    max_text_chars: int


@dataclass(frozen=True)
class Request:
    task: str
    id: str | int
    text: str
    reply_to: str | None = None
    correlation_data: bytes | None = None
    session: str | None = None
    stream: bool = False
    deadline_ms: int | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class BadRequest:
    """A request that cannot run; answered with `code` on the best reply topic we could read."""

    code: str  # bad_json | bad_request | too_long | bad_encoding
    message: str
    task: str
    id: str | int | None = None
    reply_to: str | None = None
    correlation_data: bytes | None = None


class _Body(BaseModel):
    # Unknown fields are ignored, so newer clients keep working with older daemons.
    model_config = ConfigDict(extra="ignore")

    id: RequestId | None = None
    text: StrictStr
    reply_to: StrictStr | None = None
    session: StrictStr | None = Field(default=None, min_length=1, max_length=128)
    stream: StrictBool = False
    deadline_ms: StrictInt | None = Field(default=None, ge=1)
    max_new_tokens: StrictInt | None = Field(default=None, ge=1, le=8192)

    @field_validator("id")
    @classmethod
    def _short_id(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, str) and not 1 <= len(value) <= 128:
            raise ValueError("must be 1 to 128 characters")
        return value



def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def parse_request(payload: bytes, task: str, limits: Limits, response_topic: str | None = None,
                  correlation_data: bytes | None = None) -> Request | BadRequest:
    """MQTT v5 Response Topic + Correlation Data (if any) come in as arguments and win over `reply_to`.
    The reply route is not judged here: the caller checks it against its allowed routes (mqtt.routes)."""
    def bad(code: str, message: str, id: str | int | None = None, reply_to: str | None = None) -> BadRequest:
        return BadRequest(code, message, task, id, response_topic or reply_to, correlation_data)

    if len(payload) > limits.max_payload_bytes:
        return bad("too_long", f"payload is {len(payload)} bytes; the limit is {limits.max_payload_bytes}")
    try:
        raw = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad("bad_encoding", f"payload is not valid UTF-8 (byte {exc.start})")
    if not raw.lstrip().startswith("{"):
        fields: dict[str, Any] = {"text": raw}
    else:
        try:
            fields = json.loads(raw)
        except ValueError as exc:
            return bad("bad_json", f"payload starts with {{ but is not valid JSON: {exc}")
        except RecursionError:  # ~1000 nested levels fit in a few KB; json's parser recurses per level
            return bad("bad_json", "payload is JSON nested too deeply")
        if not isinstance(fields, dict):
            return bad("bad_json", "payload must be a JSON object")
        if _has_lone_surrogate(raw, fields):
            return bad("bad_encoding", "payload escapes a lone UTF-16 surrogate (\\ud800-\\udfff), which is not a character")
    try:
        body = _Body.model_validate(fields)
    except ValidationError as exc:
        id_, reply_to = _salvage(fields)
        return bad("bad_request", describe(exc, whole="request"), id_, reply_to)
    id_ = body.id if body.id is not None else new_request_id()
    if not body.text.strip():
        return bad("bad_request", "text: must not be empty", id_, body.reply_to)
    if len(body.text) > limits.max_text_chars:
        return bad("too_long", f"text: {len(body.text)} characters; the limit is {limits.max_text_chars}",
                   id_, body.reply_to)
    return Request(task=task, id=id_, text=body.text, reply_to=response_topic or body.reply_to,
                   correlation_data=correlation_data, session=body.session, stream=body.stream,
                   deadline_ms=body.deadline_ms, max_new_tokens=body.max_new_tokens)


def _has_lone_surrogate(raw: str, fields: dict) -> bool:
    """JSON's `\\ud800` escapes decode to strings UTF-8 cannot encode: every reply echoing them would fail."""
    if "\\u" not in raw:
        return False
    try:
        json.dumps(fields, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _salvage(fields: dict) -> tuple[str | int | None, str | None]:
    """The id and reply_to of an invalid request, if they are themselves valid, to route the error."""
    id_ = fields.get("id")
    if isinstance(id_, bool) or not isinstance(id_, (str, int)) or isinstance(id_, str) and len(id_) > 128:
        id_ = None
    reply_to = fields.get("reply_to")
    if not isinstance(reply_to, str):
        reply_to = None
    return id_, reply_to



def parse_cancel(payload: bytes) -> str | int | None:
    """A cancel names a request id: the bare id, or `{"id": ...}`. None if it names nothing usable."""
    try:
        raw = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if raw.startswith("{"):
        try:
            value = json.loads(raw).get("id")
        except (ValueError, AttributeError, RecursionError):
            return None
        return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    return raw or None


# -- replies ----------------------------------------------------------------------------------------

def ok_reply(task: str, id: str | int, result: dict, *, model: str, latency_ms: float, queue_ms: float,
             **extra: Any) -> dict:
    return {"id": id, "task": task, "status": "ok", "result": result, "latency_ms": latency_ms,
            "queue_ms": queue_ms, "model": model, **extra}


def error_reply(task: str, id: str | int | None, code: str, message: str, *, model: str,
                latency_ms: float = 0.0, queue_ms: float = 0.0, details: dict | None = None,
                **extra: Any) -> dict:
    """`details` go into the error object (e.g. `retry_after_ms`); `extra` at the top level."""
    error = {"code": code, "message": message, **(details or {})}
    return {"id": id, "task": task, "status": "error", "error": error, "latency_ms": latency_ms,
            "queue_ms": queue_ms, "model": model, **extra}


def outcome_reply(outcome: Outcome, *, model: str, **extra: Any) -> dict:
    """The final reply for a service outcome (MQTT and the HTTP task endpoints answer alike)."""
    error = outcome.error
    if error is None:
        return ok_reply(outcome.task, outcome.id, outcome.result or {}, model=model,
                        latency_ms=outcome.latency_ms, queue_ms=outcome.queue_ms, **extra)
    details = {"retry_after_ms": error.retry_after_ms} if error.retry_after_ms is not None else None
    if error.partial is not None:
        extra = {"result": error.partial, **extra}
    return error_reply(outcome.task, outcome.id, error.code, error.message, model=model,
                       latency_ms=outcome.latency_ms, queue_ms=outcome.queue_ms, details=details, **extra)


def chunk_message(task: str, id: str | int, seq: int, delta: str) -> dict:
    return {"id": id, "task": task, "seq": seq, "delta": delta}


def encode(message: dict) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
