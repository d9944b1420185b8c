"""Readings + model facts + config -> a plan: threads, dtype, memory budget, and whether the model fits.

Numbers only; the plan in words (and the refusal) is explain.py, the guard that watches memory while
serving is memoryguard.py. Pure functions over frozen values: no torch import (except lazily in
`apply_threads`), no file reads.
The daemon plans before it imports torch, so thread settings reach the OpenMP runtime in time and a
model that cannot fit is refused with an explanation instead of an OOM kill halfway through loading.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Literal

from .config import ModelConfig, RuntimeConfig, choose_dtype, choose_quantize  # noqa: F401 (choose_dtype re-exported)
from .modelfacts import ModelFacts
from .readings import SystemReadings

MiB = 2**20
GiB = 2**30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# RSS of the process before any weight is touched, measured on x86_64 with torch 2.13 CPU and transformers
# 5.23: `import torch, transformers` 242 MiB; + the Qwen tokenizer (151k entries) 381 MiB; + the model
# built with its weights still unread (mmapped) 494 MiB. Rounded up for paho, pydantic and the service.
RUNTIME_BYTES = 512 * MiB

# Shrinking the context below this saves little (a 0.5B model's KV cache + activations are ~100 KiB per
# token at fp32, so 512 tokens are ~50 MiB) and leaves too little room for a system prompt plus text.
MIN_PLANNED_CONTEXT = 512

# Bytes per Linear parameter with quantized weights (engine/quantize.py), scales included: int8 keeps one
# byte a weight (fbgemm's packed copy; ours is dropped after packing) + a float32 scale per row; int4 (KleidiAI)
# half a byte + a bf16 scale per group of 32. The rows the embedding and classification read (the head's
# values, an untied model's int8 table) stay in the mapped quantized file, resident only as far as rows are
# read (engine/mapped.py); int4 keeps the head's float32 scales per 32 in memory.
QUANTIZED_BYTES_PER_PARAM = {"int8": 1.0, "int4": 0.5 + 2 / 32}
HEAD_ROWS_BYTES_PER_PARAM = {"int8": 0.0, "int4": 4 / 32}
# an untied model's own int8 embedding table; int4 counted as held until measured on a board (a Pi 5)
MAPPED_TABLE_BYTES_PER_PARAM = {"int8": 0.0, "int4": 1.0}
INT8_BYTES_PER_PARAM = QUANTIZED_BYTES_PER_PARAM["int8"]

# safetensors dtype names -> ours: weights stored at the compute dtype are mmapped, not copied.
_STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

Verdict = Literal["ok", "swap", "refuse"]


# --------------------------------------------------------------------------- dtype


def dtype_notes(readings: SystemReadings, dtype: str, quantize: str = "none") -> list[str]:
    if quantize != "none" and dtype != "float32":
        return [f"quantize: {quantize} computes in float32; the loader refuses {dtype}: set model.dtype: float32"]
    if dtype == "bfloat16" and not readings.native_bf16:
        return ["bfloat16 was requested but this CPU has no native bf16: expect ~2x slower than float32"]
    if dtype == "float16":
        return ["float16 on a CPU is emulated for most operations and usually slower than float32"]
    return []


# --------------------------------------------------------------------------- threads


def usable_cores(readings: SystemReadings) -> int:
    """Physical cores, cut down by a cgroup CPU quota and the process's CPU affinity."""
    cores = readings.physical_cores
    if readings.cpu_quota_cores is not None:
        # A fractional quota (2.5) cannot keep 3 threads busy without being throttled every period.
        cores = min(cores, max(1, math.floor(readings.cpu_quota_cores)))
    if readings.affinity_cores is not None:
        cores = min(cores, readings.affinity_cores)
    return max(1, cores)


