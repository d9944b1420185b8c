"""The Ollama API (what Home Assistant's Ollama integration and the `ollama` Python client call), pure.

Every generate task is a model `<task>:latest`. Requests parse into a `ChatCall`; replies are built here as
dicts: NDJSON lines while streaming (each with `message.role`), a final line with `done: true` and the
counts and durations (nanoseconds) Ollama reports. The model is always loaded, so `keep_alive` is accepted
and has nothing to do.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from typing import Any

from ..engine.types import ChatOptions
from ..tasks import GenerateTask
from .messages import (ApiError, ChatCall, Tasks, conversation, first_error, generate_task, number, stop_strings)

# Go durations as Ollama's keep_alive takes them: "5m", "-1.0s", "1h30m", "250ms"; or a number of seconds.
_GO_DURATION = re.compile(r"^[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$|^[-+]?0$")
NS = 1_000_000_000


def parse_chat(body: dict, tasks: Tasks) -> ChatCall | ApiError:
    """POST /api/chat."""
    task = generate_task(tasks, body.get("model"))
    said = conversation(body.get("messages"))
    common = _common(body)
    error = first_error(task, said, common)
    if error:
        return error
    system, history, text = said  # type: ignore[misc]
    options, max_new_tokens = common  # type: ignore[misc]
    return ChatCall(task=task, text=text, history=history, options=_with_system(options, system),  # type: ignore[arg-type]
                    max_new_tokens=max_new_tokens, stream=_stream(body), model=body["model"])


def parse_generate(body: dict, tasks: Tasks) -> ChatCall | ApiError:
    """POST /api/generate: one prompt (and optionally a system prompt), no history."""
    task = generate_task(tasks, body.get("model"))
    common = _common(body)
    error = first_error(task, common)
    if error:
        return error
    prompt, system = body.get("prompt"), body.get("system")
    if not isinstance(prompt, str) or not prompt.strip():
        return ApiError("bad_request", "prompt: must be a non-empty string")
    if system is not None and not isinstance(system, str):
        return ApiError("bad_request", "system: must be a string")
    options, max_new_tokens = common  # type: ignore[misc]
    return ChatCall(task=task, text=prompt, options=_with_system(options, system or None),  # type: ignore[arg-type]
                    max_new_tokens=max_new_tokens, stream=_stream(body), model=body["model"])


def _stream(body: dict) -> bool:
    return body.get("stream") is not False  # Ollama streams unless told not to


def _with_system(options: ChatOptions, system: str | None) -> ChatOptions:
    return ChatOptions(system=system, temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                       seed=options.seed, stop=options.stop)


def _common(body: dict) -> tuple[ChatOptions, int | None] | ApiError:
    """options, keep_alive, format, tools: what /api/chat and /api/generate share."""
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and not (isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool)
                                       or isinstance(keep_alive, str) and _GO_DURATION.match(keep_alive.strip())):
        return ApiError("bad_request", f"keep_alive: {keep_alive!r} is not a duration such as \"5m\" or \"-1s\"")
    if body.get("format") not in (None, ""):
        return ApiError("format_unsupported", "format: structured (JSON) output is not supported by this "
                                              "server; leave format out")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        return ApiError("bad_request", "tools: must be a list")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        return ApiError("bad_request", "options: must be an object")
    num_predict = number(options.get("num_predict"), "options.num_predict", -2, 8192, integer=True)
    values = {
        "temperature": number(options.get("temperature"), "options.temperature", 0, 5),
        "top_p": number(options.get("top_p"), "options.top_p", 0, 1),
        "top_k": number(options.get("top_k"), "options.top_k", 0, 100000, integer=True),
        "seed": number(options.get("seed"), "options.seed", -(2**63), 2**63 - 1, integer=True),
        "stop": stop_strings(options.get("stop"), "options.stop"),
    }
    num_ctx = number(options.get("num_ctx"), "options.num_ctx", 1, 1 << 24, integer=True)  # ours: model.max_context
    error = first_error(num_predict, num_ctx, *values.values())
    if error:
        return error
    if values["top_p"] == 0:
        values["top_p"] = None  # 0 means "off" to some clients; the task's value then
    max_new_tokens = num_predict if isinstance(num_predict, int) and num_predict > 0 else None
    return ChatOptions(**values), max_new_tokens  # type: ignore[arg-type]


# -- replies ----------------------------------------------------------------------------------------

def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def chat_line(model: str, delta: str) -> dict:
    return {"model": model, "created_at": now_iso(), "message": {"role": "assistant", "content": delta}, "done": False}


def generate_line(model: str, delta: str) -> dict:
    return {"model": model, "created_at": now_iso(), "response": delta, "done": False}


def final_fields(result: dict, latency_ms: float) -> dict:
    """The counts and durations of Ollama's last line. prompt_eval_count is what ran (cached tokens did not)."""
    first_token_ms = result.get("first_token_ms") or 0.0
    eval_s = result["tokens"] / result["tokens_per_s"] if result.get("tokens_per_s") else 0.0
    return {"done": True, "done_reason": "length" if result.get("finish_reason") == "length" else "stop",
            "total_duration": int(latency_ms * 1e6), "load_duration": 0,
            "prompt_eval_count": max(1, result.get("prompt_tokens", 0) - result.get("cached_tokens", 0)),
            "prompt_eval_duration": int(first_token_ms * 1e6),
            "eval_count": result.get("tokens", 0), "eval_duration": int(eval_s * NS)}


