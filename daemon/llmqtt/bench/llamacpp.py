"""The same GGUF through llama-cpp-python, measured the way llmqtt serves: the peer row of every full run.

Optional: llama-cpp-python is a bench-only peer (built from source once, never a runtime dependency).
It runs in its own subprocess, so its peak RSS is its own; the token ids come from llmqtt's tokenizer
(the GGUF's vocabulary is the same), so both engines read exactly the same tokens:

- sentiment: the task's few-shot prefix evaluated once; per message `n_tokens` goes back to the prefix
  length (llama.cpp drops the KV cache after it), the message's ids are evaluated and the label tokens'
  logits are read at the last position (`llama_get_logits_ith`), like engine/classify.py.
- first token: the chat task's system prompt evaluated once; per run, back to its length, the user's
  turn evaluated and the argmax taken.
- prompt tokens/s: the whole chat prompt from an empty cache; decode tokens/s: greedy tokens one by one.
Every speed figure is the median of `reps` runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .timing import latency_stats


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def peer_row(gguf: Path | None, work: dict, timeout: float = 1800) -> dict:
    """`work`: token ids for each measurement (see `_child`); returns the child's figures, or why not."""
    if not available():
        return {"available": False, "reason": "llama-cpp-python is not installed"}
    if gguf is None or not gguf.is_file():
        return {"available": False, "reason": "no GGUF file for this model"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"gguf": str(gguf), **work}, f)
    try:
        done = subprocess.run([sys.executable, "-m", "llmqtt.bench.llamacpp", f.name], capture_output=True,
                              text=True, timeout=timeout)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        return {"available": False, "reason": "llama.cpp run failed: " + " ".join(done.stderr.strip().splitlines()[-1:])}
    return {"available": True, "gguf": gguf.name, **json.loads(done.stdout.strip().splitlines()[-1])}


def _child(work: dict) -> dict:
    import llama_cpp
    import numpy as np

    from .startup import peak_rss_bytes

    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=work["gguf"], n_ctx=2048, n_batch=512, n_threads=work["threads"],
                          n_threads_batch=work["threads"], verbose=False)
    load_s = time.perf_counter() - started
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # [V] at the last evaluated position
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(vocab,))

    def from_prefix(prefix_len: int, ids: list[int]) -> np.ndarray:
        llm.n_tokens = prefix_len  # eval() drops the KV cache from here on
        llm.eval(ids)
        return last_logits()

    s = work["sentiment"]
    llm.reset()
    llm.eval(s["prefix"])  # once, like llmqtt's prefix cache
    seconds, right = [], 0
    for ids, gold in zip(s["rests"], s["gold"]):
        start = time.perf_counter()
        logits = from_prefix(len(s["prefix"]), ids)
        per_label = [float(np.logaddexp.reduce(logits[tokens])) for tokens in s["label_tokens"]]
        seconds.append(time.perf_counter() - start)
        right += s["labels"][int(np.argmax(per_label))] == gold
    sentiment = {**latency_stats(seconds), "accuracy": right / len(seconds) if seconds else None}

    c = work["chat"]
    llm.reset()
    llm.eval(c["prefix"])
    first = []
    for _ in range(work["reps"]):
        start = time.perf_counter()
        int(np.argmax(from_prefix(len(c["prefix"]), c["rest"])))
        first.append(time.perf_counter() - start)

    prompt_rates, decode_rates = [], []
    for _ in range(work["reps"]):
        llm.reset()
        start = time.perf_counter()
        llm.eval(c["decode_prompt"])
        prompt_rates.append(len(c["decode_prompt"]) / (time.perf_counter() - start))
        token = int(np.argmax(last_logits()))
        start = time.perf_counter()
        for _ in range(work["decode_tokens"] - 1):  # tokens after the first, as llmqtt's tokens_per_s counts
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        decode_rates.append((work["decode_tokens"] - 1) / (time.perf_counter() - start))
    return {"threads": work["threads"], "load_s": load_s, "sentiment": sentiment,
            "first_token_cached_ms": 1000 * statistics.median(first), "first_token_runs_ms": [1000 * x for x in first],
            "prefix_tokens": len(c["prefix"]), "rest_tokens": len(c["rest"]),
            "prompt_tokens_per_s": statistics.median(prompt_rates), "prompt_tokens": len(c["decode_prompt"]),
            "decode_tokens_per_s": statistics.median(decode_rates), "decode_runs_tokens_per_s": decode_rates,
            "decode_tokens": work["decode_tokens"], "peak_rss_bytes": peak_rss_bytes(),
            "gguf_bytes": Path(work["gguf"]).stat().st_size, "gguf_decode_bytes": gguf_decode_bytes(work["gguf"])}


def gguf_decode_bytes(path: str) -> int:
    """Bytes of the GGUF's tensors a decode step reads: all but the token embedding (one row a token)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name != "token_embd.weight")


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(Path(sys.argv[1]).read_text()))))
