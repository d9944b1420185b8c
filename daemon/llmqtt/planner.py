"""Readings + model facts + config -> a plan: threads, dtype, memory budget, and whether the model fits.

Pure functions over frozen values: no torch import (except lazily in `apply_threads`), no file reads.
The daemon plans before it imports torch, so thread settings reach the OpenMP runtime in time and a
model that cannot fit is refused with an explanation instead of an OOM kill halfway through loading.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from dataclasses import dataclass, replace
from typing import Callable, Literal

from .config import ModelConfig, RuntimeConfig, choose_dtype  # noqa: F401 (choose_dtype re-exported)
from .readings import ModelFacts, SystemReadings

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

# Bytes per Linear parameter after dynamic int8 quantization: 1 for the int8 values plus the backend's
# packed copy and scales (measured with fbgemm on x86: 666 MiB for the demo model's 494M Linear params).
INT8_BYTES_PER_PARAM = 1.4

# safetensors dtype names -> ours: weights stored at the compute dtype are mmapped, not copied.
_STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

Verdict = Literal["ok", "swap", "refuse"]


class ModelTooLarge(Exception):
    """The model (at this dtype, context and batch) cannot fit in the memory this process can get."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan.explanation + "".join(f"\n- {s}" for s in plan.suggestions))
        self.plan = plan


# --------------------------------------------------------------------------- dtype


def dtype_notes(readings: SystemReadings, dtype: str, quantize: str = "none") -> list[str]:
    if quantize == "int8" and dtype != "float32":
        return [f"quantize: int8 works on float32 models only; the loader refuses {dtype}: set model.dtype: float32"]
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
    if "torch" not in sys.modules:
        return
    import torch  # already loaded: costs nothing, and keeps torch out of this module's import

    torch.set_num_threads(plan.threads)
    try:
        torch.set_num_interop_threads(plan.interop_threads)
    except RuntimeError:
        pass  # already set, or parallel work has started: torch keeps its current pool


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, each part named. `steady` is what stays while serving; `load_peak` is a moment at start-up."""

    weights: int  # parameters as held in memory (int8 Linear weights ~1.4 bytes, the rest at dtype)
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
    if quantize == "int8":
        linear = facts.param_count - facts.unquantized_params
        if facts.tie_word_embeddings:
            linear += facts.vocab_size * facts.hidden_size  # lm_head gets its own int8 copy of the tied matrix
        weights = int(linear * INT8_BYTES_PER_PARAM) + facts.unquantized_params * width
        load_peak = _int8_load_peak(facts, dtype, float_weights, weights)
    else:
        weights = float_weights
        load_peak = float_weights + RUNTIME_BYTES
    tokens = max_context * max_batch
    kv_cache = 2 * facts.num_hidden_layers * facts.num_key_value_heads * facts.head_dim * tokens * width
    return MemoryEstimate(weights, kv_cache, _activations(facts, width, tokens, max_batch), RUNTIME_BYTES,
                          load_peak)


def _int8_load_peak(facts: ModelFacts, dtype: str, float_weights: int, int8_weights: int) -> int:
    # engine/loader.py quantizes in place (a copy first would peak at 3.6 GiB anonymous memory for the demo
    # model instead of 1.2 GiB). Weights stored at the compute dtype are mmapped: the kernel can drop those
    # pages once they are read, so they do not count. Converted ones (a bf16 file loaded as fp32) are
    # anonymous memory until freed.
    converted = _STORED_DTYPES.get(facts.stored_dtype or "") != dtype
    return int(converted) * float_weights + int8_weights + RUNTIME_BYTES


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
    quantize: str
    memory: MemoryEstimate
    budget: MemoryBudget
    max_batch: int
    max_context: int
    requested_max_batch: int
    requested_max_context: int
    low_memory_bytes: int  # the MemoryGuard threshold
    verdict: Verdict
    explanation: str
    suggestions: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # warnings that do not change the verdict


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
    quantize = model_config.quantize
    dtype = choose_dtype(model_config.dtype)
    budget = memory_budget(readings)
    low_memory = low_memory_threshold(readings, runtime_config)
    # Size batch and context so a full batch stays above the MemoryGuard's threshold; otherwise every busy
    # moment would trip the guard into halving batches and refusing generations.
    room = None if budget.usable is None else budget.usable - low_memory
    batch, context, estimate = _fit(facts, dtype, quantize, runtime_config.max_batch,
                                    model_config.max_context, room)
    verdict = judge(estimate, budget)
    draft = Plan(threads=threads, interop_threads=interop, dtype=dtype, quantize=quantize, memory=estimate,
                 budget=budget, max_batch=batch, max_context=context,
                 requested_max_batch=runtime_config.max_batch, requested_max_context=model_config.max_context,
                 low_memory_bytes=low_memory, verdict=verdict,
                 explanation="", notes=tuple(dtype_notes(readings, dtype, quantize)))
    suggestions = tuple(suggest(draft, facts)) if verdict != "ok" else ()
    return replace(draft, explanation=explain(draft, facts), suggestions=suggestions)


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


def check_fits(p: Plan) -> None:
    """Raise ModelTooLarge when the plan's verdict is `refuse`; `swap` passes (the caller logs a warning)."""
    if p.verdict == "refuse":
        raise ModelTooLarge(p)


