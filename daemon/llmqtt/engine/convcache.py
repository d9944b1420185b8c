"""KV caches of recent conversations, reused across requests by their longest common token prefix.

Clients of the Ollama and OpenAI APIs (Home Assistant among them) send the whole conversation with every
turn. Turn N's prompt starts with turn N-1's prompt and answer, whose keys and values the model already
computed; kept here, they let turn N run only its new tokens (llama.cpp's server slots do the same).

Exact reuse only: a token's KV depends on every token before it, so an entry is reused up to the first
token that differs and not beyond. Entries are plain per-layer (keys, values) tensors; a request gets a
fresh cache built from views of them, and the decode loop's appends allocate new tensors, so a kept entry
is never written to. Memory: the demo model (24 layers, 2 KV heads of 64 floats) keeps ~24 KiB per token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from transformers import DynamicCache

from .prefixstore import Layers


@dataclass
class Start:
    """Where a request's prefill begins: a cache holding `reused` tokens' KV, and the token ids."""

    cache: DynamicCache
    reused: int  # ids[:reused] are in the cache; ids[reused:] still have to run
    continues: tuple[int, ...] | None = None  # the entry whose answer this prompt goes on from, if any


@dataclass
class _Entry:
    layers: Layers
    prompt: int  # tokens before the answer: a prompt sharing more than these continues this conversation


class ConversationCache:
    """At most `max_tokens` tokens of KV over all entries, least recently used dropped first (0: off)."""

    def __init__(self, max_tokens: int = 4096):
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.hits = self.misses = 0

    def start(self, ids: list[int], fallback_ids: list[int], fallback: Layers) -> Start:
        """A cache for a prompt of `ids`, from the entry sharing the longest prefix with it.

        `fallback` (a task's cached system prompt) competes like an entry but is never evicted. At least one
        token is left to run: the next token's logits come from the last prompt token's forward pass.
        """
        key, layers, shared = tuple(fallback_ids), fallback, common_prefix(fallback_ids, ids)
        for entry_ids, entry in self._entries.items():
            n = common_prefix(entry_ids, ids)
            if n > shared:
                key, layers, shared = entry_ids, entry.layers, n
        continues = key if key in self._entries and shared > self._entries[key].prompt else None
        if continues is not None:
            self._entries.move_to_end(key)  # only going on with a conversation counts as using it
            self.hits += 1
        else:
            self.misses += 1
        reused = min(shared, len(ids) - 1)
        cache = DynamicCache()
        for i, (keys, values) in enumerate(layers):  # keys: [1, kv_heads, T, head_dim]
            cache.update(keys[:, :, :reused], values[:, :, :reused], i)
        return Start(cache, reused, continues)

    def keep(self, ids: list[int], prompt: int, cache: DynamicCache, start: Start | None = None) -> None:
        """Remember a finished request's KV: `ids` are exactly the tokens the cache holds, in order, the
        first `prompt` of them its prompt.

        It replaces the entry whose answer it went on from and any entry that is a prefix of it: that
        conversation moved on. (An answer may tokenize differently when the client sends it back, so the old
        entry is not always a prefix of the new one.) Other conversations with the same system prompt stay.
        """
        if self.max_tokens <= 0 or not ids or len(ids) > self.max_tokens:
            return
        # Copies: the decode loop's static cache (decode.py) is overwritten by the next generation.
        layers = [(layer.keys[:, :, :len(ids)].clone(), layer.values[:, :, :len(ids)].clone()) for layer in cache.layers]
        if any(keys.shape[2] != len(ids) for keys, _ in layers):
            return  # not the tokens we were told: keep nothing rather than something wrong
        key = tuple(ids)
        for old in [k for k in self._entries if k == key[:len(k)] or (start is not None and k == start.continues)]:
            del self._entries[old]
        self._entries[key] = _Entry(layers, prompt)
        while sum(len(k) for k in self._entries) > self.max_tokens:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def common_prefix(a, b) -> int:
    """How many leading items `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

