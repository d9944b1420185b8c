"""q/k/v and gate/up as one int8 product each (quantstore.FUSED): the attention and MLP modules of a
quantized Qwen2 get one Linear per group and a forward that splits its output.

Every fbgemm call re-quantizes its input row and starts its threads: merging 24 layers x 7 products into
24 x 4 (demo model: 169 -> 97 products a step with the output head's 10 pieces) saved ~6 ms a step, ~90 µs
per product removed (random weights of the demo's shapes, 2 threads, 2026-11-29). The forwards below are
transformers' Qwen2Attention and Qwen2MLP with the products merged, nothing else changed; the modules keep
their class (a subclass named Fused<class> with the new forward), so everything that reads their
attributes (layer_idx, head_dim, config) sees the same ones.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .quantstore import FUSED


def install(model: torch.nn.Module, groups: dict[str, list[str]],
            product: Callable[[str, int, int], torch.nn.Module]) -> None:
    """Replace each group's member Linears (`groups`: fused name -> member names) by its fused product
    (`product(fused name, in_features, out_features)`: a Linear of all members' rows, in order) and give
    their parent module the fused forward."""
    for fused, members in groups.items():
        parent_name, _, child = fused.rpartition(".")
        parent = model.get_submodule(parent_name)
        linears = [parent.get_submodule(member.rpartition(".")[2]) for member in members]
        parent._llmqtt_split = [linear.out_features for linear in linears]
        parent._llmqtt_rotary = sys.modules[type(parent).__module__].apply_rotary_pos_emb  # the model code's own
        for member in members:
            delattr(parent, member.rpartition(".")[2])
        setattr(parent, child, product(fused, linears[0].in_features, sum(parent._llmqtt_split)))
        parent.__class__ = _fused_class(type(parent), FORWARDS[child])


def attention_forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      attention_mask: torch.Tensor | None, cache=None, past_key_values=None, **kwargs):
    """Qwen2Attention.forward with q/k/v as one product: hidden [B, S, hidden] -> ([B, S, hidden], weights)."""
    cache = cache if cache is not None else past_key_values
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = (part.view(hidden_shape).transpose(1, 2)  # [B, heads, S, head_dim] each
                         for part in self.qkv_proj(hidden_states).split(self._llmqtt_split, dim=-1))
    cos, sin = position_embeddings
    query, key = self._llmqtt_rotary(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
                             sliding_window=self.sliding_window, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Qwen2MLP.forward with gate and up as one product: [..., hidden] -> [..., hidden]."""
    gate, up = self.gate_up_proj(x).split(self._llmqtt_split, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


FORWARDS = {"qkv_proj": attention_forward, "gate_up_proj": mlp_forward}
assert FORWARDS.keys() == FUSED.keys()
_CLASSES: dict[tuple[type, object], type] = {}


def _fused_class(base: type, forward) -> type:
    """Fused<base>: `base` with `forward` (one class per base and forward, so isinstance checks still hold)."""
    if (base, forward) not in _CLASSES:
        _CLASSES[base, forward] = type(f"Fused{base.__name__}", (base,), {"forward": forward})
    return _CLASSES[base, forward]
