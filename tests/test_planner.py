"""The planner over hand-made readings: real board shapes, real model shapes, no hardware, no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
from llmqtt.config import ModelConfig, RuntimeConfig
from llmqtt.explain import ModelTooLarge, check_fits, explain, suggest
from llmqtt.memoryguard import MemoryGuard
from llmqtt.modelfacts import ModelFacts
from llmqtt.planner import (
    INT8_BYTES_PER_PARAM,
    RUNTIME_BYTES,
    GiB,
    MiB,
    choose_dtype,
    estimate_memory,
    judge,
    low_memory_threshold,
    memory_budget,
    plan,
    plan_threads,
)
from llmqtt.readings import SystemReadings

KiB = 1024


def qwen25_05b(tied: bool = False) -> ModelFacts:
    """Qwen2.5-0.5B's shapes: 24 layers, hidden 896, 14 heads / 2 KV heads of 64, vocab 151936."""
    h, v, layers = 896, 151936, 24
    linear = layers * (h * 896 + 2 * h * 128 + 896 * h + 3 * h * 4864) + (0 if tied else v * h)
    unquantized = v * h + layers * (2 * h + 896 + 2 * 128) + h  # embeddings, norms, q/k/v biases
    return ModelFacts(model_type="qwen2", hidden_size=h, num_hidden_layers=layers, num_attention_heads=14,
                      num_key_value_heads=2, head_dim=64, vocab_size=v, intermediate_size=4864,
                      tie_word_embeddings=tied, param_count=linear + unquantized, unquantized_params=unquantized,
                      weight_bytes=0, stored_dtype="F32", weight_files=1, params_source="safetensors")


def board(**changes) -> SystemReadings:
    """A Raspberry Pi 5 4 GB on Raspberry Pi OS Lite: no bf16, no swap, MemAvailable 3.43 GiB."""
    pi5 = SystemReadings(arch="aarch64", cpu_model="Cortex-A76", board_model="Raspberry Pi 5 Model B Rev 1.0",
                         cpu_flags=frozenset({"fp", "asimd", "asimdhp", "asimddp"}), physical_cores=4,
                         logical_cores=4, ram_total=4_045_000 * KiB, ram_available=3_600_000 * KiB,
                         swap_total=0, swap_free=0, cgroup_version=2, memory_controller=True, cgroup_memory_max="max",
                         cgroup_memory_current=300 * MiB)
    return replace(pi5, **changes)


def plan_for(readings: SystemReadings, facts: ModelFacts | None = None, **model) -> object:
    """float32 unless the test asks for a scheme (the memory arithmetic below is about float32)."""
    return plan(readings, facts or qwen25_05b(), ModelConfig(**{"quantize": "none", **model}), RuntimeConfig())


# --------------------------------------------------------------------------- memory verdicts


def test_pi5_4gb_fits_fp32_after_lowering_the_batch() -> None:
    facts = qwen25_05b(tied=False)
    assert facts.param_count == 630_167_424  # 494M + an untied 151936 x 896 lm_head
    p = plan_for(board(), facts)
    assert p.dtype == "float32" and p.memory.weights == facts.param_count * 4  # 2.35 GiB
    # Resident 2.35 GiB weights + 512 MiB runtime = 2.85 GiB of 3.43 GiB available, minus 256 MiB kept
    # above the low-memory threshold: 0.32 GiB for KV cache and activations. Batch 16 x 2048 tokens would
    # need 3.8 GiB of them, batch 2 x 2048 486 MiB, batch 1 x 2048 243 MiB.
    assert p.verdict == "ok"
    assert (p.max_batch, p.max_context) == (1, 2048)
    assert "To fit, max_batch 1 (configured 16)." in explain(p, facts)
    assert p.memory.steady <= p.budget.usable - p.low_memory_bytes
    assert estimate_memory(facts, "float32", "none", 2048, 2).steady > p.budget.usable - p.low_memory_bytes
    assert suggest(p, facts) == []
    check_fits(p, facts)


def test_2gb_board_is_refused_with_suggestions() -> None:
    facts = qwen25_05b()
    p = plan_for(board(ram_total=2_000_000 * KiB, ram_available=1_700_000 * KiB), facts)
    assert p.verdict == "refuse"
    assert (p.max_batch, p.max_context) == (1, 512)  # tried everything down to the floor
    assert "does not fit in RAM" in explain(p, facts)
    text = "\n".join(suggest(p, facts))
    assert "model.quantize: int8" in text and "a smaller model: up to about" in text
    with pytest.raises(ModelTooLarge) as caught:
        check_fits(p, facts)
    assert caught.value.plan is p and "model.quantize: int8" in str(caught.value)


