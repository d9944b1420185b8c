"""Chat-template prompts split into a fixed, cached prefix and a per-request rest.

The split is found by rendering the model's own chat template with a sentinel in place of the user's
text, so it works for any template (Qwen, SmolLM2, ...). Token ids of a prompt are always
`encode(prefix) + encode(rest)`: the cached path and the full-prompt path see the very same ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import InvalidText

SENTINEL = "\u2063LLMQTT_USER_TEXT\u2063"  # invisible separator chars: never in a template


@dataclass(frozen=True)
class SplitPrompt:
    prefix: str  # everything up to where the user's text goes (system prompt, few-shot turns, user header)
    after_text: str  # what follows the user's text (end of turn, assistant header)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def split_at_user_text(tokenizer, messages_before: list[dict]) -> SplitPrompt:
    """Render `messages_before` + a user turn holding the sentinel, with the assistant cue, and split there."""
    text = render(tokenizer, [*messages_before, {"role": "user", "content": SENTINEL}], add_generation_prompt=True)
    if text.count(SENTINEL) != 1:
        raise ValueError("the model's chat template does not place the user message verbatim")
    prefix, after = text.split(SENTINEL)
    return SplitPrompt(prefix, after)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class ControlTokenGuard:
    """Refuses user text that carries the model's own control tokens (`<|im_start|>` and friends).

    Such text would let a request write its own system or assistant turns: prompt injection at the token
    level. Plain-language injection cannot change a classification (only label tokens are read) and is a
    matter of the system prompt for generation.
    """

    def __init__(self, tokenizer):
        self._markers = sorted({t for t in tokenizer.get_added_vocab() if len(t) > 1}, key=len, reverse=True)

    def check(self, text: str) -> None:
        if not text.strip():
            raise InvalidText("text is empty")
        self.check_markers(text)

    def check_markers(self, text: str) -> None:
        """Refuse control tokens (also in a client's history or system prompt, which may be empty)."""
        for marker in self._markers:
            if marker in text:
                raise InvalidText(f"text contains the model's control token {marker!r}")
