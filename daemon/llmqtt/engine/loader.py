"""Load a Hugging Face model directory for CPU inference: float at an explicit dtype, or quantized weights
from the model cache (quantize.py) without a float32 copy."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
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
    tokenizer = AutoTokenizer.from_pretrained(path)
    for name in INIT_ONLY_ATTRIBUTES:
        if getattr(tokenizer, name, None) is not None:
            setattr(tokenizer, name, None)
    return tokenizer


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