def test_cgroup_limit_refuses_even_with_lots_of_host_ram() -> None:
    container = board(arch="x86_64", cpu_flags=frozenset({"avx2"}), physical_cores=16, logical_cores=32,
                      ram_total=64 * GiB, ram_available=60 * GiB, swap_total=8 * GiB, swap_free=8 * GiB,
                      cgroup_memory_max=GiB, cgroup_memory_current=50 * MiB)
    facts = qwen25_05b()
    p = plan_for(container, facts)
    assert p.budget.usable == GiB - 50 * MiB
    assert p.verdict == "refuse" and "cgroup memory limit" in explain(p, facts)
    assert any(s.startswith("raise the cgroup memory limit") for s in suggest(p, facts))


def test_cgroup_without_memory_controller_uses_ram_only() -> None:
    p = plan_for(board(ram_total=8 * GiB, ram_available=7 * GiB, memory_controller=False, cgroup_memory_max=None))
    assert p.budget.cgroup_headroom is None and p.budget.usable == 7 * GiB
    assert p.verdict == "ok" and (p.max_batch, p.max_context) == (8, 2048)


def test_swap_verdict_when_only_the_transient_part_spills() -> None:
    # A bf16 checkpoint loaded as fp32 for int8 is an anonymous float copy while quantizing: that may swap.
    bf16_file = replace(qwen25_05b(), stored_dtype="BF16")
    # (3.2 GiB available: the int8 weights, read by rows from the mapped file, leave the steady state ~0.5 GB)
    p = plan_for(board(swap_total=4 * GiB, swap_free=4 * GiB, ram_available=3_350_000 * KiB), bf16_file, quantize="int8")
    assert p.memory.steady <= p.budget.usable < p.memory.load_peak
    assert p.verdict == "swap" and "swap" in explain(p, bf16_file)
    check_fits(p, bf16_file)  # swap passes; the daemon warns


def test_fp32_near_the_edge_shrinks_the_context() -> None:
    # Resident 2.85 GiB (weights + runtime) of 3.1 GiB: only batch 1 with a shorter context keeps the
    # 256 MiB low-memory margin.
    p = plan_for(board(ram_available=int(3.1 * GiB)))
    assert p.verdict == "ok" and (p.max_batch, p.max_context) == (1, 512)


def test_weights_that_do_not_fit_in_ram_are_refused_despite_swap() -> None:
    p = plan_for(board(ram_available=2 * GiB, swap_total=8 * GiB, swap_free=8 * GiB))
    assert p.memory.resident > 2 * GiB and p.verdict == "refuse"


def test_unknown_memory_does_not_block() -> None:
    p = plan_for(board(ram_total=None, ram_available=None, swap_total=None, swap_free=None))
    assert p.verdict == "ok" and "not checked" in explain(p, qwen25_05b())


def test_add_swap_suggested_when_it_would_help() -> None:
    bf16_file = replace(qwen25_05b(), stored_dtype="BF16")
    p = plan_for(board(ram_available=3_350_000 * KiB), bf16_file, quantize="int8")
    assert p.verdict == "refuse"
    assert "Loading needs more than RAM plus free swap (int8: the first start holds the float weights" in explain(p, bf16_file)
    assert any(s.startswith("add swap of at least") for s in suggest(p, bf16_file))


# --------------------------------------------------------------------------- memory arithmetic


def test_kv_cache_formula() -> None:
    facts = qwen25_05b()
    m = estimate_memory(facts, "float32", "none", max_context=2048, max_batch=3)
    assert m.kv_cache == 2 * 24 * 2 * 64 * 2048 * 3 * 4
    assert m.runtime == RUNTIME_BYTES and m.load_peak == m.weights + RUNTIME_BYTES
    assert m.steady == m.weights + m.kv_cache + m.activations + m.runtime
    half = estimate_memory(facts, "bfloat16", "none", 2048, 3)
    assert half.weights * 2 == m.weights and half.kv_cache * 2 == m.kv_cache


def test_quantized_weights_count_packed_linears_and_norms_at_dtype() -> None:
    untied, tied = qwen25_05b(False), qwen25_05b(True)
    head = 151936 * 896
    small = untied.unquantized_params - head  # norms and biases stay float32
    # Untied: every Linear (lm_head included) at 1 byte in fbgemm's copy; the head's rows and the embedding's
    # own int8 table stay in the mapped file (resident only as rows are read).
    m = estimate_memory(untied, "float32", "int8", 512, 1)
    linear = untied.param_count - untied.unquantized_params
    assert m.weights == int(linear + small * 4)
    assert m.weights < untied.param_count * 4 / 4
    # Tied: lm_head is a Linear of its own (the embedding reads its rows from the file).
    t = estimate_memory(tied, "float32", "int8", 512, 1)
    assert t.weights == int(tied.param_count - tied.unquantized_params + head + small * 4)
    four = estimate_memory(tied, "float32", "int4", 512, 1)
    assert four.weights < t.weights * 0.7


