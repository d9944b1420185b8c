"""The same GGUF through llama-cpp-python, as a peer row. Optional: skipped when it is not installed."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Sequence

from ..engine.classify import few_shot_messages
from ..tasks import ClassifyTask
from .data import Row
from .seeds import MAX_NEW_TOKENS, parse_label
from .timing import latency_stats


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def peer_row(gguf: Path | None, task: ClassifyTask, rows: Sequence[Row], decode_tokens: int) -> dict:
    """Seeds' way (chat completion + parse) and decode tokens/s through llama.cpp, or why not."""
    if not available():
        return {"available": False, "reason": "llama-cpp-python is not installed"}
    if gguf is None or not gguf.is_file():
        return {"available": False, "reason": "no GGUF file for this model"}
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    seconds, hits = [], 0
    for row in rows:
        messages = [*few_shot_messages(task), {"role": "user", "content": task.render_user(row.text)}]
        start = time.perf_counter()
        out = llm.create_chat_completion(messages=messages, max_tokens=MAX_NEW_TOKENS, temperature=0.0)
        seconds.append(time.perf_counter() - start)
        hits += parse_label(out["choices"][0]["message"]["content"] or "", task.labels) == row.label
    start = time.perf_counter()
    out = llm.create_completion("Explain in detail how a heat pump warms a house in winter.",
                                max_tokens=decode_tokens, temperature=0.0)
    decode_s = time.perf_counter() - start
    tokens = out["usage"]["completion_tokens"]
    return {"available": True, "gguf": gguf.name, "seeds_way": {**latency_stats(seconds), "accuracy": hits / len(rows)},
            "decode_tokens_per_s": tokens / decode_s if decode_s > 0 else None}