def chat_final(model: str, result: dict, latency_ms: float, content: str = "") -> dict:
    return {"model": model, "created_at": now_iso(), "message": {"role": "assistant", "content": content},
            **final_fields(result, latency_ms)}


def generate_final(model: str, result: dict, latency_ms: float, content: str = "") -> dict:
    return {"model": model, "created_at": now_iso(), "response": content, **final_fields(result, latency_ms)}


def error_body(error: ApiError) -> dict:
    return {"error": error.message, "code": error.code}


def _details(model_name: str, dtype: str) -> dict:
    family = "qwen2" if "qwen" in model_name.lower() else model_name.split("/")[-1].split("-")[0].lower()
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
            "parameter_size": _parameter_size(model_name), "quantization_level": dtype.upper()}


def _parameter_size(model_name: str) -> str:
    match = re.search(r"(\d+(\.\d+)?)[bB]\b", model_name)
    return f"{match.group(1)}B" if match else ""


def _digest(name: str, task: GenerateTask, model_name: str) -> str:
    return hashlib.sha256(f"{model_name}\0{name}\0{task.system}".encode()).hexdigest()


def model_entries(tasks: Tasks, model_name: str, dtype: str, size_bytes: int, started: float) -> list[dict]:
    """GET /api/tags: each generate task as `<task>:latest`, with both `name` and `model` (clients read
    either)."""
    modified = datetime.fromtimestamp(started, timezone.utc).isoformat().replace("+00:00", "Z")
    return [{"name": f"{name}:latest", "model": f"{name}:latest", "modified_at": modified, "size": size_bytes,
             "digest": _digest(name, task, model_name), "details": _details(model_name, dtype)}
            for name, task in sorted(tasks.items()) if isinstance(task, GenerateTask)]


def running_entries(tasks: Tasks, model_name: str, dtype: str, size_bytes: int, started: float) -> list[dict]:
    """GET /api/ps: loaded for good (keep_alive has nothing to unload)."""
    return [{**entry, "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0}
            for entry in model_entries(tasks, model_name, dtype, size_bytes, started)]


def show(tasks: Tasks, model: Any, model_name: str, dtype: str) -> dict | ApiError:
    """POST /api/show: the task's system prompt and settings, in Ollama's shape."""
    name = generate_task(tasks, model)
    if isinstance(name, ApiError):
        return name
    task = tasks[name]
    assert isinstance(task, GenerateTask)
    g = task.generation
    parameters = "\n".join(f"{key} {value}" for key, value in (
        ("temperature", g.temperature), ("top_p", g.top_p), ("top_k", g.top_k), ("num_predict", g.max_new_tokens),
        ("repeat_penalty", g.repetition_penalty)))
    return {"modelfile": f"# llmqtt task {name} on {model_name}\nSYSTEM \"\"\"{task.system}\"\"\"\n",
            "parameters": parameters, "template": "", "system": task.system,
            "details": _details(model_name, dtype), "model_info": {"general.basename": model_name},
            "capabilities": ["completion"], "modified_at": now_iso()}
