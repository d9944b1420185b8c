"""A fixed prompt prefix run through the model once; every request starts from a view of its KV cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .prefixstore import Layers, PrefixStore


class KVPrefix:
    def __init__(self, model: torch.nn.Module, ids: list[int], store: PrefixStore | None = None):
        self.ids = ids
        layers = store.load(ids) if store else None
        self.from_disk = layers is not None
        if layers is None:
            layers = _run(model, ids)
            if store:
                store.save(ids, layers)
        self._layers = layers

    @property
    def layers(self) -> Layers:
        """Per layer (keys, values): [1, kv_heads, P, head_dim]. Read-only: copy before writing."""
        return self._layers

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def layers(self) -> Layers:
        """Per layer (keys, values): [1, kv_heads, P, head_dim]; read-only for callers."""
        return self._layers

    def cache(self, batch: int = 1) -> DynamicCache:
        """A fresh cache holding the prefix for `batch` rows.

        expand() shares the prefix memory; the first update of each layer appends with torch.cat, which
        allocates new tensors, so the stored prefix is never written to and can serve every request.
        """
        cache = DynamicCache()
        for i, (keys, values) in enumerate(self._layers):  # keys: [1, kv_heads, P, head_dim]
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), i)
        return cache


def _run(model: torch.nn.Module, ids: list[int]) -> Layers:
    with torch.inference_mode():
        out = model.base_model(torch.tensor([ids]), use_cache=True)  # ids: [1, P]
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]
