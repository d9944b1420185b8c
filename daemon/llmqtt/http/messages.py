"""What the HTTP APIs have in common, pure: a parsed chat call, coded errors and their HTTP status.

The Ollama and OpenAI parsers turn a JSON body into a `ChatCall` (the service's view: task, new message,
the client's history, its settings) or an `ApiError`; the server shell turns either into a job or a reply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..engine.types import ChatOptions, Turn
from ..tasks import ClassifyTask, GenerateTask

# Error code -> HTTP status. Refusals that a retry can fix carry Retry-After (503/429).
STATUS = {
    "bad_json": 400, "bad_request": 400, "bad_encoding": 400, "invalid_text": 400, "wrong_task_kind": 400,
    "format_unsupported": 400, "unauthorized": 401, "unknown_task": 404, "not_found": 404, "too_long": 413,
    "busy": 503, "low_memory": 503, "starting": 503, "stopping": 503, "expired": 504, "cancelled": 499,
}


@dataclass(frozen=True)
class ApiError:
    code: str
    message: str
    retry_after_ms: int | None = None

    @property
    def status(self) -> int:
        return STATUS.get(self.code, 500)

    def headers(self) -> dict[str, str]:
        """Retry-After in whole seconds (at least 1), when the refusal is temporary."""
        if self.retry_after_ms is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_ms / 1000)))}


@dataclass(frozen=True)
class ChatCall:
    task: str
    text: str  # the last user message
    history: tuple[Turn, ...] = ()
    options: ChatOptions = field(default_factory=ChatOptions)
    max_new_tokens: int | None = None
    stream: bool = True
    model: str = ""  # as the client named it, echoed in replies


Tasks = Mapping[str, ClassifyTask | GenerateTask]


def read_json(body: bytes) -> dict | ApiError:
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return ApiError("bad_encoding", f"body is not valid UTF-8 (byte {exc.start})")
    except ValueError as exc:
        return ApiError("bad_json", f"body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        return ApiError("bad_json", "body must be a JSON object")
    return data


def generate_task(tasks: Tasks, model: Any) -> str | ApiError:
    """`chat`, `chat:latest` (any tag) -> the generate task `chat`."""
    if not isinstance(model, str) or not model:
        return ApiError("bad_request", "model: required, e.g. \"chat:latest\"")
    name = model.split(":", 1)[0]
    task = tasks.get(name)
    if task is None:
        names = ", ".join(f"{n}:latest" for n, t in sorted(tasks.items()) if isinstance(t, GenerateTask))
        return ApiError("not_found", f"model '{model}' not found (models: {names})")
    if not isinstance(task, GenerateTask):
        return ApiError("wrong_task_kind", f"'{name}' is a classify task; ask it on /api/tasks/{name}")
    return name


def conversation(messages: Any) -> tuple[str | None, tuple[Turn, ...], str] | ApiError:
    """Chat messages -> (system prompt or None, history turns, last user message).

    System messages (anywhere) join into one system prompt, which replaces the task's. Consecutive turns of
    one role are joined, so history is clean user/assistant pairs. The last message must be the user's.
    """
    if not isinstance(messages, list) or not messages:
        return ApiError("bad_request", "messages: must be a non-empty list")
    system: list[str] = []
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return ApiError("bad_request", f"messages.{i}: must be an object with role and content")
        role, content = message.get("role"), text_content(message.get("content"))
        if isinstance(content, ApiError):
            return ApiError("bad_request", f"messages.{i}.content: {content.message}")
        if role == "system":
            system.append(content)
        elif role in ("user", "assistant"):
            if turns and turns[-1].role == role:
                turns[-1] = Turn(role, f"{turns[-1].content}\n\n{content}")
            else:
                turns.append(Turn(role, content))
        else:
            return ApiError("bad_request", f"messages.{i}.role: {role!r} is not system, user or assistant "
                                           "(tool calls are not supported)")
    if not turns or turns[-1].role != "user":
        return ApiError("bad_request", "messages: the last one must be from the user")
    if not turns[-1].content.strip():
        return ApiError("bad_request", "messages: the last user message is empty")
    return ("\n\n".join(system) if system else None), tuple(turns[:-1]), turns[-1].content


def text_content(content: Any) -> str | ApiError:
    """A message's text: a string, or OpenAI's list of parts of which only text parts are accepted."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                return ApiError("bad_request", "only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    return ApiError("bad_request", "must be a string")


def number(value: Any, name: str, low: float, high: float, integer: bool = False) -> float | int | None | ApiError:
    """An optional number within [low, high]; booleans are not numbers."""
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        return ApiError("bad_request", f"{name}: must be {kind} from {low:g} to {high:g}")
    return value


def stop_strings(value: Any, name: str) -> tuple[str, ...] | ApiError:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > 8:
        return ApiError("bad_request", f"{name}: must be a string or a list of at most 8 strings")
    return tuple(s for s in value if s)


def first_error(*values: Any) -> ApiError | None:
    return next((v for v in values if isinstance(v, ApiError)), None)
