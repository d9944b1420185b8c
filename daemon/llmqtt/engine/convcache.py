"""KV caches of recent conversations, reused across requests by their longest common token prefix.

Clients of the Ollama and OpenAI APIs (Home Assistant among them) send the whole conversation with every
turn. Turn N's prompt starts with turn N-1's prompt and answer, whose keys and values the model already
computed; kept here, they let turn N run only its new tokens (llama.cpp's server slots do the same).

By default the reuse is exact: a token's KV depends on every token before it, so an entry is reused up to
the first token that differs and not beyond. Home Assistant renders its system prompt afresh every turn with
the current time at its start, which stops exact reuse there. The `tolerant` mode (opt-in) goes past one
short same-length change (<= MAX_GAP tokens, such as a time stamp): it recomputes the changed tokens and
reuses the KV after them although it was computed next to the old ones, as llama.cpp's cache reuse does;
answers are then close to, but not bit-identical with, a full recomputation.

Entries are plain per-layer (keys, values) tensors; a request gets a fresh cache built from views of them,
and the decode loop's appends allocate new tensors, so a kept entry is never written to. Memory: the demo
model (24 layers, 2 KV heads of 64 floats) keeps ~24 KiB per token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from transformers import DynamicCache

from .prefixstore import Layers


@dataclass
class Start:
    """Where a request's prefill begins: a cache holding `reused` tokens' KV, and the token ids."""

    cache: DynamicCache
    reused: int  # ids[:reused] are in the cache; ids[reused:] still have to run
    continues: tuple[int, ...] | None = None  # the entry whose answer this prompt goes on from, if any
    recomputed: int = 0  # tolerant mode: changed tokens inside ids[:reused] that were run, not reused


@dataclass
class _Entry:
    layers: Layers
    prompt: int  # tokens before the answer: a prompt sharing more than these continues this conversation


MAX_GAP = 16  # tokens of a same-length change the tolerant mode recomputes (a time stamp is 6-9)
MIN_TAIL = 32  # and the match after it must go on for at least this long to be worth it

Run = Callable[[list[int], DynamicCache, int], object]  # (ids, cache, first position): appends their KV


class ConversationCache:
    """At most `max_tokens` tokens of KV over all entries, least recently used dropped first (0: off)."""

    def __init__(self, max_tokens: int = 4096, tolerant: bool = False):
        self.max_tokens = max_tokens
        self.tolerant = tolerant
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.hits = self.misses = 0

    def start(self, ids: list[int], fallback_ids: list[int], fallback: Layers, run: Run | None = None) -> Start:
        """A cache for a prompt of `ids`, from the entry sharing the longest prefix with it.

        `fallback` (a task's cached system prompt) competes like an entry but is never evicted. At least one
        token is left to run: the next token's logits come from the last prompt token's forward pass. `run`
        computes a changed span's KV in tolerant mode.
        """
        if self.tolerant and run is not None:
            patched = self._start_past_a_change(ids, run, common_prefix(fallback_ids, ids))
            if patched is not None:
                return patched
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

    def _start_past_a_change(self, ids: list[int], run: Run, floor: int) -> Start | None:
        """Tolerant mode: the entry matching most tokens when one short same-length change is recomputed."""
        best = None  # (tokens matched, entry ids, change start, change end)
        for entry_ids in self._entries:
            a = common_prefix(entry_ids, ids)
            for b in range(a + 1, min(a + MAX_GAP, len(ids)) + 1):
                tail = common_prefix(entry_ids[b:], ids[b:])
                if tail >= MIN_TAIL:
                    if best is None or b + tail > best[0]:
                        best = (b + tail, entry_ids, a, b)
                    break
        exact = max([floor, *(common_prefix(k, ids) for k in self._entries)])
        if best is None or best[0] <= exact + MAX_GAP:
            return None  # exact reuse does as well
        matched, key, a, b = best
        entry = self._entries[key]
        reused = min(matched, len(ids) - 1)
        cache = DynamicCache()
        for i, (keys, values) in enumerate(entry.layers):
            cache.update(keys[:, :, :a], values[:, :, :a], i)
        run(ids[a:b], cache, a)  # the changed tokens, computed after the exact prefix
        for i, (keys, values) in enumerate(entry.layers):
            cache.update(keys[:, :, b:reused], values[:, :, b:reused], i)  # computed beside the old tokens
        continues = key if matched > entry.prompt else None
        if continues is not None:
            self._entries.move_to_end(key)
        self.hits += 1
        return Start(cache, reused, continues, recomputed=b - a)

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

    def clear(self) -> None:
        self._entries.clear()

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

