"""Load a Hugging Face model directory for CPU inference at an explicit dtype (and optional int8)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import fastdecode
from .fastdecode import Kernels

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
    quantize: str  # "none" | "int8"
    weight_bytes: int  # bytes of parameters and buffers held in memory
    kernels: Kernels | None = None  # compiled decode kernels (fast_decode), not started yet


def load(path: Path, dtype: str, quantize: str = "none", fast_decode: bool = False) -> LoadedModel:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (resolve `auto` first), not {dtype!r}")
    # The tokenizer (pure Python and JSON, ~1 s for Qwen's) loads on a second thread meanwhile: the model's
    # load and first pass spend much of their time in torch, outside the GIL.
    with ThreadPoolExecutor(max_workers=1) as pool:
        tokenizer_loading = pool.submit(AutoTokenizer.from_pretrained, path)
        # Always pass dtype: transformers 5 would otherwise pick the checkpoint's (often bf16), which is ~2x
        # slower than fp32 on CPUs without native bf16 such as the Raspberry Pi 5.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
        model.requires_grad_(False)
        if quantize == "int8":
            model = _int8_linear(model, dtype)  # reads every weight
        else:
            _one_token_through(model)  # the checkpoint is memory-mapped: read its pages now, not at a request
        tokenizer = tokenizer_loading.result()
    kernels = fastdecode.wrap(model) if fast_decode and quantize == "none" and dtype == "float32" else None
    return LoadedModel(model, tokenizer, dtype, quantize, _bytes_in_memory(model), kernels)


def _one_token_through(model: torch.nn.Module) -> None:
    """Every weight a request reads, read once (the input embedding only for one row, as requests do)."""
    with torch.inference_mode():
        model(torch.zeros((1, 1), dtype=torch.long))


def _int8_linear(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Dynamic int8 weights for every Linear (activations stay float): ~4x smaller body, fp32 only."""
    if dtype != "float32":
        raise ValueError("quantize: int8 works on float32 models; set model.dtype: float32")
    # In place: a copy would briefly hold the float model twice (3.5 GiB instead of 1.2 GiB for the demo).
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def _bytes_in_memory(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights count once
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for module in model.modules():  # int8 Linear layers keep packed weights outside .parameters()
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            weight, bias = module.weight(), module.bias()
            total += weight.numel() * weight.element_size()
            total += bias.numel() * bias.element_size() if bias is not None else 0
    return total