# --------------------------------------------------------------------------- words


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


def explain(p: Plan, facts: ModelFacts) -> str:
    m, b = p.memory, p.budget
    model = f"{facts.model_type or 'the'} model with {facts.param_count / 1e6:.0f}M parameters"
    weights = (f"{fmt_bytes(m.weights)} weights at {p.dtype}" if p.quantize == "none"
               else f"{fmt_bytes(m.weights)} weights with int8 Linear layers, the rest at {p.dtype}")
    needs = (f"The {model} needs {fmt_bytes(m.steady)} while serving ({weights}, KV cache {fmt_bytes(m.kv_cache)}"
             f" and activations {fmt_bytes(m.activations)} for batch {p.max_batch} x {p.max_context} tokens,"
             f" runtime {fmt_bytes(m.runtime)}) and {fmt_bytes(m.load_peak)} while loading.")
    swap = f"{fmt_bytes(b.swap_free)} free swap" if b.swap_free else "no swap"
    has = f" Available: {fmt_bytes(b.ram_available)} RAM, {swap}"
    has += f", {fmt_bytes(b.cgroup_headroom)} under the cgroup limit." if b.cgroup_headroom is not None else "."
    return needs + has + _lowered(p) + " " + _verdict_sentence(p)


def _lowered(p: Plan) -> str:
    changes = [f"{name} {now} (configured {asked})" for name, now, asked in (
        ("max_batch", p.max_batch, p.requested_max_batch), ("max_context", p.max_context, p.requested_max_context))
        if now != asked]
    return f" To fit, {' and '.join(changes)}." if changes else ""


def _verdict_sentence(p: Plan) -> str:
    m, b = p.memory, p.budget
    if b.usable is None:
        return "Memory could not be read, so the fit is not checked."
    if p.verdict == "ok":
        return "It fits in memory without swapping."
    if p.verdict == "swap":
        return ("It fits only by using swap for the load peak, the KV cache or activations: start-up and long"
                " prompts will be slow (very slow with swap on an SD card), and the kernel may OOM-kill under load.")
    if b.cgroup_headroom is not None and m.peak > b.cgroup_headroom:
        return "It does not fit under the cgroup memory limit (systemd MemoryMax= or the container's limit)."
    if m.resident > (b.ram_available if b.ram_available is not None else b.usable):
        return "It does not fit in RAM, and the weights cannot live in swap: every token would read them back from disk."
    if m.load_peak > m.steady:
        why = " (int8: the float weights and their int8 form are in memory together)" if p.quantize == "int8" else ""
        return f"Loading needs more than RAM plus free swap{why}."
    return "Its KV cache and activations do not fit in RAM plus free swap, even at the smallest batch and context."


