"""Chat generation from a cached system prompt: a decode loop you can read top to bottom.

prompt ids = [head: system prompt + user header] + [history turns, the new message, assistant cue]
The head is the task's cached prefix, or a client's own system prompt (Ollama/OpenAI APIs). The prompt's KV
starts from the longest cached prefix of it (convcache.py: the task prefix, or a recent conversation), copied
into decode.py's static KV cache, so only the rest runs (prefill). Then one token at a time, a step at a
time: the service's worker runs one decode step for every active generation together (`step`), and each
samples, stops on an end token or stop string, checks its cancel flag and hands back its new text. The
chat template's own tokens never reach the text (skip_special_tokens).

    generation = generator.stream(text)      # prompt ids and the cached start, nothing run yet
    pieces = start([generation, other])      # prefill [B, S] -> each one's first token's text
    pieces = step([generation, other, ...])  # one forward [B, 1] -> each one's next text
    # ... until generation.done; generation.result is then complete.  `for piece in generation` runs it alone.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Sequence

import torch

from ..tasks import GenerateTask, GenerationSettings
from .convcache import ConversationCache, Start
from .decode import StaticDecoder
from .kvprefix import KVPrefix
from .prefixstore import PrefixStore
from .prompt import ControlTokenGuard, encode, render, split_at_user_text
from .batch import forward_rows
from .stops import StopFilter
from .types import ChatOptions, FinishReason, GenerationResult, TextTooLong, Turn

MIN_ANSWER_TOKENS = 16  # a prompt that leaves less room than this for the answer is refused as too long


class ChatGenerator:
    def __init__(self, model, tokenizer, task: GenerateTask, max_context: int, store: PrefixStore | None = None,
                 conversations: ConversationCache | None = None, decoder: StaticDecoder | None = None):
        self.model, self.tokenizer, self.task, self.max_context = model, tokenizer, task, max_context
        self.guard = ControlTokenGuard(tokenizer)
        self.system = [{"role": "system", "content": task.system}]
        self.prefix_text = split_at_user_text(tokenizer, self.system).prefix
        self.prefix = KVPrefix(model, encode(tokenizer, self.prefix_text), store)
        self.conversations = conversations if conversations is not None else ConversationCache(max_tokens=0)
        self.decoder = decoder or StaticDecoder(model, max_context)
        self.stop_ids = _stop_token_ids(model, tokenizer)

    def stream(self, text: str, history: Sequence[Turn] = (), cancel: threading.Event | None = None,
               max_new_tokens: int | None = None, settings: GenerationSettings | None = None,
               options: ChatOptions | None = None) -> Generation:
        options = options or ChatOptions()
        self.guard.check(text)
        for said in [*(turn.content for turn in history), *([options.system] if options.system else [])]:
            self.guard.check_markers(said)
        settings = with_options(settings or self.task.generation, options)
        wanted = max_new_tokens or settings.max_new_tokens
        rest, turns_used, budget = self.prompt_ids(text, history, wanted, options.system)
        head = self._head(options.system)[1]
        ids = head + rest
        start = self.conversations.start(ids, self.prefix.ids, self.prefix.layers,
                                         lambda span, cache, at: self.forward(torch.tensor([span]), cache, at))
        result = GenerationResult(prompt_tokens=len(ids), cached_prefix_tokens=start.reused - start.recomputed,
                                  history_turns_used=turns_used)
        return Generation(self, ids, len(head), start, budget, settings, cancel, result, options.stop)

    def _head(self, system: str | None) -> tuple[str, list[int]]:
        """The prompt's text and ids up to the new turns: the task's cached prefix, or a client's system."""
        if system is None:
            return self.prefix_text, self.prefix.ids
        text = split_at_user_text(self.tokenizer, [{"role": "system", "content": system}]).prefix
        return text, encode(self.tokenizer, text)

    def prompt_ids(self, text: str, history: Sequence[Turn], max_new_tokens: int,
                   system: str | None = None) -> tuple[list[int], int, int]:
        """(ids after the head, history pairs kept, answer token budget); drops the oldest pairs first."""
        pairs = _pairs(history)[-self.task.history.max_turns:] if self.task.history.max_turns else []
        if system is not None:  # the client keeps the conversation; the task's limits are for its sessions
            pairs = _pairs(history)
        head = len(self._head(system)[1])
        bare = self._rest_ids(text, [], system)
        room = self.max_context - head - len(bare)
        if room < MIN_ANSWER_TOKENS:
            raise TextTooLong(f"message is too long: {len(bare)} tokens leaves no room to answer within "
                              f"model.max_context={self.max_context}")
        budget = min(max_new_tokens, room)
        max_history = self.task.history.max_tokens if system is None else room
        while pairs:
            ids = self._rest_ids(text, pairs, system)
            history_tokens = len(ids) - len(bare)
            if history_tokens <= max_history and room - history_tokens >= budget:
                return ids, len(pairs), budget
            pairs = pairs[1:]
        return bare, 0, budget

    def _rest_ids(self, text: str, pairs: list[tuple[Turn, Turn]], system: str | None = None) -> list[int]:
        head_text = self._head(system)[0]
        messages = [{"role": "system", "content": self.task.system if system is None else system}]
        for user, assistant in pairs:
            messages += [{"role": "user", "content": user.content}, {"role": "assistant", "content": assistant.content}]
        messages.append({"role": "user", "content": self.task.render_user(text)})
        full = render(self.tokenizer, messages, add_generation_prompt=True)
        if not full.startswith(head_text):
            raise ValueError("chat template renders the system prompt differently once history is present")
        return encode(self.tokenizer, full[len(head_text):])

    def forward(self, input_ids: torch.Tensor, cache, position: int) -> torch.Tensor:
        """input_ids: [1, S] at positions position..position+S-1 -> float logits of the last one: [V].
        Any cache (the bench times prefill with and without the prefix through it)."""
        positions = torch.arange(position, position + input_ids.shape[1]).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
        return out.logits[0, -1].float()


