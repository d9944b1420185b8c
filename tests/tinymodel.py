"""A tiny random Qwen2 model and a byte-level BPE tokenizer, built in the test run (no downloads).

Saved to a directory like any Hugging Face model, so tests exercise llmqtt's real loading path.
"""

from __future__ import annotations

from pathlib import Path

# Enough text that the common words of the test prompts become single tokens.
_CORPUS = [
    "positive negative neutral joy anger sadness surprise",
    "You are a sentiment classifier. Answer with one word: positive or negative.",
    "I love this product, it is great. This is terrible, I hate it. The food was good.",
    "Hello, how are you today? Summarize the text in one sentence. Keywords:",
    "这个酒店很好，服务非常好。太差了，再也不来了。",
    # Label words as whole texts, so each is one token at the start of an answer.
    *"positive negative neutral joy anger sadness surprise".split(),
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: Path, seed: int = 0, tied: bool = False) -> Path:
    """Write a 2-layer, hidden-32 Qwen2 model with its tokenizer to `out_dir`; returns `out_dir`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
