"""llmqtt's own int8 product for AVX2 (engine/int8_avx2.cpp via engine/kernels.py): its selection, its
numbers against integer arithmetic done here, and fbgemm where it can't serve."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from llmqtt.config import INT8_KERNEL_TOOLS, choose_int8_kernel
from llmqtt.engine import kernels, quantize as quant, quantstore
from tinymodel import build_tiny_model

ON_THIS_MACHINE = choose_int8_kernel(platform.machine(), {"avx2"} if torch.backends.cpu.get_cpu_capability()
                                     in ("AVX2", "AVX512") else set(), {t for t in INT8_KERNEL_TOOLS if shutil.which(t)})
# Where the kernel should build, it must: a failed build here is a bug, not a reason to skip.
NEEDS_KERNEL = pytest.mark.skipif(ON_THIS_MACHINE[0] != "llmqtt AVX2", reason=ON_THIS_MACHINE[1])


@pytest.mark.parametrize("arch, flags, tools, kernel, why", [
    ("x86_64", {"avx2", "fma"}, {"c++", "ninja"}, "llmqtt AVX2", "AVX2"),
    ("x86_64", {"sse4_2"}, {"c++", "ninja"}, "fbgemm", "no AVX2"),
    ("x86_64", {"avx2"}, {"c++"}, "fbgemm", "ninja not installed"),
    ("x86_64", {"avx2"}, set(), "fbgemm", "c++ and ninja not installed"),
    ("aarch64", {"asimddp"}, {"c++", "ninja"}, "fbgemm", "x86"),
])
def test_the_kernel_is_chosen_from_the_cpu_and_the_tools(arch, flags, tools, kernel, why):
    chosen, reason = choose_int8_kernel(arch, flags, tools)
    assert chosen == kernel and why in reason


def _expected(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, in integer arithmetic: x per row to uint8 (zero point from min/max with 0
    included, round half to even), exact int dot products, then the scales."""
    rows = x.reshape(-1, x.shape[-1])
    lo, hi = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    z = torch.round(-lo / s).clamp(0, 255)
    q = (torch.round(rows * (1 / s)[:, None]) + z[:, None]).clamp(0, 255).to(torch.int64)
    dots = q @ w.to(torch.int64).T - z.to(torch.int64)[:, None] * w.to(torch.int64).sum(1)
    y = s[:, None] * scale * dots.to(torch.float32) + (0 if bias is None else bias)
    return y.reshape(*x.shape[:-1], -1)


@NEEDS_KERNEL
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9])  # 4 rows share a pass over the weights: all remainders
@pytest.mark.parametrize("in_features", [12, 30, 896])  # 12, 30: quantizing's 8-wide loop has a tail; 30 pads
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_kernel_computes_what_integer_arithmetic_says(tokens, in_features, with_bias):
    assert kernels.load() is None
    g = torch.Generator().manual_seed(tokens * in_features)
    w = torch.randint(-64, 64, (43, in_features), dtype=torch.int8, generator=g)  # 7-bit, as stored; 43 pads
    scale, bias = torch.rand(43, generator=g) / 50, torch.randn(43, generator=g) if with_bias else None
    x = torch.randn(2, tokens, in_features, generator=g) * 3
    blocked = kernels.block(w, chunk_rows=16)  # several chunks
    got = kernels.product(x, blocked, scale, kernels.row_sums(blocked, 43), bias)
    assert got.shape == (2, tokens, 43)
    torch.testing.assert_close(got, _expected(x, w, scale, bias), rtol=1e-5, atol=1e-4)


@NEEDS_KERNEL
@pytest.mark.parametrize("rows, cols, shape", [(48, 20, (6, 5, 8, 4)), (45, 18, (6, 5, 8, 4))])
def test_blocking_keeps_every_row_and_the_row_sums_are_exact(rows, cols, shape):
    w = torch.randint(-64, 64, (rows, cols), dtype=torch.int8)
    blocked = kernels.block(w, chunk_rows=16)
    assert blocked.shape == shape
    rows_back = blocked.permute(0, 2, 1, 3).reshape(shape[0] * 8, shape[1] * 4)  # [N/8, 8, K/4, 4] -> [N, K]
    assert torch.equal(rows_back[:rows, :cols], w) and not rows_back[rows:].any() and not rows_back[:, cols:].any()
    assert torch.equal(kernels.row_sums(blocked, rows), w.sum(1, dtype=torch.int32))


