"""Chat speed: first token with the cached system prompt vs recomputing it, decode tokens/s, and the
memory-bandwidth bound on decode measured on this machine in the same run.

Decode of one token reads every weight once, so tokens/s can be no more than
bandwidth / (bytes of weights read per token); the ratio says how close the loop gets.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from transformers import DynamicCache

from ..engine.generate import ChatGenerator
from ..tasks import GenerateTask

Tick = Callable[[int], None]
TTFT_PROMPT = "What should I check first when the living room lights stop responding?"
DECODE_PROMPT = "Explain in detail how a heat pump warms a house in winter."


def chat_speed(engine, task: GenerateTask, reps: int, decode_tokens: int, tick: Tick) -> dict:
    gen = ChatGenerator(engine.loaded.model, engine.loaded.tokenizer, task, 2048, decoder=engine.decoder)
    cached = [first_token_s(gen, TTFT_PROMPT, use_prefix=True) for _ in range(reps)]
    recomputed = [first_token_s(gen, TTFT_PROMPT, use_prefix=False) for _ in range(reps)]
    tick(1)
    decodes = [decode_rate(gen, decode_tokens) for _ in range(reps)]
    sampled = [decode_rate(gen, decode_tokens, sampled=True) for _ in range(reps)]
    tick(1)
    cached_ms, recomputed_ms = 1000 * statistics.median(cached), 1000 * statistics.median(recomputed)
    return {"prefix_tokens": gen.prefix.length, "rest_tokens": len(gen.prompt_ids(TTFT_PROMPT, [], 1)[0]),
            "first_token_cached_ms": cached_ms, "first_token_recomputed_ms": recomputed_ms,
            "first_token_speedup": recomputed_ms / cached_ms if cached_ms else None,
            "decode_tokens_per_s": statistics.median(d["tokens_per_s"] for d in decodes),
            "decode_new_tokens": decodes[0]["new_tokens"], "first_token_runs_ms": [1000 * x for x in cached],
            "decode_runs_tokens_per_s": [d["tokens_per_s"] for d in decodes],
            "decode_sampled_tokens_per_s": statistics.median(d["tokens_per_s"] for d in sampled),
            "decode_sampled_new_tokens": [d["new_tokens"] for d in sampled]}


def first_token_s(gen: ChatGenerator, text: str, use_prefix: bool) -> float:
    """Seconds from the text to the first (greedy) token: tokenize, prefill, pick.

    With the prefix only the user's turn runs; without it the very same ids run from an empty cache.
    """
    start = time.perf_counter()
    rest = gen.prompt_ids(text, [], 1)[0]
    if use_prefix:
        logits = gen.forward(torch.tensor([rest]), gen.prefix.cache(1), gen.prefix.length)
    else:
        logits = gen.forward(torch.tensor([gen.prefix.ids + rest]), DynamicCache(), 0)
    int(torch.argmax(logits))
    return time.perf_counter() - start


SAMPLING_SEED = 20250101  # every sampled run draws the same tokens


def decode_rate(gen: ChatGenerator, max_new_tokens: int, sampled: bool = False) -> dict:
    """Greedy (temperature 0) so every run decodes the same tokens; the engine's own loop and timing.
    `sampled`: at the task's own temperature and top_p, as its requests run by default, with a fixed seed."""
    update = {"seed": SAMPLING_SEED} if sampled else {"temperature": 0.0}
    settings = gen.task.generation.model_copy(update=update)
    stream = gen.stream(DECODE_PROMPT, settings=settings, max_new_tokens=max_new_tokens)
    for _ in stream:
        pass
    return {"tokens_per_s": stream.result.tokens_per_s, "new_tokens": stream.result.new_tokens}


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of reading a tensor far larger than the caches (median of `repeats` sums)."""
    data = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _median_seconds(data.sum, repeats)


def gemv_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s at which one fp32 matrix-vector product (torch's F.linear, as decode runs it) reads a weight
    matrix of `nbytes` shaped like an output head (rows of 896): the kernel's own ceiling for decode."""
    cols = 896
    weight = torch.ones(nbytes // 4 // cols, cols, dtype=torch.float32)
    x = torch.ones(1, cols)
    return weight.numel() * 4 / _median_seconds(lambda: torch.nn.functional.linear(x, weight), repeats)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median of `repeats` timed calls, after one untimed call that touches every page. Not the best: one
    lucky reading moved "decode % of bound" from 72 % to 36 % in an earlier run."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def bytes_per_token(model: torch.nn.Module, weight_bytes: int) -> int:
    """Weight bytes one decode step reads. Quantized: every packed Linear (quantize.decode_bytes). Float: all
    weights, except an input embedding table that is not also the output head (a lookup reads one row)."""
    from ..engine import quantize

    if getattr(model, "_llmqtt_weights", None) is not None:
        return quantize.decode_bytes(model)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    tied = isinstance(getattr(head, "weight", None), torch.Tensor) and head.weight.data_ptr() == embedding.data_ptr()
    return weight_bytes if tied else weight_bytes - embedding.numel() * embedding.element_size()