"""The "seeds' way" to classify, as a baseline: the whole prompt through `model.generate()`, then parse.

Same system prompt and few-shot turns as the classification path, but as plain text with no KV cache:
every message pays for the full prompt, a few greedy tokens are generated, and the label word is looked
for in the answer. This is how the project's seeds did it; the bench compares llmqtt's path against it.
"""

from __future__ import annotations

import re

import torch

from ..engine.classify import few_shot_messages
from ..engine.prompt import encode, render
from ..tasks import ClassifyTask

MAX_NEW_TOKENS = 4  # enough for any shipped label word plus a stray space or quote


def parse_label(answer: str, labels: dict[str, list[str]]) -> str | None:
    """The label whose word appears first in `answer` (case-insensitive, whole words); None if none does."""
    best: tuple[int, str] | None = None
    for name, words in labels.items():
        for word in words:
            # Whole words for Latin scripts ("negative" must not match inside "nonnegative"); other
            # scripts have no spaces, so a plain substring is the word.
            edge = r"(?<![a-z])" if word[:1].isascii() else ""
            tail = r"(?![a-z])" if word[-1:].isascii() else ""
            found = re.search(edge + re.escape(word.lower()) + tail, answer.lower())
            if found and (best is None or found.start() < best[0]):
                best = (found.start(), name)
    return best[1] if best else None


class SeedsWay:
    """classify(text) -> (label or None, the raw answer) by generation over the full, uncached prompt."""

    def __init__(self, model, tokenizer, task: ClassifyTask, max_new_tokens: int = MAX_NEW_TOKENS):
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.max_new_tokens = max_new_tokens
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompt_ids(self, text: str) -> list[int]:
        messages = [*few_shot_messages(self.task), {"role": "user", "content": self.task.render_user(text)}]
        return encode(self.tokenizer, render(self.tokenizer, messages, add_generation_prompt=True))

    def classify(self, text: str) -> tuple[str | None, str]:
        ids = torch.tensor([self.prompt_ids(text)])  # [1, S]: the full prompt, every time
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=self.pad,
                                      temperature=None, top_p=None, top_k=None)
        answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return parse_label(answer, self.task.labels), answer
