"""Quantized weights at rest (engine/quantize.py), the scheme choice, and the compiled decode (decode.py)."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from llmqtt import config as cfg
from llmqtt.config import ModelConfig, choose_quantize
from llmqtt.engine import quantize as quant, quantstore
from llmqtt.engine.decode import StaticDecoder
from llmqtt.engine.engine import Engine
from llmqtt.engine.loader import load
from llmqtt.readings import read_cpuinfo
from llmqtt.tasks import parse_task
from tinymodel import build_tiny_model

CHAT = {"kind": "generate", "system": "Hello, how are you today?",
        "generation": {"max_new_tokens": 10, "temperature": 0.0, "repetition_penalty": 1.0}}
# int4 runs only where torch has the KleidiAI kernels (aarch64: a Pi 5, or tests/arm64/run_int4_tests.sh under qemu)
KLEIDIAI = torch.backends.kleidiai.is_available()
NEEDS_FBGEMM = pytest.mark.skipif(not quantstore.has_fbgemm(), reason="int8 needs fbgemm (x86)")
SCHEMES = ["int8", pytest.param("int4", marks=pytest.mark.skipif(not KLEIDIAI, reason="int4 needs KleidiAI (aarch64)"))]
# Largest logit error vs float32, as a share of the largest float32 logit. int4 in groups of 32 (16 levels) with
# int8 activations measured 0.14 (untied) and 0.12 (tied) on the tiny models (qemu Cortex-A76, 2026-11-29).
LOGIT_TOLERANCE = {"int8": 0.05, "int4": 0.25}
SENTIMENT = {"kind": "classify", "system": "You are a sentiment classifier. Answer with one word: positive or negative.",
             "user_template": "Text: {text}", "labels": {"positive": "positive", "negative": "negative"}}


# --------------------------------------------------------------------------- choosing a scheme (pure)

@pytest.mark.parametrize("arch, flags, scheme", [
    ("x86_64", {"avx2", "fma"}, "int8"),  # this bench machine: AVX2, no VNNI
    ("x86_64", {"avx512f", "avx512_vnni", "amx_int8"}, "int8"),  # never int4 on x86, whatever it has
    ("aarch64", {"fp", "asimd", "asimddp"}, "int4"),  # Raspberry Pi 5 (Cortex-A76)
    ("aarch64", {"fp", "asimd"}, "none"),  # Pi 3/4 (Cortex-A53/A72): no dot product, no KleidiAI kernels
])
def test_auto_scheme_is_a_function_of_the_cpu(arch, flags, scheme):
    chosen, why = choose_quantize("auto", arch, frozenset(flags))
    assert chosen == scheme
    assert why


@pytest.mark.skipif(platform.machine() not in ("aarch64", "arm64"), reason="reads this board's own CPU (aarch64)")
def test_auto_on_this_arm_board_picks_int4_and_torch_has_its_kernels():
    """On a Pi 5 (or the emulated Cortex-A76 of tests/arm64/run_int4_tests.sh): the CPU's own flags choose
    int4, and this torch has the KleidiAI kernels int4 runs on."""
    from llmqtt.engine import quantize_scheme

    cpu = read_cpuinfo()
    assert "asimddp" in cpu.flags and cpu.model
    assert choose_quantize("auto", platform.machine(), cpu.flags)[0] == "int4"
    assert quantize_scheme(ModelConfig(name="tiny", quantize="auto"), "float32")[0] == "int4"  # the engine's path
    assert torch.backends.kleidiai.is_available()


def test_an_explicit_scheme_wins_over_auto():
    assert choose_quantize("none", "x86_64", frozenset({"avx2"}))[0] == "none"
    assert choose_quantize("int8", "aarch64", frozenset({"asimddp"}))[0] == "int8"


def test_auto_refuses_a_scheme_measured_more_than_a_point_below_float32(monkeypatch):
    monkeypatch.setitem(cfg.ACCURACY_VS_FLOAT32_POINTS, "int8", -1.4)
    scheme, why = choose_quantize("auto", "x86_64", frozenset({"avx2"}))
    assert scheme == "none" and "1.4 points below float32" in why
    monkeypatch.setitem(cfg.ACCURACY_VS_FLOAT32_POINTS, "int8", -0.6)
    assert choose_quantize("auto", "x86_64", frozenset({"avx2"}))[0] == "int8"


# --------------------------------------------------------------------------- at rest: quantize once, load without fp32

@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_dir(request, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), tied=request.param)


def _reference_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("scheme", SCHEMES)
def test_second_start_loads_the_stored_weights_without_float32(scheme, tiny_dir, tmp_path, monkeypatch):
    store = quant.QuantizedStore(tmp_path / "quantized")
    first, from_store = quant.load_quantized(tiny_dir, scheme, store)
    assert not from_store and store.path(tiny_dir, scheme).is_file()
    ids = torch.randint(0, first.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def no_float32(*args, **kwargs):
        raise AssertionError("the float32 checkpoint was read")

    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_float32)
    model, from_store = quant.load_quantized(tiny_dir, scheme, store)
    monkeypatch.undo()
    assert from_store
    assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert all(p.dtype != torch.float32 or p.dim() < 2 for p in model.parameters())  # only norms and biases
    embedding = model.get_input_embeddings()
    if model.config.tie_word_embeddings:  # the head's rows, whatever the scheme
        assert embedding.table is model.get_output_embeddings()
    else:  # its own int8 row table under int4 too, never float32
        assert type(embedding.table) is quant.Int8Linear and embedding.table.qdata.dtype == torch.int8

    with torch.inference_mode():
        logits = model(ids).logits
        assert torch.equal(logits, first(ids).logits)  # the stored copy is exactly what was quantized
    reference = _reference_logits(tiny_dir, ids)  # float32: int8 is close (a random tiny model has near-ties)
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8
    assert (logits - reference).abs().max() < LOGIT_TOLERANCE[scheme] * reference.abs().max()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_embedding_reads_only_the_rows_it_looks_up(scheme, tiny_dir, tmp_path, monkeypatch):
    model, _ = quant.load_quantized(tiny_dir, scheme, quant.QuantizedStore(tmp_path))
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, quant.RowEmbedding)
    seen = []
    rows = type(embedding.table).rows
    monkeypatch.setattr(type(embedding.table), "rows", lambda self, ids: seen.append(ids.numel()) or rows(self, ids))
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    assert seen == [3]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_label_rows_of_the_quantized_head_match_its_products(scheme, tiny_dir, tmp_path):
    model, _ = quant.load_quantized(tiny_dir, scheme, quant.QuantizedStore(tmp_path))
    hidden = torch.randn(2, model.config.hidden_size)
    ids = torch.tensor([3, 7, 11])
    weight, bias = quant.head_rows(model, ids)
    with torch.inference_mode():
        full = model.get_output_embeddings()(hidden)[:, ids]
    assert torch.allclose(hidden @ weight.T, full, atol=0.05 * full.abs().max())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_torn_store_file_is_quantized_again(scheme, tiny_dir, tmp_path):
    store = quant.QuantizedStore(tmp_path)
    quant.load_quantized(tiny_dir, scheme, store)
    store.path(tiny_dir, scheme).write_bytes(b"not safetensors")
    _, from_store = quant.load_quantized(tiny_dir, scheme, store)
    assert not from_store


def test_a_truncated_store_file_is_quantized_again(tiny_dir, tmp_path):
    store = quant.QuantizedStore(tmp_path)
    quant.load_quantized(tiny_dir, "int8", store)
    path = store.path(tiny_dir, "int8")
    path.write_bytes(path.read_bytes()[:-100])  # the header is intact, the data is not
    _, from_store = quant.load_quantized(tiny_dir, "int8", store)
    assert not from_store


def test_row_tables_stay_mapped_and_packed_layers_keep_no_int8_copy(tiny_dir, tmp_path):
    store = quant.QuantizedStore(tmp_path)
    quant.load_quantized(tiny_dir, "int8", store)
    model, from_store = quant.load_quantized(tiny_dir, "int8", store)
    assert from_store
    mapped = model._llmqtt_weights
    start = torch.frombuffer(mapped._map, dtype=torch.uint8, count=1).data_ptr()
    in_file = lambda t: start <= t.data_ptr() < start + len(mapped._map)  # noqa: E731
    head, table = model.get_output_embeddings(), model.get_input_embeddings().table
    assert in_file(head.qdata) and in_file(table.qdata)  # read by rows from the file, not copied
    layers = [m for m in model.modules() if isinstance(m, quant.Int8Linear) and m is not head and m is not table]
    assert layers and all(m.packed and m.qdata.numel() == 0 for m in layers)  # fbgemm's copy only
    assert not any(in_file(t) for n, t in model.named_parameters())  # norms and biases are copies
    rows_bytes = head.qdata.numel() + (table.qdata.numel() if table is not head else 0)
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, quant.Int8Linear) and m.packed)
    assert quant.resident_bytes(model) < packed + rows_bytes  # the tables are not counted as held
    with torch.inference_mode():  # and the rows read from the mapping are the stored ones
        first = quant.build(tiny_dir, {k: v.clone() for k, v in _state(mapped).items()}, "int8")
        ids = torch.tensor([[1, 5, 9]])
        assert torch.equal(model(ids).logits, first(ids).logits)



@NEEDS_FBGEMM
def test_fused_products_give_the_separate_products_answers(tiny_dir, tmp_path):
    """q/k/v and gate/up packed as one fbgemm product each (quantstore.FUSED): 4 products a layer instead of 7,
    the same logits, prefill and one decoded token over the KV cache."""
    store = quant.QuantizedStore(tmp_path)
    quant.load_quantized(tiny_dir, "int8", store)
    fused = quant.build(tiny_dir, store.load(tiny_dir, "int8"), "int8")  # Qwen2: fused by default
    mapped = store.load(tiny_dir, "int8")
    separate = quant.build(tiny_dir, mapped, "int8", quantstore.EarlyPacking(mapped, fuse=False))
    products = lambda model: [n for n, m in model.named_modules() if isinstance(m, quant.Int8Linear) and m.packed]  # noqa: E731
    layer = fused.model.layers[0]
    assert {"qkv_proj", "o_proj"} == {n for n, _ in layer.self_attn.named_children()}
    assert {"gate_up_proj", "down_proj", "act_fn"} == {n for n, _ in layer.mlp.named_children()}
    assert type(layer.self_attn).__name__ == "FusedQwen2Attention" and isinstance(layer.self_attn, type(separate.model.layers[0].self_attn))
    layers = fused.config.num_hidden_layers
    assert len(products(separate)) - len(products(fused)) == 3 * layers
    assert quant.decode_bytes(fused) == quant.decode_bytes(separate)  # the same weights, fewer calls
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        runs = []
        for model in (fused, separate):
            out = model(ids, use_cache=True)
            step = model(torch.tensor([[7]]), past_key_values=out.past_key_values, use_cache=True)
            runs.append((out.logits, step.logits))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)

def _state(mapped) -> dict[str, torch.Tensor]:
    return {name: mapped.view(name) for name in mapped.keys()}


def test_without_torchao_quantizing_fails_with_a_clear_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(RuntimeError, match="torchao.*quantize: none"):
        quant.load_quantized(tiny_dir, "int8", quant.QuantizedStore(tmp_path))


@pytest.mark.skipif(torch.backends.kleidiai.is_available(), reason="this torch has KleidiAI (aarch64)")
def test_int4_is_refused_where_torch_has_no_kleidiai(tiny_dir, tmp_path):
    with pytest.raises(RuntimeError, match="KleidiAI"):
        quant.load_quantized(tiny_dir, "int4", quant.QuantizedStore(tmp_path))


# --------------------------------------------------------------------------- compiled decode

def _engine(model_dir, scheme):
    loaded = load(model_dir, "float32", scheme, store=quant.QuantizedStore(model_dir / "quantized"))
    tasks = {"chat": parse_task(CHAT, "t", "chat"), "sentiment": parse_task(SENTIMENT, "t", "sentiment")}
    return Engine(loaded, tasks, "tiny", "tiny", max_context=128)


@pytest.fixture(scope="module", params=SCHEMES)
def quantized_engine(request, tmp_path_factory):
    return _engine(build_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), tied=True), request.param)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_quantized_engine_classifies_and_generates_like_float32(scheme, tied, tmp_path):
    model_dir = build_tiny_model(tmp_path / "tiny", tied=tied)
    engine, reference = _engine(model_dir, scheme), _engine(model_dir, "none")
    texts = ["I love this product", "This is terrible, I hate it", "这个酒店很好"]
    got, expected = engine.classify("sentiment", texts), reference.classify("sentiment", texts)
    for g, e in zip(got, expected):  # a random model's labels are near-ties: compare the scores
        assert set(g.scores) == {"positive", "negative"} and abs(sum(g.scores.values()) - 1) < 1e-5
        assert abs(g.scores["positive"] - e.scores["positive"]) < 0.1
    text, result = _greedy(engine, "Hello, how are you today?")
    assert result.new_tokens > 0 and isinstance(text, str)


def _greedy(engine, text):
    stream = engine.generate("chat", text)
    return "".join(stream), stream.result


def test_health_shows_the_compiled_decode_pending_until_it_is_ready(tmp_path):
    """With model.fast_decode on a quantized model the engine builds its decode step after READY: health's
    `decode` is "pending" (eager, slower) until then, "off" with fast_decode off."""
    model_dir = build_tiny_model(tmp_path / "tiny", tied=True)
    tasks = {"chat": parse_task(CHAT, "t", "chat")}
    loaded = load(model_dir, "float32", "int8", fast_decode=True, store=quant.QuantizedStore(model_dir / "quantized"))
    engine = Engine(loaded, tasks, "tiny", "tiny", max_context=128)
    assert engine.fast_decode_state() == "pending"
    engine.decoder.ready.set()  # as compile() does once its step passed the check
    assert engine.fast_decode_state() == "ready"
    assert _engine(model_dir, "int8").fast_decode_state() == "off"


def test_compiled_decode_equals_eager_token_for_token(quantized_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    texts = ["I love this product", "这个酒店很好", "Summarize the text in one sentence."]
    eager = [_greedy(quantized_engine, t) for t in texts]
    decoder = quantized_engine.decoder
    decoder.compile()
    assert decoder.state() == "ready" and decoder.wrapper == "C++ wrapper", decoder.failed
    compiled = [_greedy(quantized_engine, t) for t in texts]
    for (eager_text, eager_result), (text, result) in zip(eager, compiled):
        assert text == eager_text and result.new_tokens == eager_result.new_tokens
    # Compiled alone, then batched (eager) while a second one runs beside it, then compiled alone again: the
    # shared cache goes from one path to the other and the answer stays the eager one's.
    a, b = quantized_engine.generate("chat", texts[0]), quantized_engine.generate("chat", texts[1], max_new_tokens=3)
    a.start()
    for _ in range(2):
        quantized_engine.step([a])
    b.start()
    while not b.done:
        quantized_engine.step([a, b])
    while not a.done:
        quantized_engine.step([a])
    assert a.result.text == eager[0][0] and b.result.text == _greedy(quantized_engine, texts[1])[0][:len(b.result.text)]
    decoder.ready.clear()  # back to eager for the other tests


RESTART = """
import sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from llmqtt.engine import quantize as quant
from llmqtt.engine.decode import StaticDecoder
model, _ = quant.load_quantized(Path(sys.argv[1]), sys.argv[4], quant.QuantizedStore(Path(sys.argv[2])))
decoder = StaticDecoder(model, 64, saved=Path(sys.argv[3]) / "step")
decoder.compile()
print(decoder.state(), decoder.from_disk, counters["stats"]["unique_graphs"], counters["inductor"]["pattern_matcher_count"])
"""


def _start_twice(tmp_path, kernel="default", between=lambda: None, scheme="int8"):
    """Two processes loading the tiny quantized model and building its decode step, kept in tmp_path / "decode"."""
    import subprocess

    model_dir = build_tiny_model(tmp_path / "m")
    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "LLMQTT_INT8_KERNEL": kernel}
    runs = []
    for _ in range(2):
        runs.append(subprocess.run([sys.executable, "-c", RESTART, str(model_dir), str(tmp_path / "q"),
                                    str(tmp_path / "decode"), scheme],
                                   env=env, capture_output=True, text=True, timeout=600))
        between()
    results = [run.stdout.split()[-4:] for run in runs]
    assert [r[0] for r in results] == ["ready", "ready"], [run.stderr[-2000:] for run in runs]
    return results


@pytest.mark.parametrize("scheme, kernel", [
    pytest.param("int8", "default", marks=NEEDS_FBGEMM), pytest.param("int8", "fbgemm", marks=NEEDS_FBGEMM),
    pytest.param("int4", "default", marks=pytest.mark.skipif(not KLEIDIAI, reason="int4 needs KleidiAI (aarch64)"))])
def test_a_restart_loads_the_compiled_step_without_tracing_the_model(scheme, kernel, tmp_path):
    """The first start compiles and keeps the step; a restart loads it: dynamo traces no graph (tracing held
    the GIL for ~9 s after the demo's READY, and a chat meanwhile decoded at ~2 tok/s) and inductor
    compiles nothing. fbgemm's layers are named by a key numbered in load order, not by their address;
    llmqtt's kernel takes its weights as tensors."""
    first, restart = _start_twice(tmp_path, kernel, scheme=scheme)
    (_, first_from_disk, first_graphs, first_lowered), (_, from_disk, graphs, lowered) = first, restart
    assert first_from_disk == "False" and int(first_graphs) == 1 and int(first_lowered) > 0
    assert from_disk == "True" and int(graphs) == 0 and int(lowered) == 0
    assert len(list((tmp_path / "decode").glob("step.cpp.step"))) == 1


@NEEDS_FBGEMM
def test_a_torn_kept_step_is_compiled_again_and_replaced(tmp_path):
    def tear():
        for path in (tmp_path / "decode").glob("*.step"):
            path.write_bytes(path.read_bytes()[:1000])

    (_, first_from_disk, _, _), (_, from_disk, graphs, _) = _start_twice(tmp_path, between=tear)
    assert first_from_disk == from_disk == "False" and int(graphs) == 1  # both compiled; both answered "ready"


def test_where_the_step_is_kept_changes_with_anything_it_was_built_from(tmp_path):
    from llmqtt.engine.decode import saved_step_stem

    base = saved_step_stem(tmp_path, "model-a", 2048, "llmqtt AVX2")
    assert base == saved_step_stem(tmp_path, "model-a", 2048, "llmqtt AVX2") and base.parent == tmp_path
    assert len({base, saved_step_stem(tmp_path, "model-b", 2048, "llmqtt AVX2"),
                saved_step_stem(tmp_path, "model-a", 4096, "llmqtt AVX2"),
                saved_step_stem(tmp_path, "model-a", 2048, "fbgemm")}) == 4


def test_only_the_most_recently_used_steps_are_kept(quantized_engine, tmp_path):
    """An engine change renames every step: other builds' files go, the newest few (KEEP_STEPS) stay."""
    import os

    from llmqtt.engine import decode

    (tmp_path / "decode").mkdir()
    for age in range(decode.KEEP_STEPS + 2):
        old = tmp_path / "decode" / f"old{age}.cpp.step"
        old.write_bytes(b"x")
        os.utime(old, (1000 - age, 1000 - age))  # old0 is the most recent of them
    saved = type("Step", (), {"save_compiled_function": lambda self, path: open(path, "wb").write(b"new")})()
    StaticDecoder(quantized_engine.loaded.model, 64, saved=tmp_path / "decode" / "new")._keep(saved, "cpp")
    kept = sorted(p.name for p in (tmp_path / "decode").glob("*.step"))
    assert kept == sorted(["new.cpp.step", *(f"old{age}.cpp.step" for age in range(decode.KEEP_STEPS - 1))])


def test_building_the_step_shortens_the_gil_turns_and_puts_them_back(quantized_engine, monkeypatch):
    """While the step is built, the eager requests beside it get the GIL back after 0.5 ms, not 5 ms."""
    from llmqtt.engine import decode

    seen = []
    monkeypatch.setattr(StaticDecoder, "_compile_one", lambda self, failures: seen.append(sys.getswitchinterval()))
    before = sys.getswitchinterval()
    StaticDecoder(quantized_engine.loaded.model, 64).compile()
    assert seen == [decode.BUILD_SWITCH_INTERVAL_S] and sys.getswitchinterval() == before


def test_a_step_that_cannot_be_kept_still_serves(quantized_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    decoder = StaticDecoder(quantized_engine.loaded.model, 64, saved=blocked / "step")
    decoder.compile()
    assert decoder.state() == "ready" and not decoder.from_disk, decoder.failed


def test_a_failing_compile_leaves_decode_eager(quantized_engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(torch, "compile", broken)
    decoder = StaticDecoder(quantized_engine.loaded.model, 64)
    decoder.compile()
    assert decoder.state() == "failed" and "no C compiler" in decoder.failed
    with decoder.cache([]) as cache:
        assert decoder.step(1, cache, 0).shape == (quantized_engine.loaded.model.config.vocab_size,)


def test_the_python_wrapper_serves_where_the_cpp_wrapper_cannot_be_built(quantized_engine, tmp_path, monkeypatch):
    """Inductor's C++ wrapper is tried first (faster per step); if building it fails, the Python one compiles."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    real = torch.compile

    def no_cpp_wrapper(fn, **kwargs):
        if kwargs.get("options", {}).get("cpp_wrapper"):
            raise RuntimeError("cpp wrapper: no libtorch headers")
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", no_cpp_wrapper)
    decoder = StaticDecoder(quantized_engine.loaded.model, 64)
    decoder.compile()
    assert decoder.state() == "ready" and decoder.wrapper == "Python wrapper"


def test_the_compile_check_takes_close_logits_and_refuses_a_wrong_pick(quantized_engine, monkeypatch):
    """Teacher-forced: a step within the tolerance is taken (int8's per-call activation noise, which once
    flipped a near-tied 8th free-running token), one whose clear pick differs is refused and decode stays eager."""
    from llmqtt.engine import decode

    def compiled_as(shift):
        def step(model, token, position, cache):
            out = decode.decode_one_token(model, token, position, cache)
            return shift(out)
        return lambda fn, **kwargs: type("Compiled", (), {"aot_compile": lambda self, example: step})()

    noisy = lambda out: out + 1e-4 * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "compile", compiled_as(noisy))
    decoder = StaticDecoder(quantized_engine.loaded.model, 64)
    decoder.compile()
    assert decoder.state() == "ready" and 0 < decoder.check_error < 1e-3, decoder.failed

    def wrong(out):
        out = out.clone()
        out[int(out.argmin())] = out.max() + 50  # a clear, different pick
        return out

    monkeypatch.setattr(torch, "compile", compiled_as(wrong))
    decoder = StaticDecoder(quantized_engine.loaded.model, 64)
    decoder.compile()
    assert decoder.state() == "failed" and "disagrees" in decoder.failed


def test_a_second_generation_while_the_shared_cache_is_busy_gets_its_own(quantized_engine):
    first = iter(quantized_engine.generate("chat", "I love this product"))
    next(first)  # holds the shared cache, mid-generation
    text, _ = _greedy(quantized_engine, "I love this product")
    rest = "".join(first)
    assert text.startswith(rest) or rest in text  # same greedy answer from its own cache


def test_keep_float32_false_drops_a_converted_checkpoint_and_restarts_from_the_store(tmp_path):
    from llmqtt.config import ModelConfig
    from llmqtt.engine import load_engine
    from llmqtt.engine.modelstore import COMPLETE_MARKER, ResolvedModel

    model_dir = build_tiny_model(tmp_path / "converted", tied=True)
    (model_dir / COMPLETE_MARKER).write_text("{}")  # as llmqtt's own GGUF conversion leaves it
    config = ModelConfig(name=str(model_dir), quantize="int8", keep_float32=False, cache_dir=tmp_path / "cache",
                         fast_decode=False)
    resolved = ResolvedModel(model_dir, "tiny", "tiny")
    tasks = {"sentiment": parse_task(SENTIMENT, "t", "sentiment")}
    first = load_engine(config, tasks, resolved=resolved).classify("sentiment", ["I love it"])[0]
    assert not list(model_dir.glob("*.safetensors"))
    engine = load_engine(config, tasks, resolved=resolved)  # restart: from the stored int8 copy
    assert engine.loaded.from_store and engine.classify("sentiment", ["I love it"])[0] == first
    with pytest.raises(RuntimeError, match="keep_float32"):
        load_engine(config.model_copy(update={"quantize": "none"}), tasks, resolved=resolved)


def test_an_untied_embedding_is_an_int8_row_table_under_int4_too(tmp_path, monkeypatch):
    """The Pi's scheme (int4, KleidiAI: not on this CPU) stores an untied model's embedding as int8 rows like
    int8 does, never float32. The int4 packing itself is stubbed: only the layout is checked here."""
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / "untied", tied=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    monkeypatch.setattr(quant, "_int4", lambda linear, keep_rows: {"packed": torch.zeros(8, dtype=torch.uint8)})
    state = quant.quantize_state(model, "int4")
    assert "model.embed_tokens.weight" not in state
    assert state["model.embed_tokens.table.qdata"].dtype == torch.int8
    assert state["model.embed_tokens.table.qdata"].shape == model.get_input_embeddings().weight.shape
    assert quantstore.fingerprint(model_dir, "int4") != quantstore.fingerprint(model_dir, "int8")


def test_int8_is_refused_where_torch_has_no_fbgemm(tmp_path, monkeypatch):
    model_dir = build_tiny_model(tmp_path / "m", tied=True)
    monkeypatch.setattr(quant, "has_fbgemm", lambda: False)  # torch's aarch64 build
    with pytest.raises(RuntimeError, match="int8 needs fbgemm"):
        quant.load_quantized(model_dir, "int8", quant.QuantizedStore(tmp_path / "q"))


def test_packing_started_before_the_imports_gives_the_same_model(tmp_path):
    """load_engine starts fbgemm on the stored file before importing transformers' modules (EarlyPacking):
    the model built from that packing is the one built the usual way."""
    model_dir = build_tiny_model(tmp_path / "m")
    store = quant.QuantizedStore(tmp_path / "q")
    assert quant.EarlyPacking.start(store, model_dir, "int8") is None  # nothing stored yet
    plain, _ = quant.load_quantized(model_dir, "int8", store)  # quantizes and stores
    early = quant.EarlyPacking.start(store, model_dir, "int8")
    assert early is not None and quant.EarlyPacking.start(store, model_dir, "int4") is None
    model, from_store = quant.load_quantized(model_dir, "int8", store, early)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        assert from_store and torch.equal(model(ids).logits, plain(ids).logits)
