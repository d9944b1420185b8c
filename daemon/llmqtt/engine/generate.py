"""Chat generation from a cached system prompt: a decode loop you can read top to bottom.

prompt ids = [head: system prompt + user header] + [history turns, the new message, assistant cue]
The head is the task's cached prefix, or a client's own system prompt (Ollama/OpenAI APIs). The prompt's KV
starts from the longest cached prefix of it (convcache.py: the task prefix, or a recent conversation), copied
into decode.py's static KV cache, so only the rest runs (prefill). Then one token at a time through
decode.py's step (compiled once ready): sample, stop on an end token, check the cancel flag, yield the new
text. The chat template's own tokens never reach the text (skip_special_tokens).
"""

from __future__ import annotations

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
from .stops import StopStrings
from .types import ChatOptions, GenerationResult, TextTooLong, Turn

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
               options: ChatOptions | None = None) -> "Generation | StopStrings":
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
        generation = Generation(self, ids, len(head), start, budget, settings, cancel, result)
        return StopStrings(generation, options.stop, generation.cancel) if options.stop else generation

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
    """Iterate for text pieces; `result` is complete once the iteration ends."""

    def __init__(self, gen: ChatGenerator, ids: list[int], head: int, start: Start, budget: int,
                 settings: GenerationSettings, cancel: threading.Event | None, result: GenerationResult):
        self._gen, self._ids, self._head, self._start = gen, ids, head, start
        self._budget, self._settings = budget, settings
        self.cancel = cancel or threading.Event()
        self.result = result

    def __iter__(self) -> Iterator[str]:
        gen, result, settings = self._gen, self.result, self._settings
        rng = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        started = time.perf_counter()
        reused = self._start.reused
        start = [(layer.keys, layer.values) for layer in self._start.cache.layers]  # [1, kv_heads, reused, head_dim]
        with gen.decoder.cache(start) as cache:  # static: [1, kv_heads, max_context, head_dim] per layer
            logits = gen.decoder.prefill(torch.tensor([self._ids[reused:]]), cache, reused)  # [1, S] -> [V]
            yield from self._decode(logits, cache, rng, started)

    def _decode(self, logits: torch.Tensor, cache, rng: torch.Generator | None, started: float) -> Iterator[str]:
        gen, result, settings = self._gen, self.result, self._settings
        fed = list(self._ids)  # the tokens whose KV the cache holds, for the conversation cache
        position = len(self._ids)
        seen = torch.tensor(self._ids[self._head:])  # the repetition penalty's scope: all after the system
        produced: list[int] = []
        result.finish_reason = "length"
        first_at = None
        for _ in range(self._budget):
            if self.cancel.is_set():
                result.finish_reason = "cancelled"
                break
            token = sample(logits, settings, seen, rng)
            if first_at is None:
                first_at = time.perf_counter()
                result.first_token_s = first_at - started
            if token in gen.stop_ids:
                result.finish_reason = "stop"
                break
            produced.append(token)
            seen = torch.cat([seen, torch.tensor([token])])
            piece = self._new_text(produced)
            if piece:
                yield piece
            logits = gen.decoder.step(token, cache, position)  # one token at `position` -> [V]
            fed.append(token)
            position += 1
        gen.conversations.keep(fed, len(self._ids), cache, self._start)
        result.new_tokens = len(produced)
        result.decode_s = time.perf_counter() - first_at if first_at else 0.0
        tail = self._new_text(produced, final=True)
        if tail:
            yield tail

    def _new_text(self, produced: list[int], final: bool = False) -> str:
        text = self._gen.tokenizer.decode(produced, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # half of a multi-byte character: wait for the rest
            return ""
        piece = text[len(self.result.text):]
        self.result.text = text
        return piece


def with_options(settings: GenerationSettings, options: ChatOptions) -> GenerationSettings:
    """The task's settings with a request's overrides (those it sets)."""
    update = {name: getattr(options, name) for name in ("temperature", "top_p", "top_k", "seed")
              if getattr(options, name) is not None}
    return settings.model_copy(update=update) if update else settings


def sample(logits: torch.Tensor, s: GenerationSettings, seen: torch.Tensor, rng: torch.Generator | None) -> int:
    """logits: [V] -> one token id (greedy when temperature is 0)."""
    logits = logits.clone()
    if s.repetition_penalty != 1.0 and seen.numel():
        prior = logits[seen]
        logits[seen] = torch.where(prior > 0, prior / s.repetition_penalty, prior * s.repetition_penalty)
    if s.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, 0) - sorted_probs > s.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=rng))


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