def plan_threads(readings: SystemReadings, requested_threads: int | str,
                 requested_interop: int | str) -> tuple[int, int]:
    """(intra-op, inter-op) torch threads. Explicit config wins, then OMP_NUM_THREADS, then this rule:

    On 4 or more cores, leave one core free. Decoding a small model is bound by memory bandwidth, which
    2-3 cores already saturate on a Pi 5, so the 4th core adds little to tokens/s. Keeping it free keeps
    the MQTT thread, tokenization and the services that share an edge board (mosquitto, Home Assistant)
    responsive, and avoids the OpenMP straggler stall: every parallel op waits for its slowest thread,
    so one core borrowed by another process delays all four. On 1-3 cores a reserved core would cost a
    third or more of the compute, so all are used. Measure on the board and set `runtime.threads`.
    """
    if isinstance(requested_threads, int):
        intra = requested_threads
    elif readings.env_threads is not None:
        intra = readings.env_threads
    else:
        cores = usable_cores(readings)
        intra = cores - 1 if cores >= 4 else cores
    # The inter-op pool only runs TorchScript forks / parallel graph branches; eager inference never
    # uses it, so one thread is enough and saves a pool of idle threads per core.
    interop = requested_interop if isinstance(requested_interop, int) else 1
    return max(1, intra), max(1, interop)