def test_auto_on_a_pi5_plans_int4_and_says_why() -> None:
    p = plan(board(), qwen25_05b(), ModelConfig(), RuntimeConfig())
    assert p.quantize == "int4" and "asimddp" in p.quantize_why
    # 541 MiB of weights instead of float32's 1.84 GiB: the 4 GB board now fits batch 8 at full context.
    assert p.memory.weights < 600 * MiB and p.verdict == "ok" and (p.max_batch, p.max_context) == (8, 2048)


def test_int8_load_peak_counts_the_float_copies() -> None:
    fp32_file = qwen25_05b()
    float_weights = fp32_file.param_count * 4
    m = estimate_memory(fp32_file, "float32", "int8", 512, 1)
    # Stored at fp32 -> mmapped while the first start quantizes: only the int8 weights are new memory.
    assert m.load_peak == m.weights + RUNTIME_BYTES
    # Stored at bf16 -> converted to an fp32 model in anonymous memory first.
    bf16_file = replace(fp32_file, stored_dtype="BF16")
    assert estimate_memory(bf16_file, "float32", "int8", 512, 1).load_peak == float_weights + m.weights + RUNTIME_BYTES


def test_judge_edges() -> None:
    m = estimate_memory(qwen25_05b(), "float32", "none", 512, 1)
    exact = board(ram_available=m.peak, swap_free=0)
    assert judge(m, memory_budget(exact)) == "ok"
    assert judge(m, memory_budget(replace(exact, ram_available=m.peak - 1))) == "refuse"


def test_low_memory_threshold() -> None:
    assert low_memory_threshold(board(), RuntimeConfig()) == 256 * MiB
    assert low_memory_threshold(board(ram_total=32 * GiB), RuntimeConfig()) == int(32 * GiB * 0.05)
    assert low_memory_threshold(board(), RuntimeConfig(low_memory_mb=100)) == 100 * MiB
    assert plan_for(board()).low_memory_bytes == 256 * MiB


# --------------------------------------------------------------------------- dtype and threads


@pytest.mark.parametrize("arch, flags", [
    ("aarch64", {"fp", "asimd"}),  # Pi 5: Cortex-A76 has no bf16
    ("aarch64", {"fp", "asimd", "bf16"}),  # Neoverse V1, Graviton 3
    ("x86_64", {"avx512f", "avx512_bf16"}),  # Zen 4: bf16 mixed on the bench machine
])
def test_auto_dtype_is_float32_everywhere(arch: str, flags: set[str]) -> None:
    assert choose_dtype("auto") == "float32"
    assert plan_for(board(arch=arch, cpu_flags=frozenset(flags), ram_total=16 * GiB, ram_available=15 * GiB)).dtype == "float32"


def test_int8_needs_float32() -> None:
    avx512_bf16 = board(arch="x86_64", cpu_flags=frozenset({"avx512_bf16"}), ram_total=16 * GiB, ram_available=15 * GiB)
    assert plan_for(avx512_bf16, quantize="int8").dtype == "float32"
    p = plan_for(avx512_bf16, quantize="int8", dtype="bfloat16")
    assert p.notes[0].startswith("quantize: int8 computes in float32")


def test_explicit_dtype_is_kept_with_a_note() -> None:
    assert choose_dtype("float16") == "float16"
    p = plan_for(board(ram_total=8 * GiB, ram_available=7 * GiB), dtype="bfloat16")
    assert p.dtype == "bfloat16" and "no native bf16" in p.notes[0]


def test_threads_on_boards() -> None:
    assert plan_threads(board(), "auto", "auto") == (3, 1)  # Pi 5: leave a core for IO and neighbours
    assert plan_threads(board(physical_cores=2, logical_cores=2), "auto", "auto") == (2, 1)
    assert plan_threads(board(physical_cores=8, logical_cores=16), "auto", "auto") == (7, 1)
    assert plan_threads(board(), 4, 2) == (4, 2)  # config wins
    assert plan_threads(board(env_threads=2), "auto", "auto") == (2, 1)  # then OMP_NUM_THREADS


