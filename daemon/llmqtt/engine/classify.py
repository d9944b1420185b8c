"""Classification without generate(): one forward pass, read the label tokens' logits.

The prompt is system prompt + few-shot turns + the user's text + the assistant cue. Everything before the
user's text is the task's fixed prefix, run once at start (KVPrefix). Per request only the text and the cue
run. The answer is read from the logits of each label word's first token at the cue, so no input can make
the model answer anything but one of the labels; the softmax over those logits is the confidence.

A task with a learned head (`llmqtt fit`, engine/head.py) reads its answer from hidden states instead: the
same forward pass, stopped after the deepest layer the head reads, and the head's calibrated softmax.
"""

from __future__ import annotations

import hashlib
import json
import threading

import torch

from ..tasks import ClassifyTask
from .head import Features, Head
from .kvprefix import KVPrefix
from .prefixstore import PrefixStore
from .prompt import ControlTokenGuard, encode, split_at_user_text
from .quantize import head_rows
from .types import Classification, TaskNotServable, TextTooLong  # noqa: F401 (TaskNotServable re-exported)


class _Enough(Exception):
    """Raised by a forward hook once the deepest layer a head reads has run: the rest of the pass is skipped."""


class LabelScorer:
    def __init__(self, model, tokenizer, task: ClassifyTask, max_context: int, store: PrefixStore | None = None,
                 head: Head | None = None):
        self.model, self.tokenizer, self.task, self.max_context = model, tokenizer, task, max_context
        self.head = head  # checked against this model by the engine; None = label logits
        self.guard = ControlTokenGuard(tokenizer)
        split = split_at_user_text(tokenizer, few_shot_messages(task))
        self.after_text = split.after_text
        self.prefix = KVPrefix(model, encode(tokenizer, split.prefix), store)
        self.label_names = list(task.labels)
        self.label_tokens = label_first_tokens(tokenizer, task)  # one list of token ids per label
        flat = [t for tokens in self.label_tokens for t in tokens]
        self._rows = torch.tensor(flat)
        self._owner = torch.tensor([i for i, tokens in enumerate(self.label_tokens) for _ in tokens])
        self._calibration = torch.tensor([task.calibration.get(n, 0.0) for n in self.label_names])
        self._head_rows = _output_rows(model, self._rows)

    def prompt_fingerprint(self) -> str:
        """Changes whenever what a learned head saw before the text changes: prefix, template or cue."""
        parts = [self.prefix.ids, self.task.user_template, self.after_text]
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]

    def rest_ids(self, text: str) -> list[int]:
        """Token ids after the cached prefix: the user's text (in the task's template) and the answer cue."""
        self.guard.check(text)
        ids = encode(self.tokenizer, self.task.render_user(text) + self.after_text)
        if self.prefix.length + len(ids) > self.max_context:
            raise TextTooLong(f"text is too long: {len(ids)} tokens with the prompt's tail, and this task has "
                              f"room for {self.max_context - self.prefix.length} (model.max_context)")
        return ids

    def score(self, texts: list[str], max_batch: int = 16, use_head: bool = True) -> list[Classification]:
        rows = [self.rest_ids(t) for t in texts]
        results: list[Classification | None] = [None] * len(rows)
        for chunk in length_chunks([len(r) for r in rows], max_batch):
            for i, result in zip(chunk, self._score_rows([rows[i] for i in chunk], use_head)):
                results[i] = result
        return results  # type: ignore[return-value]

    def label_logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Per-label logits (before calibration) at the answer cue: [B, labels]."""
        with torch.inference_mode():
            token_logits = self._head_rows(self.cue_states(rows)).float()  # [B, label tokens]
        return self._per_label(token_logits)

    def cue_states(self, rows: list[list[int]]) -> torch.Tensor:
        """The last hidden state at each row's answer cue, after the cached prefix: [B, hidden]."""
        lengths = torch.tensor([len(r) for r in rows])
        with torch.inference_mode():
            out = self.model.base_model(**self._inputs(rows))
            return out.last_hidden_state[torch.arange(len(rows)), lengths - 1]  # [B, hidden]

    def layer_states(self, rows: list[list[int]], features: Features) -> dict[tuple[int, str], torch.Tensor]:
        """Decoder-layer outputs pooled per row, for each (layer, pool) in `features`: [B, hidden] each.

        Forward hooks catch the layers' outputs; the deepest one stops the pass, so a head on layer 14 of 24
        costs ~60 % of a full forward.
        """
        lengths = torch.tensor([len(r) for r in rows])
        layers = self.model.base_model.layers
        caught: dict[int, torch.Tensor] = {}
        deepest = max(features.layers)

        owner = threading.get_ident()

        def catch(index: int):
            def hook(module, args, output):
                if threading.get_ident() != owner:  # e.g. decode.py compiling in the background: not ours
                    return None
                caught[index] = output[0] if isinstance(output, tuple) else output  # [B, S, H]
                if index == deepest:
                    raise _Enough
            return hook

        handles = [layers[i - 1].register_forward_hook(catch(i)) for i in features.layers]
        try:
            with torch.inference_mode():
                self.model.base_model(**self._inputs(rows))
        except _Enough:
            pass
        finally:
            for handle in handles:
                handle.remove()
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).unsqueeze(-1)  # [B, S, 1]
        out = {}
        for layer, pool in features.parts:
            h = caught[layer].float()
            if pool == "cue":
                out[(layer, pool)] = h[torch.arange(len(rows)), lengths - 1]
            else:  # mean over the text and the cue, pads excluded
                out[(layer, pool)] = (h * mask).sum(1) / lengths[:, None]
        return out

    def _inputs(self, rows: list[list[int]]) -> dict:
        """One batched forward's arguments: right-padded ids after the cached prefix."""
        lengths = [len(r) for r in rows]
        batch, width = len(rows), max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((batch, width), pad, dtype=torch.long)  # [B, S], right-padded
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r)
        # Right padding needs no mask: causal attention never lets a real token see the pads after it.
        start = self.prefix.length
        positions = torch.arange(start, start + width).expand(batch, -1)  # [B, S]
        return {"input_ids": input_ids, "past_key_values": self.prefix.cache(batch), "position_ids": positions,
                "use_cache": True}

    def _per_label(self, token_logits: torch.Tensor) -> torch.Tensor:
        # A label with several words is as likely as all its first tokens together: logsumexp.
        out = torch.full((token_logits.shape[0], len(self.label_names)), float("-inf"))
        for j in range(len(self.label_names)):
            out[:, j] = torch.logsumexp(token_logits[:, self._owner == j], dim=-1)
        return out

    def probabilities(self, rows: list[list[int]], use_head: bool = True) -> torch.Tensor:
        """Calibrated label probabilities [B, labels] in the task's label order: the head's if it has one."""
        if self.head is None or not use_head:
            return torch.softmax(self.label_logits(rows) + self._calibration, dim=-1)
        features = self.head.features
        probs = self.head.probabilities(features.pick(self.layer_states(rows, features)))
        return probs[:, [self.head.labels.index(name) for name in self.label_names]]

    def _score_rows(self, rows: list[list[int]], use_head: bool) -> list[Classification]:
        probs = self.probabilities(rows, use_head)
        results = []
        for p in probs.tolist():
            best = max(range(len(p)), key=p.__getitem__)
            results.append(Classification(self.label_names[best], p[best], dict(zip(self.label_names, p))))
        return results


