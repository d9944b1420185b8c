"""The OpenAI chat completions API (the `openai` package, LangChain, HA's OpenAI-compatible integrations), pure.

Models are the generate tasks by name (`chat`; `chat:latest` is accepted too). Streaming is server-sent
events: one `chat.completion.chunk` per piece, a last chunk with `finish_reason`, then `data: [DONE]`.
Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import time
import uuid

from ..engine.types import ChatOptions
from ..tasks import GenerateTask
from .messages import ApiError, ChatCall, Tasks, conversation, first_error, generate_task, number, stop_strings


def parse_chat(body: dict, tasks: Tasks) -> ChatCall | ApiError:
    """POST /v1/chat/completions."""
    task = generate_task(tasks, body.get("model"))
    said = conversation(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    values = {
        "temperature": number(body.get("temperature"), "temperature", 0, 2),
        "top_p": number(body.get("top_p"), "top_p", 0, 1),
        "seed": number(body.get("seed"), "seed", -(2**63), 2**63 - 1, integer=True),
        "stop": stop_strings(body.get("stop"), "stop"),
    }
    limit = number(max_tokens, "max_tokens", 1, 8192, integer=True)
    n = number(body.get("n"), "n", 1, 1, integer=True)
    error = first_error(task, said, limit, n, *values.values())
    if error:
        return error
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return ApiError("format_unsupported", "response_format: only text is supported by this server")
    if body.get("tools") is not None and not isinstance(body.get("tools"), list):
        return ApiError("bad_request", "tools: must be a list")
    if values["top_p"] == 0:
        values["top_p"] = None
    system, history, text = said  # type: ignore[misc]
    return ChatCall(task=task, text=text, history=history, options=ChatOptions(system=system, **values),  # type: ignore[arg-type]
                    max_new_tokens=limit, stream=body.get("stream") is True, model=body["model"])  # type: ignore[arg-type]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _finish(result: dict) -> str:
    return "length" if result.get("finish_reason") == "length" else "stop"


def usage(result: dict) -> dict:
    prompt, completion = result.get("prompt_tokens", 0), result.get("tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(call_id: str, model: str, result: dict) -> dict:
    return {"id": call_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.get("text", "")},
                         "finish_reason": _finish(result)}],
            "usage": usage(result)}


def chunk(call_id: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": call_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def last_chunk(call_id: str, model: str, result: dict, with_usage: bool) -> dict:
    out = chunk(call_id, model, {}, _finish(result))
    if with_usage:
        out["usage"] = usage(result)
    return out


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 503: "server_error", 504: "server_error"}


def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": _TYPES.get(error.status, "server_error"), "param": None,
                      "code": error.code}}


def model_list(tasks: Tasks, started: float) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": int(started), "owned_by": "llmqtt"}
                                       for name, task in sorted(tasks.items()) if isinstance(task, GenerateTask)]}
