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


def test_decode_never_reads_the_static_cache_beyond_the_written_positions(model):
    """Positions not written yet are left out, not just masked: NaN there would poison a masked product
    (0 x NaN), so equal finite logits prove the last 60 of 64 positions were never read."""
    def decode(poison: bool):
        cache = StaticCache(config=model.config, max_cache_len=64)
        model(torch.tensor([[3, 4, 5, 6]]), past_key_values=cache, use_cache=True)
        if poison:
            for layer in cache.layers:
                layer.keys[:, :, 5:] = float("nan")
                layer.values[:, :, 5:] = float("nan")
        return model(torch.tensor([[7]]), position_ids=torch.tensor([[4]]), past_key_values=cache,
                     use_cache=True).logits

    poisoned = _with(model, attention.NAME, lambda: decode(True))
    assert torch.isfinite(poisoned).all()
    assert torch.allclose(poisoned, _with(model, "sdpa", lambda: decode(False)), atol=1e-5)


def test_attended_length_is_one_past_the_last_column_any_row_sees():
    mask = torch.zeros(2, 1, 1, 10, dtype=torch.bool)
    mask[0, 0, 0, :3] = True
    mask[1, 0, 0, :6] = True
    assert attention.attended_length(mask, 10) == 6
    assert attention.attended_length(None, 10) == 10
    assert attention.attended_length(torch.zeros(1, 1, 1, 10, dtype=torch.bool), 10) == 10