@NEEDS_KERNEL
def test_a_model_on_the_kernel_answers_like_one_on_fbgemm(tmp_path):
    """The same stored int8 weights through both kernels: close logits (activations are quantized per row by
    ours, per call by fbgemm), prefill and a decoded token over the KV cache."""
    model_dir = build_tiny_model(tmp_path / "m")
    store = quant.QuantizedStore(tmp_path / "q")
    quant.load_quantized(model_dir, "int8", store)
    ours_packing = quantstore.EarlyPacking(store.load(model_dir, "int8"), fuse=True)
    ours = quant.build(model_dir, ours_packing.source, "int8", ours_packing)
    mapped = store.load(model_dir, "int8")
    fbgemm = quant.build(model_dir, mapped, "int8", _fbgemm_packing(mapped))
    assert ours._llmqtt_int8_kernel == "llmqtt AVX2" and fbgemm._llmqtt_int8_kernel == "fbgemm"
    served = [m for m in ours.modules() if isinstance(m, quant.Int8Linear) and m.packed]
    assert served and all(m.blocked is not None for m in served)  # ragged shapes too (the tiny vocab: padded)
    assert not any(m.blocked is not None for m in fbgemm.modules() if isinstance(m, quant.Int8Linear))
    pad = lambda n, to: -(-n // to) * to  # noqa: E731
    assert all(m.blocked.numel() == pad(m.out_features, 8) * pad(m.in_features, 4) for m in served)  # one copy
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        runs = []
        for model in (ours, fbgemm):
            out = model(ids, use_cache=True)
            step = model(torch.tensor([[3]]), past_key_values=out.past_key_values, use_cache=True)
            runs.append(torch.cat([out.logits[0], step.logits[0]]))
    assert (runs[0] - runs[1]).abs().max() < 0.05 * runs[1].abs().max()
    assert torch.equal(runs[0].argmax(-1), runs[1].argmax(-1))


def _fbgemm_packing(mapped) -> quantstore.EarlyPacking:
    packing = quantstore.EarlyPacking.__new__(quantstore.EarlyPacking)
    packing.source, packing.fuse, packing.why_fbgemm = mapped, True, "test"
    from concurrent.futures import Future
    packing.packed = Future()
    packing.packed.set_result(quantstore.pack_stored(mapped, True, 1, blocked=False))
    return packing


def test_a_kernel_that_does_not_build_leaves_fbgemm_serving(tmp_path, monkeypatch):
    broken = tmp_path / "int8_avx2.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCE", broken)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(kernels, "choose_int8_kernel", lambda *args: ("llmqtt AVX2", "test"))
    why = kernels.load()
    assert why and "building int8_avx2.cpp failed" in why
    model_dir = build_tiny_model(tmp_path / "m")
    if not quantstore.has_fbgemm():
        pytest.skip("int8 needs fbgemm (x86)")
    model, _ = quant.load_quantized(model_dir, "int8", quant.QuantizedStore(tmp_path / "q"))
    assert model._llmqtt_int8_kernel == "fbgemm"
    assert not any(m.blocked is not None for m in model.modules() if isinstance(m, quant.Int8Linear))
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_the_switch_to_fbgemm_is_honoured(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("LLMQTT_INT8_KERNEL", "fbgemm")
    assert kernels.load() == "LLMQTT_INT8_KERNEL=fbgemm"


KERNEL_START = """
import sys, time, torch
from llmqtt.engine import kernels
start = time.perf_counter()
why = kernels.load()
print(why, time.perf_counter() - start, "torch.utils.cpp_extension" in sys.modules)
"""


@NEEDS_KERNEL
def test_a_restart_loads_the_built_kernel_without_building(tmp_path):
    """The first start builds into TORCH_EXTENSIONS_DIR; a restart loads the library it left, without
    importing torch's build tools or running ninja."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    runs = [subprocess.run([sys.executable, "-c", KERNEL_START], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    (first_why, _, first_tools), (why, seconds, tools) = (run.stdout.split()[-3:] for run in runs)
    assert first_why == why == "None", [run.stderr[-2000:] for run in runs]
    assert first_tools == "True" and tools == "False" and float(seconds) < 2
    assert len(list((tmp_path / "ext").glob("llmqtt_int8_*/llmqtt_int8_*.so"))) == 1
