"""A plan in words: what the model needs, what this machine has, the verdict, and what would help.

Used where a person reads the plan: `llmqtt doctor`, the start-up log, and the refusal of a model that
cannot fit (ModelTooLarge). Pure: plan + model facts in, sentences out.
"""

from __future__ import annotations

from .modelfacts import ModelFacts
from .planner import DTYPE_BYTES, MIN_PLANNED_CONTEXT, QUANTIZED_BYTES_PER_PARAM, GiB, MiB, Plan, estimate_memory


class ModelTooLarge(Exception):
    """The model (at this dtype, context and batch) cannot fit in the memory this process can get."""

    def __init__(self, plan: Plan, facts: ModelFacts) -> None:
        super().__init__(explain(plan, facts) + "".join(f"\n- {s}" for s in suggest(plan, facts)))
        self.plan = plan


def check_fits(p: Plan, facts: ModelFacts) -> None:
    """Raise ModelTooLarge when the plan's verdict is `refuse`; `swap` passes (the caller logs a warning)."""
    if p.verdict == "refuse":
        raise ModelTooLarge(p, facts)


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
               else f"{fmt_bytes(m.weights)} weights with {p.quantize} Linear layers, the rest at {p.dtype}")
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
        why = (f" ({p.quantize}: the first start holds the float weights and their {p.quantize} form together)"
               if p.quantize != "none" else "")
        return f"Loading needs more than RAM plus free swap{why}."
    return "Its KV cache and activations do not fit in RAM plus free swap, even at the smallest batch and context."


def suggest(p: Plan, facts: ModelFacts) -> list[str]:
    """Concrete changes that would help, with the numbers they would give; none when the plan is `ok`."""
    if p.verdict == "ok":
        return []
    target = p.budget.usable or 0
    found = []
    if p.quantize == "none" and p.dtype == "float32":
        int8 = estimate_memory(facts, p.dtype, "int8", p.max_context, p.max_batch)
        found.append(f"model.quantize: int8 needs {fmt_bytes(int8.steady)} while serving (now"
                     f" {fmt_bytes(p.memory.steady)}) and {fmt_bytes(int8.load_peak)} while loading")
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
    if p.quantize != "none":
        # Count every parameter as a Linear weight: ~1.4 bytes while serving; while loading, the float
        # weights beside their int8 form (as for a converted checkpoint: conservative).
        per_param_serving = QUANTIZED_BYTES_PER_PARAM[p.quantize]
        per_param_loading = width + per_param_serving
    else:
        per_param_serving = per_param_loading = width
    params = min(serving_room / per_param_serving, loading_room / per_param_loading)
    if params <= 0:
        return "a smaller model will not help: the runtime alone needs more than is available"
    what = f"{p.dtype}" + (f" with {p.quantize}" if p.quantize != "none" else "")
    return f"a smaller model: up to about {params / 1e6:.0f}M parameters fit at {what}"
