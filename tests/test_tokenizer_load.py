"""The served tokenizer: AutoTokenizer's own, loaded without transformers parsing the whole tokenizer.json in
Python when tokenizer_config.json lacks `added_tokens_decoder` (transformers 5's own saves, the demo's)."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from llmqtt.engine.loader import _added_tokens_list, added_tokens_given, load_tokenizer

TEXTS = ["hello world", "<|im_start|>user\nhi<|im_end|>", " leading space\n\ttab", "héllo 😀 <|endoftext|>"]


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_the_added_tokens_read_alone_make_the_same_tokenizer_as_transformers(tiny_model_dir):
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert "added_tokens_decoder" not in config  # transformers 5's save: the case this path is for
    given = added_tokens_given(tiny_model_dir)["added_tokens_decoder"]
    listed = json.loads((tiny_model_dir / "tokenizer.json").read_text())["added_tokens"]
    assert sorted(given) == sorted(entry["id"] for entry in listed) and len(given) >= 3
    served, reference = load_tokenizer(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert repr(served.added_tokens_decoder) == repr(reference.added_tokens_decoder)  # flags too, not only text
    assert repr(served) == repr(reference)
    assert [served(t)["input_ids"] for t in TEXTS] == [reference(t)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize("change", ["special_tokens_map.json", "added_tokens.json", "decoder in config"])
def test_files_transformers_reads_more_from_are_left_to_it(model_copy, change):
    if change == "decoder in config":
        path = model_copy / "tokenizer_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "added_tokens_decoder": {}}))
    else:
        (model_copy / change).write_text("{}")
    assert added_tokens_given(model_copy) == {}


@pytest.mark.parametrize("tokenizer_json", [b"", b'{"version": "1.0", "model": {}}', b'{"added_tokens": [{"id": 1',
                                            b'{"added_tokens": [{"content": "no id"}]}', b'{"added_tokens": {}}'])
def test_an_unreadable_or_unexpected_added_tokens_list_is_left_to_transformers(model_copy, tokenizer_json):
    (model_copy / "tokenizer.json").write_bytes(tokenizer_json)
    assert added_tokens_given(model_copy) == {}


def test_a_list_longer_than_the_first_window_and_cut_inside_a_character_is_read_whole():
    """3,000 tokens with 2-byte characters, ~200 KB: past the 64 KB first window, which is made to end inside one."""
    for pad in range(300):  # shift the bytes until the window's end falls inside an é
        tokens = [{"id": i, "content": f"<{'x' * pad if i == 0 else ''}{'é' * 8}{i}>", "single_word": False,
                   "lstrip": False, "rstrip": False, "normalized": False, "special": True} for i in range(3000)]
        data = json.dumps({"version": "1.0", "added_tokens": tokens, "model": {"vocab": {"x": 0}}},
                          ensure_ascii=False).encode()
        window_end = data.find(b'"added_tokens":') + len(b'"added_tokens":') + (1 << 16)
        if data[window_end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: the window cuts a character
            break
    else:
        pytest.fail("no padding put the window's end inside a character")
    assert _added_tokens_list(data) == tokens
