"""Load a Hugging Face model directory for CPU inference: float at an explicit dtype, or quantized weights
from the model cache (quantize.py) without a float32 copy."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import attention, fastdecode, quantize as quant, quantstore
from .fastdecode import Kernels
from .modelstore import default_cache_dir

# transformers logs through its own stderr handler; route it through ours so it gets our format (and, under
# systemd, journald fields) instead.
transformers.utils.logging.disable_default_handler()
transformers.utils.logging.enable_propagation()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    dtype: str  # the compute dtype actually used, e.g. "float32"
    quantize: str  # "none" | "int8" | "int4"
    weight_bytes: int  # bytes of parameters and buffers held in memory
    kernels: Kernels | None = None  # compiled decode kernels (fast_decode), not started yet
    from_store: bool = False  # quantized weights read from the model cache (not quantized at this start)
    compile_decode: bool = False  # model.fast_decode for a quantized model: compile the whole decode step
    int8_kernel: str | None = None  # int8: what runs its products ("llmqtt AVX2" or "fbgemm")
    tokenizer_s: float | None = None  # loading the tokenizer, on its own thread beside the model


def load(path: Path, dtype: str, quantize: str = "none", fast_decode: bool = False,
         store: quantstore.QuantizedStore | None = None, early: quantstore.EarlyPacking | None = None) -> LoadedModel:
    """`quantize` is a resolved scheme (`none`, `int8`, `int4`; see config.choose_quantize); `early`: the
    stored weights' packing, if the caller started it (quantstore.EarlyPacking)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (resolve `auto` first), not {dtype!r}")
    if quantize != "none" and dtype != "float32":
        raise ValueError(f"quantize: {quantize} computes in float32; set model.dtype: float32 (or auto)")
    from_store = False
    # The tokenizer (pure Python and JSON, ~1 s for Qwen's) loads on a second thread meanwhile: the model's
    # load and first pass spend much of their time in torch, outside the GIL.
    with ThreadPoolExecutor(max_workers=1) as pool:
        tokenizer_loading = pool.submit(_timed, load_tokenizer, path)
        if quantize == "none":
            if (path / quantstore.DROPPED).is_file() and not any(path.glob("*.safetensors")):
                raise quantstore.float32_dropped_error(path)
            # Always pass dtype: transformers 5 would otherwise pick the checkpoint's (often bf16), which is
            # ~2x slower than fp32 on CPUs without native bf16 such as the Raspberry Pi 5.
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                         attn_implementation=attention.register()).eval()
            model.requires_grad_(False)
        else:
            store = store or quantstore.QuantizedStore(default_cache_dir() / "quantized")
            model, from_store = quant.load_quantized(path, quantize, store, early)
        _one_token_through(model)  # read the weights' pages now (mapped checkpoint, fresh allocations), not at a request
        tokenizer, tokenizer_s = tokenizer_loading.result()
    kernels = fastdecode.wrap(model) if fast_decode and quantize == "none" and dtype == "float32" else None
    return LoadedModel(model, tokenizer, dtype, quantize, _bytes_in_memory(model), kernels, from_store,
                       compile_decode=fast_decode and quantize != "none",
                       int8_kernel=getattr(model, "_llmqtt_int8_kernel", None), tokenizer_s=tokenizer_s)


# transformers 5's tokenizer classes (Qwen2's, Llama's, most BPE ones) build their Rust tokenizer from the
# vocabulary and merges as Python objects, then keep those: only their __init__ reads them (and Whisper's
# save). Qwen's are 152 k entries each, 63 MB of the 137 MB its tokenizer held (demo, 2026-11-29).
INIT_ONLY_ATTRIBUTES = ("_vocab", "_merges")


def load_tokenizer(path: Path):
    """AutoTokenizer's tokenizer for `path`, without the Python copies of what its Rust tokenizer holds."""
    tokenizer = AutoTokenizer.from_pretrained(path, **added_tokens_given(path))
    for name in INIT_ONLY_ATTRIBUTES:
        if getattr(tokenizer, name, None) is not None:
            setattr(tokenizer, name, None)
    return tokenizer


# Only these files send transformers to its legacy reading of added and special tokens; with any of the
# last two present that reading does more than the added tokens below, so it is left to transformers.
_TOKENIZER_CONFIG, _TOKENIZER_FILE = "tokenizer_config.json", "tokenizer.json"
_LEGACY_TOKEN_FILES = ("special_tokens_map.json", "added_tokens.json")
_ADDED_TOKENS_KEY = b'"added_tokens":'


def added_tokens_given(path: Path) -> dict:
    """`added_tokens_decoder` for AutoTokenizer when tokenizer_config.json lacks it, as transformers 5's own
    save_pretrained leaves it (every GGUF-converted model, the demo's too). Without it transformers parses
    the whole tokenizer.json in Python for that one list: for Qwen's 11 MB file 0.45 s of GIL time, beside
    the model code's import, and +55 MB at the start's peak (2026-11-29). This reads the list alone and
    builds the same AddedTokens transformers would; {} (transformers' own way) when anything differs."""
    try:
        config = json.loads((path / _TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        if "added_tokens_decoder" in config or any((path / name).exists() for name in _LEGACY_TOKEN_FILES):
            return {}
        listed = _added_tokens_list((path / _TOKENIZER_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    if listed is None:
        return {}
    return {"added_tokens_decoder": {entry.pop("id"): AddedToken(**entry) for entry in listed}}


def _added_tokens_list(data: bytes) -> list[dict] | None:
    """tokenizer.json's top-level `added_tokens`, parsed on its own. The tokenizers library writes it before
    the vocabulary, so its key's first occurrence is the top-level one; the shape is checked all the same."""
    start = data.find(_ADDED_TOKENS_KEY)
    if start < 0:
        return None
    start += len(_ADDED_TOKENS_KEY)
    window = 1 << 16  # Qwen's 22 tokens take 3 KB; decoding the whole 11 MB tail would take 90 ms
    while True:
        # a window may cut a character in two at its end; the list ends before it or the window grows
        text = data[start:start + window].decode("utf-8", errors="ignore").lstrip()
        try:
            listed, _ = json.JSONDecoder().raw_decode(text)
            break
        except ValueError:
            if start + window >= len(data):
                raise
            window *= 4
    if not isinstance(listed, list) or not all(isinstance(e, dict) and isinstance(e.get("id"), int)
                                               and isinstance(e.get("content"), str) for e in listed):
        return None
    return listed


def _timed(load, *args):
    started = time.perf_counter()
    return load(*args), time.perf_counter() - started


def _one_token_through(model: torch.nn.Module) -> None:
    """Every weight a request reads, read once (the input embedding only for one row, as requests do)."""
    with torch.inference_mode():
        model(torch.zeros((1, 1), dtype=torch.long))


def _bytes_in_memory(model: torch.nn.Module) -> int:
    if getattr(model, "_llmqtt_weights", None) is not None:  # quantized
        return quant.resident_bytes(model)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights count once
    return sum(t.numel() * t.element_size() for t in tensors.values())
