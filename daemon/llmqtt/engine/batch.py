"""Several generations in one forward pass: their next tokens (a decode step) or their prompts (prefill).

Each generation keeps its own static KV cache (decode.py: [1, kv_heads, max_context, head_dim] per layer)
at its own position. One forward runs B rows of up to S tokens ([B, S], right-padded), row b's at
positions[b].. ; `RowsCache` stands in for the model's cache: each layer writes row b's new keys and values
into generation b's cache at its positions, then hands attention every row's cache up to the longest,
stacked: [B, kv_heads, L, head_dim]. The mask ([B, 1, S, L]) lets each token see its own row's positions
up to its own (llama.cpp's server does the same with slots in one shared cache).

Why it pays: on a CPU a decode step is bound by reading the weights (0.6-2.5 GB for the demo model), and
B rows read them once. A short prompt is not far from that either (the demo model, int8: 18 prompt tokens
took 2.6 decode steps' time), so prompts that arrive together start together. Stacking copies B x L
positions' KV per step (the demo model: 24 KiB a position over all layers; 4 rows of 300 positions:
29 MB), small against the weights. Runs eagerly: the compiled step (decode.py) is specialised to one row
and one cache, and stays the path for a generation on its own. Full attention only (Qwen2.5's layers).
"""

from __future__ import annotations

import torch
from transformers import StaticCache


class RowsCache:
    """The model's cache for one batched forward: B generations' own static caches, one row each."""

    def __init__(self, caches: list[StaticCache], positions: list[int], lengths: list[int]):
        self.caches, self.positions, self.lengths = caches, positions, lengths
        self.width = max(p + n for p, n in zip(positions, lengths))  # L: the longest row, this pass included

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *args, **kwargs):
        """keys, values: [B, kv_heads, S, head_dim], each row's new positions -> [B, kv_heads, L, head_dim]."""
        all_keys, all_values = [], []
        for row, (cache, position, n) in enumerate(zip(self.caches, self.positions, self.lengths)):
            static = cache.layers[layer]  # keys: [1, kv_heads, max_context, head_dim]
            static.keys[:, :, position:position + n] = keys[row:row + 1, :, :n]  # real tokens only, not pads
            static.values[:, :, position:position + n] = values[row:row + 1, :, :n]
            static.cumulative_length.add_(n)  # as its own update would: the compiled step reads it
            all_keys.append(static.keys[:, :, :self.width])
            all_values.append(static.values[:, :, :self.width])
        return torch.cat(all_keys), torch.cat(all_values)

    def get_seq_length(self, layer: int = 0) -> int:
        return self.width


def forward_rows(model: torch.nn.Module, rows: list[list[int]], caches: list[StaticCache],
                 positions: list[int]) -> torch.Tensor:
    """rows[b] (token ids) at positions[b].. into caches[b], all in one forward -> float logits of the token
    after each row's last one: [B, V]."""
    lengths = [len(r) for r in rows]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, S], right-padded (pads: never written)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    cache = RowsCache(caches, positions, lengths)
    at = torch.tensor(positions)[:, None] + torch.arange(width)[None, :]  # [B, S]: each token's position
    mask = (torch.arange(cache.width)[None, None, :] <= at[:, :, None])[:, None]  # [B, 1, S, L]
    last = sorted(set(n - 1 for n in lengths))  # the logits needed: at each row's last token
    kinds = getattr(model.config, "layer_types", None) or ["full_attention"]
    with torch.inference_mode():
        out = model(input_ids=ids, position_ids=at, past_key_values=cache, use_cache=True,
                    attention_mask={kind: mask for kind in set(kinds)}, logits_to_keep=torch.tensor(last))
    logits = out.logits  # [B, len(last), V]
    return torch.stack([logits[b, last.index(n - 1)] for b, n in enumerate(lengths)]).float()