def suggest(p: Plan, facts: ModelFacts) -> list[str]:
    """Concrete changes that would help, with the numbers they would give."""
    target = p.budget.usable or 0
    found = []
    if p.quantize == "none" and p.dtype == "float32":
        int8 = estimate_memory(facts, p.dtype, "int8", p.max_context, p.max_batch)
        found.append(f"model.quantize: int8 needs {fmt_bytes(int8.steady)} while serving (now"
                     f" {fmt_bytes(p.memory.steady)}) but {fmt_bytes(int8.load_peak)} while loading")
    if p.max_batch > 1:
        found.append(f"runtime.max_batch: 1 saves {fmt_bytes(_saving(p, facts, 1, p.max_context))}")
    if p.max_context > MIN_PLANNED_CONTEXT:
        found.append(f"model.max_context: {MIN_PLANNED_CONTEXT} saves"
                     f" {fmt_bytes(_saving(p, facts, p.max_batch, MIN_PLANNED_CONTEXT))}")
    found.append(_smaller_model(p, target))
    if p.budget.cgroup_headroom is not None and p.memory.peak > p.budget.cgroup_headroom:
        missing = p.memory.peak - p.budget.cgroup_headroom + 128 * MiB  # + slack for the page cache
        found.append(f"raise the cgroup memory limit (MemoryMax= in the unit, or docker --memory) by at least"
                     f" {fmt_bytes(missing)}")
    elif not p.budget.swap_free and p.memory.resident <= (p.budget.ram_available or 0):
        found.append(f"add swap of at least {fmt_bytes(p.memory.peak - target)} (zram or a swap file): only"
                     " transient memory would use it")
    return found


def _saving(p: Plan, facts: ModelFacts, batch: int, context: int) -> int:
    smaller = estimate_memory(facts, p.dtype, p.quantize, context, batch)
    return p.memory.steady - smaller.steady


def _smaller_model(p: Plan, target: int) -> str:
    """How many parameters would fit at this dtype/quantize, batch and context, steady and while loading."""
    m, width = p.memory, DTYPE_BYTES[p.dtype]
    serving_room = target - m.runtime - m.kv_cache - m.activations
    loading_room = target - m.runtime
    if p.quantize == "int8":
        # Count every parameter as a Linear weight: ~1.4 bytes while serving; while loading, the float
        # weights beside their int8 form (as for a converted checkpoint: conservative).
        per_param_serving = INT8_BYTES_PER_PARAM
        per_param_loading = width + INT8_BYTES_PER_PARAM
    else:
        per_param_serving = per_param_loading = width
    params = min(serving_room / per_param_serving, loading_room / per_param_loading)
    if params <= 0:
        return "a smaller model will not help: the runtime alone needs more than is available"
    what = f"{p.dtype}" + (" with int8" if p.quantize == "int8" else "")
    return f"a smaller model: up to about {params / 1e6:.0f}M parameters fit at {what}"


# --------------------------------------------------------------------------- runtime memory pressure


class MemoryGuard:
    """Watches available memory while serving: halves batches and refuses new generations when it is low.

    `read_available` returns bytes available (RAM capped by cgroup headroom), or None when unreadable,
    which counts as ok. Leaving the low state needs 25 % more than the threshold, so a reading that
    hovers around the threshold does not flip the state on every request.
    """

    RECOVER_FACTOR = 1.25

    def __init__(self, threshold_bytes: int, read_available: Callable[[], int | None]) -> None:
        self.threshold_bytes = threshold_bytes
        self._read_available = read_available
        self._low = False
        self._lock = threading.Lock()

    def state(self) -> Literal["ok", "low"]:
        available = self._read_available()
        with self._lock:
            if available is None:
                self._low = False
            elif self._low:
                self._low = available < self.threshold_bytes * self.RECOVER_FACTOR
            else:
                self._low = available < self.threshold_bytes
            return "low" if self._low else "ok"

    def batch_limit(self, max_batch: int) -> int:
        return max(1, max_batch // 2) if self.state() == "low" else max_batch

    def allow_generation(self) -> bool:
        # Generation grows a KV cache token by token; a classification is one short forward pass.
        return self.state() == "ok"