def test_threads_respect_cpu_quota_and_affinity() -> None:
    host = board(physical_cores=16, logical_cores=32)
    assert plan_threads(replace(host, cpu_quota_cores=2.5), "auto", "auto") == (2, 1)
    assert plan_threads(replace(host, cpu_quota_cores=0.5), "auto", "auto") == (1, 1)
    assert plan_threads(replace(host, cpu_quota_cores=4.0), "auto", "auto") == (3, 1)
    assert plan_threads(replace(host, affinity_cores=3), "auto", "auto") == (3, 1)


# --------------------------------------------------------------------------- runtime guard


class Feed:
    def __init__(self, *values: int | None) -> None:
        self.values = list(values)

    def __call__(self) -> int | None:
        return self.values.pop(0)


def test_memory_guard_halves_and_recovers_with_hysteresis() -> None:
    feed = Feed(1000, 90, 110, 130, 50, None)
    guard = MemoryGuard(100, read_available=feed)
    assert guard.batch_limit(16) == 16  # 1000: ok
    assert guard.batch_limit(16) == 8  # 90: low
    assert not guard.allow_generation()  # 110: still low (needs 125 to recover)
    assert guard.allow_generation()  # 130: ok again
    assert guard.batch_limit(1) == 1  # 50: low, but never below 1
    assert guard.state() == "ok"  # unreadable counts as ok


# --------------------------------------------------------------------------- purity and apply_threads


def run_python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_planner_readings_doctor_do_not_import_torch() -> None:
    out = run_python("import sys, llmqtt.planner, llmqtt.readings, llmqtt.doctor; print('torch' in sys.modules)")
    assert out == "False"


APPLY = """
import os, sys
from dataclasses import replace
from llmqtt.planner import apply_threads, plan
from llmqtt.config import ModelConfig, RuntimeConfig
sys.path.insert(0, {tests!r})
from test_planner import board, qwen25_05b
p = replace(plan(board(), qwen25_05b(), ModelConfig(), RuntimeConfig()), threads=3, interop_threads=1)
"""


def test_apply_threads_before_torch_sets_env_only() -> None:
    code = APPLY.format(tests=os.path.dirname(__file__)) + (
        "apply_threads(p); print('torch' in sys.modules, os.environ['OMP_NUM_THREADS'],"
        " os.environ['MKL_NUM_THREADS'])")
    assert run_python(code) == "False 3 3"
    # The operator's OMP_NUM_THREADS reaches the plan (config `auto`), so applying the plan keeps it...
    code = APPLY.format(tests=os.path.dirname(__file__)) + (
        "from llmqtt.readings import read_system\n"
        "q = plan(replace(board(), env_threads=read_system().env_threads), qwen25_05b(), ModelConfig(), RuntimeConfig())\n"
        "apply_threads(q); print(q.threads, os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])")
    assert run_python(code, OMP_NUM_THREADS="2") == "2 2 2"
    # ...but an explicit `runtime.threads` wins over it, also for the libraries torch loads later.
    code = APPLY.format(tests=os.path.dirname(__file__)) + "apply_threads(p); print(os.environ['OMP_NUM_THREADS'])"
    assert run_python(code, OMP_NUM_THREADS="2") == "3"


def test_apply_threads_after_torch_sets_pools_and_tolerates_a_second_call() -> None:
    code = APPLY.format(tests=os.path.dirname(__file__)) + (
        "import torch\n"
        "apply_threads(p)\n"
        "torch.ones(1000, 1000) @ torch.ones(1000, 1000)\n"
        "apply_threads(replace(p, threads=2, interop_threads=2))\n"
        "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    assert run_python(code) == "2 1"


# --------------------------------------------------------------------------- generations side by side


def test_generations_are_cut_to_the_kv_caches_that_fit() -> None:
    from llmqtt.planner import generation_kv_bytes

    facts = qwen25_05b()
    assert generation_kv_bytes(facts, "float32", 2048) == 2 * 24 * 2 * 64 * 2048 * 4 == 48 * MiB
    roomy = plan_for(board(ram_total=16 * GiB, ram_available=14 * GiB))
    assert roomy.max_generations == roomy.requested_max_generations == RuntimeConfig().max_generations == 4
    # The Pi 5 4 GB at float32: batch 1 x 2048 leaves ~80 MiB beside the steady state: one more 48 MiB cache.
    tight = plan_for(board())
    spare = tight.budget.usable - tight.low_memory_bytes - tight.memory.steady
    assert tight.max_generations == 1 + spare // (48 * MiB) < 4
    unknown = plan(board(ram_available=None, cgroup_memory_max=None), facts, ModelConfig(quantize="none"),
                   RuntimeConfig(max_generations=6))
    assert unknown.max_generations == 6  # no reading, no cut
    assert plan(board(ram_available=600 * MiB), facts, ModelConfig(quantize="int8"),
                RuntimeConfig()).max_generations >= 1  # never below one