class Generation:
    """One answer, a token at a time. `start()` runs the prompt and picks the first token; after that, each
    decode step (`step` below: one forward for every active generation) computes the logits after `token`
    at `position` and hands them to `advance`. Iterate instead to run it alone, start to end.

    `done` once it ended (stop token, stop string, budget, cancel); `result` is then complete and the KV
    cache released. `close()` releases it early (a request dropped halfway)."""

    def __init__(self, gen: ChatGenerator, ids: list[int], head: int, start: Start, budget: int,
                 settings: GenerationSettings, cancel: threading.Event | None, result: GenerationResult,
                 stops: tuple[str, ...] = ()):
        self._gen, self._ids, self._head, self._start = gen, ids, head, start
        self._budget, self._settings = budget, settings
        self.cancel = cancel or threading.Event()
        self.result = result
        self._stops = StopFilter(stops) if stops else None
        self._rng = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        self._seen = torch.tensor(ids[head:])  # the repetition penalty's scope: all after the system prompt
        self._produced: list[int] = []
        self._cache_scope = contextlib.ExitStack()
        self.cache = None  # decode.py's static cache, once started: [1, kv_heads, max_context, head_dim] per layer
        self.token: int | None = None  # the last token picked: the next step computes its KV and what follows
        self.position = 0  # where `token` goes: the cache holds positions 0..position-1
        self.done = False
        self._started_at = self._first_at = 0.0

    @property
    def tokens(self) -> list[int]:
        """The answer's token ids so far."""
        return list(self._produced)

    @property
    def decoder(self) -> StaticDecoder:
        return self._gen.decoder

    def start(self) -> str:
        """Prefill alone: the prompt's uncached rest through the model, into this generation's static cache.
        Returns the first token's text ("" if it is the end, or half a character)."""
        return start([self])[0]

    def _open(self) -> list[int]:
        """Take a static cache, the cached start of the prompt copied in; the prompt ids still to run."""
        self._started_at = time.perf_counter()
        reused = self._start.reused
        prefix = [(layer.keys, layer.values) for layer in self._start.cache.layers]  # [1, kv_heads, reused, head_dim]
        self.cache = self._cache_scope.enter_context(self.decoder.cache(prefix))
        self.position = reused
        self.result.finish_reason = "length"
        return self._ids[reused:]

    def _prefilled(self, logits: torch.Tensor) -> str:
        """The prompt is in the cache; `logits` ([V]) follow its last token: pick the first one."""
        self.position = len(self._ids)
        return self.advance(logits)

    def end_if_cancelled(self) -> str:
        """Between steps: end now if the request was cancelled (its tail text), else ""."""
        return self._finish("cancelled") if self.cancel.is_set() and not self.done else ""

    def advance(self, logits: torch.Tensor) -> str:
        """Pick the next token from `logits` ([V], those after `token`); returns the new text."""
        if self.token is not None:
            self.position += 1  # the step that computed `logits` wrote `token`'s KV
        if self.cancel.is_set():
            return self._finish("cancelled")
        token = sample(logits, self._settings, self._seen, self._rng)
        if not self._first_at:
            self._first_at = time.perf_counter()
            self.result.first_token_s = self._first_at - self._started_at
        if token in self._gen.stop_ids:
            return self._finish("stop")
        self._produced.append(token)
        self._seen = torch.cat([self._seen, torch.tensor([token])])
        self.token = token
        piece = self._filtered(self._new_text())
        if self._stops is not None and self._stops.cut is not None:
            return piece + self._finish("stop")
        if len(self._produced) == self._budget:
            return piece + self._finish("length")
        return piece

    def _finish(self, reason: FinishReason) -> str:
        """End here: keep the conversation's KV, release the cache, complete the result; the tail text."""
        gen, result = self._gen, self.result
        result.finish_reason = reason
        fed = self._ids + self._produced[:self.position - len(self._ids)]  # the tokens whose KV the cache holds
        gen.conversations.keep(fed, len(self._ids), self.cache, self._start)
        self.close()
        result.new_tokens = len(self._produced)
        result.decode_s = time.perf_counter() - self._first_at if self._first_at else 0.0
        tail = self._filtered(self._new_text(final=True))
        if self._stops is not None:
            tail += self._stops.flush()
            if self._stops.cut is not None:
                result.text = self._stops.text[:self._stops.cut]
                result.finish_reason = "stop"
        return tail

    def close(self) -> None:
        """Release the KV cache (the shared one goes back to the next generation). Idempotent."""
        self.done = True
        self._cache_scope.close()

    def __iter__(self) -> Iterator[str]:
        try:
            piece = self.start()
            while True:
                if piece:
                    yield piece
                if self.done:
                    return
                piece = step([self])[0]
        finally:
            self.close()

    def _filtered(self, piece: str) -> str:
        return self._stops.feed(piece) if self._stops is not None and piece else piece

    def _new_text(self, final: bool = False) -> str:
        text = self._gen.tokenizer.decode(self._produced, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # half of a multi-byte character: wait for the rest
            return ""
        piece = text[len(self.result.text):]
        self.result.text = text
        return piece


def start(generations: Sequence[Generation]) -> list[str]:
    """Prefill for generations that start together: one forward for all their prompts ([B, S], right-padded),
    then each picks its first token. Returns each one's first text."""
    rests = [g._open() for g in generations]
    if len(generations) == 1:
        g = generations[0]
        logits = g.decoder.prefill(torch.tensor(rests), g.cache, g.position)[None]  # [1, S] -> [1, V]
    else:
        logits = forward_rows(generations[0].decoder.model, rests, [g.cache for g in generations],
                              [g.position for g in generations])  # [B, V]
    return [g._prefilled(row) for g, row in zip(generations, logits)]


def step(generations: Sequence[Generation]) -> list[str]:
    """One decode step for started generations: one forward for all that are still going, then each picks its
    next token. Returns each one's new text ("" for one already done).

    A generation alone steps through decode.py (compiled once ready: single-request decode stays as fast
    as before); several step together through batch.py (eager, one forward for all)."""
    pieces = {g: g.end_if_cancelled() for g in generations if not g.done}  # cancelled: no forward for them
    going = [g for g in generations if not g.done]
    if len(going) == 1:
        g = going[0]
        logits = g.decoder.step(g.token, g.cache, g.position)[None]  # [1, V]
    elif going:
        logits = forward_rows(going[0].decoder.model, [[g.token] for g in going], [g.cache for g in going],
                              [g.position for g in going])  # [B, 1] -> [B, V]
    for g, row in zip(going, logits if going else []):
        pieces[g] = g.advance(row)
    return [pieces.get(g, "") for g in generations]


def with_options(settings: GenerationSettings, options: ChatOptions) -> GenerationSettings:
    """The task's settings with a request's overrides (those it sets)."""
    update = {name: getattr(options, name) for name in ("temperature", "top_p", "top_k", "seed")
              if getattr(options, name) is not None}
    return settings.model_copy(update=update) if update else settings


# Nucleus sampling sorts only the likeliest tokens. Sorting all 151,936 probabilities of Qwen's vocabulary
# took 14 ms and torch.multinomial over them 4 ms, against ~25 ms for the decode step itself: chats at the chat task's
# temperature 0.5 / top_p 0.9 decoded at ~20 tok/s where greedy ones did ~40 (demo, int8, 2 threads,
# 2026-11-30). The top 256 (0.3 ms to find) hold the nucleus unless the distribution is nearly flat; then
# every token is sorted, as before.
NUCLEUS_CANDIDATES = 256


def sample(logits: torch.Tensor, s: GenerationSettings, seen: torch.Tensor, rng: torch.Generator | None) -> int:
    """logits: [V] -> one token id (greedy when temperature is 0)."""
    logits = logits.clone()
    if s.repetition_penalty != 1.0 and seen.numel():
        prior = logits[seen]
        logits[seen] = torch.where(prior > 0, prior / s.repetition_penalty, prior * s.repetition_penalty)
    if s.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    ids = None  # token ids of `probs`' entries, when not the whole vocabulary
    if s.top_k:  # only these can be drawn: the distribution is over them alone
        logits, ids = torch.topk(logits, min(s.top_k, logits.numel()))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        probs, ids = nucleus(probs, ids, s.top_p)
    drawn = draw(probs, rng)
    return drawn if ids is None else int(ids[drawn])


def draw(probs: torch.Tensor, rng: torch.Generator | None) -> int:
    """An index drawn with probability proportional to `probs`, by the inverse of their running sum: 0.2 ms
    over Qwen's vocabulary, where torch.multinomial took 4-5 ms (2026-11-30)."""
    running = torch.cumsum(probs, 0)
    point = (1.0 - torch.rand(1, generator=rng)) * running[-1]  # in (0, sum]: no zero-probability entry is hit
    return min(int(torch.searchsorted(running, point)), probs.numel() - 1)


def nucleus(probs: torch.Tensor, ids: torch.Tensor | None, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The likeliest tokens whose probabilities, added up in order, reach `top_p` (each kept token's
    predecessors sum to at most top_p): (their probabilities, their token ids). `ids`: the token of each
    entry of `probs`, None for the whole vocabulary in order."""
    top, order = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.numel()))  # sorted, likeliest first
    if top.numel() < probs.numel() and float(top[:-1].sum()) <= top_p:  # the nucleus may reach past them
        top, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(top, 0) - top <= top_p
    tokens = order if ids is None else ids[order]
    return top[keep], tokens[keep]


def _pairs(history: Sequence[Turn]) -> list[tuple[Turn, Turn]]:
    """Complete (user, assistant) pairs in order; a dangling turn is ignored."""
    pairs, pending = [], None
    for turn in history:
        if turn.role == "user":
            pending = turn
        elif pending is not None:
            pairs.append((pending, turn))
            pending = None
    return pairs


def _stop_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            ids.add(token)
    ids.discard(None)
    return ids
