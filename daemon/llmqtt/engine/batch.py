"""One decode step for several generations at once: one forward pass for all their next tokens.

Each generation keeps its own static KV cache (decode.py: [1, kv_heads, max_context, head_dim] per layer)
at its own position. A step runs the model once on B tokens ([B, 1]) at B positions ([B, 1]); `RowsCache`
stands in for the model's cache: each layer writes row b's new key and value into generation b's cache at
its position, then hands attention every row's cache up to the longest one, stacked: [B, kv_heads, L,
head_dim]. The mask ([B, 1, 1, L]) lets each row see its own positions 0..position only (llama.cpp's
server does the same with slots in one shared cache).

Why it pays: on a CPU a decode step is bound by reading the weights (0.6-2.5 GB for the demo model), and
B rows read them once. Stacking copies B x L positions' KV per step (the demo model: 24 KiB a position over
all layers; 4 rows of 300 positions: 29 MB), small against the weights. Runs eagerly: the compiled step
(decode.py) is specialised to one row and one cache, and stays the path for a generation on its own.
"""

from __future__ import annotations

import torch
from transformers import StaticCache


class RowsCache:
    """The model's cache for one batched step: B generations' own static caches, one row each."""

    def __init__(self, caches: list[StaticCache], positions: list[int]):
        self.caches, self.positions = caches, positions
        self.width = max(positions) + 1  # L: the longest row's positions, this step's included

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args, **kwargs):
        """keys, values: [B, kv_heads, 1, head_dim], the new position of each row -> [B, kv_heads, L, head_dim]."""
        all_keys, all_values = [], []
        for row, (cache, position) in enumerate(zip(self.caches, self.positions)):
            static = cache.layers[layer]  # keys: [1, kv_heads, max_context, head_dim]
            static.keys[:, :, position] = keys[row:row + 1, :, 0]
            static.values[:, :, position] = values[row:row + 1, :, 0]
            static.cumulative_length.add_(1)  # as its own update would: the compiled step reads it
            all_keys.append(static.keys[:, :, :self.width])
            all_values.append(static.values[:, :, :self.width])
        return torch.cat(all_keys), torch.cat(all_values)

    def get_seq_length(self, layer: int = 0) -> int:
        return self.width


def step_rows(model: torch.nn.Module, tokens: list[int], caches: list[StaticCache],
              positions: list[int]) -> torch.Tensor:
    """tokens[b] at positions[b] into caches[b], all in one forward -> float logits of each next token: [B, V]."""
    cache = RowsCache(caches, positions)
    at = torch.tensor(positions)[:, None]  # [B, 1]
    mask = (torch.arange(cache.width)[None, :] <= at)[:, None, None, :]  # [B, 1, 1, L]: own positions only
    kinds = getattr(model.config, "layer_types", None) or ["full_attention"]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor(tokens)[:, None], position_ids=at, past_key_values=cache,
                    attention_mask={kind: mask for kind in set(kinds)}, use_cache=True)
    return out.logits[:, -1].float()
