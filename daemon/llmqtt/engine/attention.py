"""Attention for Qwen2's grouped queries without copying keys and values: registered with transformers as
`llmqtt` and set on every model the loader returns.

Qwen2 has 7 query heads per key/value head (0.5B: 14 and 2). With an attention mask, transformers' `sdpa`
copies every key and value 7 times per layer and call (`repeat_kv`) before torch's kernel, and always does
so in a compiled graph: 20 % of a classification's CPU time on the demo model (one thread, 324-token
prefix), and 24 layers x 2 x 7.3 MB of copies a decode step over the 2048-position static cache. Instead:

- one query token (decode): the 7 query heads of a group become 7 query rows against their shared
  key/value head, as transformers does eagerly (`pack_gqa`), compiled too;
- several (prefill, classification): torch's SDPA with `enable_gqa`, which reads the shared heads in place.

Same numbers as `sdpa` (the demo's label logits identical, 2026-11-29); the masks are sdpa's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "llmqtt"


def grouped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, S, d], key/value [B, KV, T, d], mask [B, 1, S, T] (bool, True = attend) or None
    -> ([B, S, H, d], None), as transformers' attention functions return."""
    batch, heads, length, dim = query.shape
    groups = key.shape[1]
    if length == 1 and heads != groups:  # decode: [B, KV, H/KV, d] against [B, KV, T, d]; mask [B, 1, 1, T]
        out = F.scaled_dot_product_attention(query.reshape(batch, groups, heads // groups, dim), key, value,
                                             attn_mask=attention_mask, scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2), None
    causal = attention_mask is None and length > 1 and getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         is_causal=causal, enable_gqa=heads != groups)
    return out.transpose(1, 2), None


def register() -> str:
    """Make `attn_implementation="llmqtt"` known to transformers (idempotent); returns the name."""
    AttentionInterface.register(NAME, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
