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

Over a static cache (decode.py) the keys span all `max_context` positions, most of them not written yet and
masked out: attending all 2048 cost 480 µs a layer where the 300 written ones need 109 (demo model, one
thread), ~9 ms of a ~40 ms token. Both paths attend only up to the last position any row may see. For
decode that is an opaque op (`llmqtt::decode_attention`): the compiled step's graph keeps its one
static shape while the op reads how far the mask reaches at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "llmqtt"


def attended_length(mask: torch.Tensor | None, length: int) -> int:
    """How many key positions any query may see: one past the last True column of a bool mask [B, 1, S, T];
    `length` (T) without one. Columns beyond are masked for every row, so leaving them out changes nothing."""
    if mask is None or mask.dtype != torch.bool:
        return length
    seen = mask.reshape(-1, mask.shape[-1]).amax(dim=0)  # [T]; one reduction: this runs per layer and step
    last = int(seen.flip(0).to(torch.uint8).argmax())  # columns after the last True one
    return length - last if bool(seen[length - 1 - last]) else length


def _attended(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None):
    """key/value [B, KV, T, d] and mask [B, 1, S, T] cut to the positions any query may see."""
    n = attended_length(mask, key.shape[2])
    return key[:, :, :n], value[:, :, :n], None if mask is None else mask[..., :n]


def _decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float | None) -> torch.Tensor:
    """One query token per row, its H/KV query heads per group as rows against the group's key/value head:
    query [B, KV, H/KV, d], key/value [B, KV, T, d], mask [B, 1, 1, T] -> [B, KV, H/KV, d]."""
    key, value, mask = _attended(key, value, mask)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


# llmqtt's ops (this one; quantize.py's int8_linear): plain Library ops, whose dispatch costs a few µs a
# call; torch.library.custom_op's Python wrapper measured ~50 µs, 24-169 times a decode step.
LIBRARY = torch.library.Library("llmqtt", "DEF")
LIBRARY.define("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float? scale) -> Tensor")
LIBRARY.impl("decode_attention", _decode_attention, "CPU")
LIBRARY.impl("decode_attention", lambda query, key, value, mask, scale: torch.empty_like(query), "Meta")


def grouped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, S, d], key/value [B, KV, T, d], mask [B, 1, S, T] (bool, True = attend) or None
    -> ([B, S, H, d], None), as transformers' attention functions return."""
    batch, heads, length, dim = query.shape
    groups = key.shape[1]
    if length == 1 and heads != groups:  # decode: [B, KV, H/KV, d] against [B, KV, T, d]; mask [B, 1, 1, T]
        out = torch.ops.llmqtt.decode_attention(query.reshape(batch, groups, heads // groups, dim), key, value,
                                                attention_mask, scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2), None
    if not torch.compiler.is_compiling():  # prefill into a static cache: only the positions written so far
        key, value, attention_mask = _attended(key, value, attention_mask)
    causal = attention_mask is None and length > 1 and getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         is_causal=causal, enable_gqa=heads != groups)
    return out.transpose(1, 2), None


def register() -> str:
    """Make `attn_implementation="llmqtt"` known to transformers (idempotent); returns the name."""
    AttentionInterface.register(NAME, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