MAX_PADDING = 1.25  # padded tokens per real token a chunk may compute


def length_chunks(lengths: list[int], max_batch: int) -> list[list[int]]:
    """Indices grouped for batched forwards: shortest first, a new chunk whenever the next (longer) row
    would make the chunk compute more than MAX_PADDING x its real tokens, or hold more than max_batch rows.

    On a CPU one forward of a few dozen tokens is already compute-bound, so batching pays only through
    fewer calls; padding a short text to a long one's length costs more than it saves.
    """
    chunks: list[list[int]] = []
    chunk: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = lengths[i] * (len(chunk) + 1)  # sorted ascending: row i is the chunk's longest
        if chunk and (len(chunk) == max_batch or padded > MAX_PADDING * (real + lengths[i])):
            chunks.append(chunk)
            chunk, real = [], 0
        chunk.append(i)
        real += lengths[i]
    return chunks + [chunk] if chunk else chunks


def few_shot_messages(task: ClassifyTask) -> list[dict]:
    messages = [{"role": "system", "content": task.system}]
    for example in task.examples:
        messages.append({"role": "user", "content": task.render_user(example.text)})
        messages.append({"role": "assistant", "content": task.labels[example.label][0]})
    return messages


def label_first_tokens(tokenizer, task: ClassifyTask) -> list[list[int]]:
    owners: dict[int, str] = {}
    per_label = []
    for name, words in task.labels.items():
        tokens = []
        for word in words:
            ids = encode(tokenizer, word)
            if not ids:
                raise TaskNotServable(f"task {task.name!r}: label {name!r} word {word!r} encodes to no tokens")
            first = ids[0]
            if owners.get(first, name) != name:
                raise TaskNotServable(
                    f"task {task.name!r}: labels {owners[first]!r} and {name!r} both start with the token "
                    f"{tokenizer.decode([first])!r} for this model; choose label words that start differently")
            owners[first] = name
            if first not in tokens:
                tokens.append(first)
        per_label.append(tokens)
    return per_label


def _output_rows(model, token_ids: torch.Tensor):
    """hidden [B, H] -> logits of just `token_ids` [B, K]: K rows of the output head instead of all 150k
    (a quantized head gives back just those rows as floats)."""
    weight, bias = head_rows(model, token_ids)
    return lambda hidden: torch.nn.functional.linear(hidden, weight, bias)
