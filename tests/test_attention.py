"""engine/attention.py: grouped-query attention without key/value copies gives sdpa's numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, StaticCache

from llmqtt.engine import attention
from tinymodel import build_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-attention"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention.register()).eval()


def _with(model, implementation, fn):
    model.set_attn_implementation(implementation)
    try:
        with torch.inference_mode():
            return fn()
    finally:
        model.set_attn_implementation(attention.NAME)


def test_the_loader_sets_grouped_attention_and_it_is_the_one_called(model, monkeypatch):
    calls = []
    real = attention.grouped_attention
    monkeypatch.setattr(attention, "grouped_attention", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    attention.register()
    try:
        with torch.inference_mode():
            model(torch.tensor([[1, 2, 3]]))
    finally:
        monkeypatch.undo()
        attention.register()
    assert model.config._attn_implementation == attention.NAME
    assert len(calls) == model.config.num_hidden_layers


def test_batched_padded_prefill_equals_sdpa(model):
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ours = _with(model, attention.NAME, lambda: model(ids, attention_mask=mask).logits)
    theirs = _with(model, "sdpa", lambda: model(ids, attention_mask=mask).logits)
    assert torch.allclose(ours[mask.bool()], theirs[mask.bool()], atol=1e-5)


def test_decode_over_a_static_cache_equals_sdpa(model):
    def decode():
        cache = StaticCache(config=model.config, max_cache_len=64)
        model(torch.tensor([[3, 4, 5, 6]]), past_key_values=cache, use_cache=True)
        steps = [model(torch.tensor([[7 + i]]), position_ids=torch.tensor([[4 + i]]), past_key_values=cache,
                       use_cache=True).logits for i in range(3)]
        return torch.cat(steps, 1)

    assert torch.allclose(_with(model, attention.NAME, decode), _with(model, "sdpa", decode), atol=1e-5)