def apply_threads(plan: Plan) -> None:
    """Put the plan's thread counts into effect. Call before importing torch.

    OpenMP/MKL/OpenBLAS read their env vars once, when torch loads them. They are overwritten, not just
    defaulted: the plan already honours an operator's OMP_NUM_THREADS (plan_threads: config, then env),
    and a stale value left in place would silently beat `runtime.threads`. If torch is already imported,
    its pools are set directly; the inter-op pool can only be sized once, before any parallel work, so a
    second attempt is ignored.
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(plan.threads)
    torch = sys.modules.get("torch")  # only if something loaded it already: the planner never imports it
    if torch is None:
        return
    torch.set_num_threads(plan.threads)
    try:
        torch.set_num_interop_threads(plan.interop_threads)
    except RuntimeError:
        pass  # already set, or parallel work has started: torch keeps its current pool


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, each part named. `steady` is what stays while serving; `load_peak` is a moment at start-up."""

    weights: int  # parameters as held in memory (quantized Linear weights, the rest at dtype)
    kv_cache: int  # 2 (K and V) x layers x kv_heads x head_dim x context x batch x dtype bytes
    activations: int  # one layer's temporaries for a full batch x context prefill, plus last-token logits
    runtime: int  # the Python process with torch and transformers imported, tokenizer loaded
    load_peak: int  # weights in memory at once while loading (and quantizing), + runtime

    @property
    def resident(self) -> int:
        """Read on every token: if this does not fit in RAM, each step pages weights back from disk."""
        return self.weights + self.runtime

    @property
    def steady(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime

    @property
    def peak(self) -> int:
        return max(self.steady, self.load_peak)


def estimate_memory(facts: ModelFacts, dtype: str, quantize: str, max_context: int,
                    max_batch: int) -> MemoryEstimate:
    width = DTYPE_BYTES[dtype]
    float_weights = facts.param_count * width
    if quantize in QUANTIZED_BYTES_PER_PARAM:
        head = facts.vocab_size * facts.hidden_size
        linear = facts.param_count - facts.unquantized_params + (head if facts.tie_word_embeddings else 0)
        embedding = 0 if facts.tie_word_embeddings else head * MAPPED_TABLE_BYTES_PER_PARAM[quantize]
        small = facts.unquantized_params - head  # norms (and biases counted there) stay float32
        weights = int(linear * QUANTIZED_BYTES_PER_PARAM[quantize] + head * HEAD_ROWS_BYTES_PER_PARAM[quantize]
                      + int(embedding) + max(small, 0) * width)
        load_peak = _quantized_load_peak(facts, dtype, float_weights, weights)
    else:
        weights = float_weights
        load_peak = float_weights + RUNTIME_BYTES
    tokens = max_context * max_batch
    kv_cache = 2 * facts.num_hidden_layers * facts.num_key_value_heads * facts.head_dim * tokens * width
    return MemoryEstimate(weights, kv_cache, _activations(facts, width, tokens, max_batch), RUNTIME_BYTES,
                          load_peak)


def _quantized_load_peak(facts: ModelFacts, dtype: str, float_weights: int, quantized: int) -> int:
    # Every start after the first reads the quantized file only. The first one quantizes from the float
    # checkpoint: stored at the compute dtype it is mmapped (clean pages the kernel can drop once read), so
    # it does not count; converted (a bf16 file loaded as fp32) it is anonymous memory until freed.
    converted = _STORED_DTYPES.get(facts.stored_dtype or "") != dtype
    return int(converted) * float_weights + quantized + RUNTIME_BYTES


def _activations(facts: ModelFacts, width: int, tokens: int, batch: int) -> int:
    # The MLP is the widest point of a layer: gate, up, act(gate) and their product (4 x intermediate) can
    # be alive at once, beside hidden-size tensors (residual, norm output, q/attention output...). Layers run
    # one after another, so one layer's worth is the peak. Attention scores are not counted: torch's CPU
    # SDPA kernel works in blocks instead of materialising context x context. Logits are computed for the
    # last token only and upcast to fp32 (x2 for the softmax). Calibrated on the demo model at fp32: a
    # 1 x 2048 (or 4 x 512) token forward peaked 231 MiB above the warm model, 8 x 1024 940 MiB; this
    # formula plus the KV cache gives 242 and 968 MiB.
    intermediate = facts.intermediate_size or 4 * facts.hidden_size
    per_token = (4 * intermediate + 6 * facts.hidden_size) * width
    logits = batch * facts.vocab_size * 4 * 2
    return tokens * per_token + logits


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class MemoryBudget:
    """What the process can get. None: not readable / no limit."""

    ram_available: int | None
    swap_free: int | None
    cgroup_headroom: int | None  # memory.max - memory.current, only when a limit exists
    usable: int | None  # min(ram_available, cgroup_headroom): what fits without swapping or OOM


@dataclass(frozen=True)
class Plan:
    threads: int
    interop_threads: int
    dtype: str
    quantize: str  # the scheme, `auto` resolved
    memory: MemoryEstimate
    budget: MemoryBudget
    max_batch: int
    max_context: int
    requested_max_batch: int
    requested_max_context: int
    low_memory_bytes: int  # the MemoryGuard threshold
    verdict: Verdict  # why, in words, and what would help: explain.py
    notes: tuple[str, ...] = ()  # warnings that do not change the verdict
    quantize_why: str = ""  # why this scheme (config.choose_quantize)
    max_generations: int = 1  # chats decoding side by side (runtime.max_generations, cut to fit memory)
    requested_max_generations: int = 1


def low_memory_threshold(readings: SystemReadings, runtime_config: RuntimeConfig) -> int:
    """`low_memory_mb`, or for `auto` 5 % of RAM but at least 256 MiB (a 4 GB Pi: 256 MiB; 32 GB: 1.6 GB)."""
    if isinstance(runtime_config.low_memory_mb, int):
        return runtime_config.low_memory_mb * MiB
    return max(256 * MiB, int((readings.ram_total or 0) * 0.05))


def memory_budget(readings: SystemReadings) -> MemoryBudget:
    return MemoryBudget(readings.ram_available, readings.swap_free, readings.cgroup_memory_headroom,
                        readings.memory_available)


def judge(estimate: MemoryEstimate, budget: MemoryBudget) -> Verdict:
    """ok: everything fits without swapping. swap: only the transient parts (load peak, KV cache,
    activations) would spill into swap while the weights stay in RAM: slow but alive. refuse: the rest.

    A cgroup limit is treated as hard: reclaim to swap inside a cgroup turns into thrashing, and most
    containers have no swap at all.
    """
    if budget.usable is None or estimate.peak <= budget.usable:
        return "ok"
    if budget.cgroup_headroom is not None and estimate.peak > budget.cgroup_headroom:
        return "refuse"
    ram = budget.ram_available if budget.ram_available is not None else budget.usable
    if estimate.resident <= ram and estimate.peak <= ram + (budget.swap_free or 0):
        return "swap"
    return "refuse"


def _candidates(batch: int, context: int) -> list[tuple[int, int]]:
    """(batch, context) from the requested size down: halve the batch to 1 first, then the context.

    Batch size is a throughput knob the caller never sees (requests just queue); max_context decides which
    requests are accepted at all, so it is the last thing to give up.
    """
    found = [(batch, context)]
    while found[-1][0] > 1:
        found.append((max(1, found[-1][0] // 2), context))
    while found[-1][1] > MIN_PLANNED_CONTEXT:
        found.append((1, max(MIN_PLANNED_CONTEXT, found[-1][1] // 2)))
    return found


def plan(readings: SystemReadings, facts: ModelFacts, model_config: ModelConfig,
         runtime_config: RuntimeConfig) -> Plan:
    threads, interop = plan_threads(readings, runtime_config.threads, runtime_config.interop_threads)
    dtype = choose_dtype(model_config.dtype)
    quantize, quantize_why = choose_quantize(model_config.quantize, readings.arch, readings.cpu_flags, dtype)
    budget = memory_budget(readings)
    low_memory = low_memory_threshold(readings, runtime_config)
    # Size batch and context so a full batch stays above the MemoryGuard's threshold; otherwise every busy
    # moment would trip the guard into halving batches and refusing generations.
    room = None if budget.usable is None else budget.usable - low_memory
    batch, context, estimate = _fit(facts, dtype, quantize, runtime_config.max_batch,
                                    model_config.max_context, room)
    verdict = judge(estimate, budget)
    spare = None if room is None else room - estimate.steady
    generations = plan_generations(facts, dtype, context, runtime_config.max_generations, spare)
    return Plan(threads=threads, interop_threads=interop, dtype=dtype, quantize=quantize, memory=estimate,
                 budget=budget, max_batch=batch, max_context=context,
                 requested_max_batch=runtime_config.max_batch, requested_max_context=model_config.max_context,
                 low_memory_bytes=low_memory, verdict=verdict, notes=tuple(dtype_notes(readings, dtype, quantize)),
                 quantize_why=quantize_why, max_generations=generations,
                 requested_max_generations=runtime_config.max_generations)


def generation_kv_bytes(facts: ModelFacts, dtype: str, context: int) -> int:
    """One generation's static KV cache (engine/decode.py): K and V for `context` positions in every layer,
    at the compute dtype (quantized models too). The demo model at float32, 2048 positions: 48 MiB."""
    return 2 * facts.num_hidden_layers * facts.num_key_value_heads * facts.head_dim * context * DTYPE_BYTES[dtype]


def plan_generations(facts: ModelFacts, dtype: str, context: int, requested: int, spare: int | None) -> int:
    """How many generations may decode side by side: `requested`, cut to the KV caches that fit in `spare`
    bytes (room left beside the steady state; None: unknown, no cut). One always: the steady state's KV
    cache covers it, and a board without room for one more chat still serves one."""
    if spare is None:
        return requested
    return max(1, min(requested, 1 + spare // generation_kv_bytes(facts, dtype, context)))


def _fit(facts: ModelFacts, dtype: str, quantize: str, batch: int, context: int,
         room: int | None) -> tuple[int, int, MemoryEstimate]:
    """The largest (batch, context) whose steady state fits in `room` bytes, else the smallest tried.

    Only the steady state depends on batch and context; the load peak does not, so it is not chased here.
    """
    candidates = _candidates(batch, context)
    for b, c in candidates:
        estimate = estimate_memory(facts, dtype, quantize, c, b)
        if room is None or estimate.steady <= room:
            return b, c, estimate
    b, c = candidates[-1]
    return b, c, estimate_memory(facts, dtype, quantize, c, b)
