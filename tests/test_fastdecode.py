"""Fast decode kernels: same numbers as F.linear, used only for one-row products once compiled and checked,
and a failed compile leaves torch's kernels serving."""

from __future__ import annotations

import pytest
import torch

from llmqtt.engine import fastdecode
from llmqtt.engine.fastdecode import DecodeLinear
from llmqtt.engine.generate import ChatGenerator
from llmqtt.engine.loader import load
from llmqtt.tasks import parse_task

CHAT = {"kind": "generate", "system": "You are a helpful assistant.",
        "generation": {"max_new_tokens": 8, "temperature": 0.0, "repetition_penalty": 1.0}}


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load(tiny_model_dir, "float32")


@pytest.fixture(scope="module")
def fast(tiny_model_dir, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    loaded = load(tiny_model_dir, "float32", fast_decode=True)
    assert loaded.kernels is not None and loaded.kernels.state() == "pending"  # not started by load()
    loaded.kernels.compile()
    assert loaded.kernels.state() == "ready", loaded.kernels.failed
    return loaded


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def decode_logits(loaded, text: str) -> list[torch.Tensor]:
    """Logits of the prefill and of each greedy decode step, feeding the same reference tokens."""
    gen = ChatGenerator(loaded.model, loaded.tokenizer, parse_task(CHAT, "t", "chat"), 256)
    rest = gen.prompt_ids(text, [], 8)[0]
    cache = gen.prefix.cache(1)
    logits = [gen.forward(torch.tensor([rest]), cache, gen.prefix.length)]
    position = gen.prefix.length + len(rest)
    for token in [5, 17, 3, 99]:
        logits.append(gen.forward(torch.tensor([[token]]), cache, position))
        position += 1
    return logits


def test_every_float_linear_is_wrapped_and_keeps_its_weights(fast, reference):
    wrapped = [m for m in fast.model.modules() if isinstance(m, DecodeLinear)]
    plain = [m for m in reference.model.modules() if type(m) is torch.nn.Linear]
    assert len(wrapped) == len(plain) > 0
    assert isinstance(fast.model.get_output_embeddings(), DecodeLinear)
    assert all(torch.equal(w.weight, p.weight) for w, p in zip(wrapped, plain))


def test_decode_with_compiled_kernels_matches_torch(fast, reference):
    for got, want in zip(decode_logits(fast, "Hello there"), decode_logits(reference, "Hello there")):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_only_one_row_products_use_the_kernel(fast, monkeypatch):
    calls = []
    original = fastdecode.Kernels.__call__
    monkeypatch.setattr(fastdecode.Kernels, "__call__", lambda self, w, x: calls.append(x.shape) or original(self, w, x))
    layer = next(m for m in fast.model.modules() if isinstance(m, DecodeLinear))
    with torch.inference_mode():
        layer(torch.randn(1, 1, layer.in_features))  # decode: one token
        assert len(calls) == 1
        layer(torch.randn(1, 5, layer.in_features))  # prefill
        layer(torch.randn(3, 1, layer.in_features))  # a batch
    assert len(calls) == 1


def test_before_ready_it_is_exactly_torch(tiny_model_dir, reference):
    loaded = load(tiny_model_dir, "float32", fast_decode=True)  # kernels not started
    for got, want in zip(decode_logits(loaded, "Hi"), decode_logits(reference, "Hi")):
        assert torch.equal(got, want)


def test_failed_compile_keeps_torch_kernels(tiny_model_dir, reference, monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    loaded = load(tiny_model_dir, "float32", fast_decode=True)
    loaded.kernels.compile()
    assert loaded.kernels.state() == "failed" and "no C compiler" in loaded.kernels.failed
    assert "fast decode kernels unavailable" in caplog.text
    for got, want in zip(decode_logits(loaded, "Hi"), decode_logits(reference, "Hi")):
        assert torch.equal(got, want)


def test_not_for_int8_or_other_dtypes(tiny_model_dir):
    assert load(tiny_model_dir, "float32", "int8", fast_decode=True).kernels is None
    assert load(tiny_model_dir, "bfloat16", fast_decode=True).kernels is None
    assert load(tiny_model_dir, "float32").kernels is None


def test_load_engine_keeps_compiled_kernels_in_the_cache_dir(tiny_model_dir, tmp_path):
    """A fresh process, as the daemon: inductor's cache goes to <cache_dir>/inductor, not /tmp (which systemd's
    PrivateTmp empties at every start), so a restart finds the kernels already built."""
    import os
    import subprocess
    import sys

    script = f"""
from pathlib import Path
from llmqtt.config import ModelConfig
from llmqtt.engine import load_engine
from llmqtt.tasks import parse_task
config = ModelConfig(name={str(tiny_model_dir)!r}, dtype="float32", quantize="none", cache_dir=Path({str(tmp_path)!r}))
engine = load_engine(config, {{"chat": parse_task({CHAT!r}, "t", "chat")}})
engine.start_fast_decode()
assert engine.loaded.kernels.ready.wait(300), engine.loaded.kernels.failed
"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any((tmp_path / "inductor").rglob("*.py")) or any((tmp_path / "inductor").rglob("*.so"))
