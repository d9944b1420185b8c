"""engine/generate.py `sample`: nucleus sampling over the likeliest tokens must draw from exactly the
distribution the full sort gave (the reference below is the code it replaced)."""

from __future__ import annotations

import pytest
import torch

from llmqtt.engine.generate import NUCLEUS_CANDIDATES, draw, nucleus, sample
from llmqtt.tasks import GenerationSettings

VOCAB = 151_936  # Qwen2.5's


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The replaced code: every probability sorted; those outside the nucleus zeroed. -> [V]"""
    sorted_probs, order = torch.sort(probs, descending=True)
    outside = torch.cumsum(sorted_probs, 0) - sorted_probs > top_p
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)


def as_vector(kept: torch.Tensor, tokens: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size).scatter(0, tokens, kept)


@pytest.mark.parametrize("scale", [8.0, 3.0, 1.0, 0.05])  # peaked .. nearly flat (past the candidates)
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_the_nucleus_is_the_full_sorts(scale, top_p):
    probs = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(7)) * scale, dim=-1)
    kept, tokens = nucleus(probs, None, top_p)
    assert torch.equal(as_vector(kept, tokens, VOCAB) > 0, full_sort_nucleus(probs, top_p) > 0)
    assert torch.allclose(as_vector(kept, tokens, VOCAB), full_sort_nucleus(probs, top_p))


def test_a_flat_distribution_sorts_everything():
    kept, tokens = nucleus(torch.full((VOCAB,), 1 / VOCAB), None, 0.9)
    assert NUCLEUS_CANDIDATES < kept.numel() == full_sort_nucleus(torch.full((VOCAB,), 1 / VOCAB), 0.9).count_nonzero()


def test_draws_follow_the_nucleus_and_nothing_outside_it():
    logits = torch.tensor([4.0, 3.5, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    settings = GenerationSettings(temperature=1.0, top_p=0.8, repetition_penalty=1.0)
    expected = full_sort_nucleus(torch.softmax(logits, -1), 0.8)
    expected = expected / expected.sum()
    rng, n = torch.Generator().manual_seed(3), 6000
    counts = torch.bincount(torch.tensor([sample(logits, settings, torch.tensor([]), rng) for _ in range(n)]),
                            minlength=len(logits)).float()
    assert torch.equal(counts > 0, expected > 0)  # never a token outside the nucleus
    sigma = (expected * (1 - expected) / n).sqrt()
    assert torch.all((counts / n - expected).abs() <= 4 * sigma + 1e-9)


def test_top_k_keeps_only_the_k_likeliest_and_a_seed_repeats_its_draws():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5))
    settings = GenerationSettings(temperature=2.0, top_k=3, top_p=0.95, repetition_penalty=1.0)
    draws = [sample(logits, settings, torch.tensor([]), torch.Generator().manual_seed(i)) for i in range(300)]
    assert set(draws) <= set(torch.topk(logits, 3).indices.tolist()) and len(set(draws)) > 1
    again = [sample(logits, settings, torch.tensor([]), torch.Generator().manual_seed(i)) for i in range(300)]
    assert draws == again


def test_a_draw_follows_the_probabilities_and_never_hits_a_zero():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.125, 0.125, 0.0])
    rng, n = torch.Generator().manual_seed(11), 8000
    counts = torch.bincount(torch.tensor([draw(probs, rng) for _ in range(n)]), minlength=len(probs)).float()
    assert torch.equal(counts > 0, probs > 0)
    sigma = (probs * (1 - probs) / n).sqrt()
    assert torch.all((counts / n - probs).abs() <= 4 * sigma + 1e-9)
    assert draw(torch.tensor([0.0, 0.0, 2.0]), None) == 2  # unnormalised weights, no generator


def test_without_a_nucleus_the_whole_distribution_is_drawn_from():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    settings = GenerationSettings(temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    rng, n = torch.Generator().manual_seed(2), 6000
    counts = torch.bincount(torch.tensor([sample(logits, settings, torch.tensor([]), rng) for _ in range(n)]),
                            minlength=4).float()
    expected = torch.softmax(logits, -1)
    assert torch.all((counts / n - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt())
