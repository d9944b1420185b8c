"""Quantized weights at rest: quantize a float32 model once, keep the result in the model cache, and load
it on every later start without ever holding a float32 copy.

Two schemes, chosen by `config.choose_quantize` from the CPU's features:

- `int8` (x86, any CPU): every Linear, the output head included, as int8 per output channel (symmetric,
  scales from torchao's `Int8Tensor.from_hp`). Products run on fbgemm's dynamic int8 kernels, which
  quantize the activations per call. Weights use 7 bits ([-64, 63]) so activations keep all 8: on AVX2
  without VNNI, fbgemm multiplies u8 x s8 pairs into int16 (vpmaddubsw), which saturates unless one side
  is 7-bit. torchao's own int8 product (`torch._int_mm`) is the alternative; on this bench machine
  (AVX2, no VNNI) it measured 40x slower than fbgemm for a 40-row batch (docs/quantization.md).
- `int4` (aarch64, e.g. Raspberry Pi 5): weights in groups of 32 as symmetric int4, activations int8 per
  token, through the KleidiAI kernels inside stock torch (`aten._dyn_quant_matmul_4bit`), packed by
  torchao's `Int8DynamicActivationIntxWeightConfig(intx_packing_format="opaque_aten_kleidiai")`.

The input embedding is an int8 table read by rows (`RowEmbedding`): a lookup reads only the rows it needs,
never the whole 151,936 x 896 table. A model with tied embeddings shares the output head's rows; the
built-in GGUF conversions are untied (their own output matrix) and keep a table of their own. Classification reads only its label rows
(`head_rows`).

At rest the file is plain safetensors (int8/uint8 values, float scales, norms and biases) named by a
fingerprint of the model files, the scheme and the library versions, so any change re-quantizes.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import torch

from . import attention, fused, kernels
from .mapped import MappedFile
from .quantstore import (DROPPED, EarlyPacking, QuantizedStore, float32_dropped_error, fused_groups, fuses,
                         hand_freed_blocks_back, has_fbgemm)

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
INT8_WEIGHT_MAX = 63  # 7-bit weights: see the module docstring (fbgemm on AVX2 without VNNI)
INT4_GROUP = 32  # weights per int4 scale: the group size KleidiAI's kernels are tuned for


# --------------------------------------------------------------------------- modules

# fbgemm's packed weights are a TorchScript object, which torch.compile cannot take as an input: compiled
# code reaches them through this custom op and a registry keyed by a plain int, numbered in the order layers
# are loaded. Not id(layer): the key is a constant in the compiled graph, and an address differs at every
# start, so inductor's on-disk cache never matched and every start compiled the demo's step again (~60 s,
# +0.19 GB peak RSS; 2026-11-29). Numbered, a daemon's layers get the same keys at every start.
_PACKED: dict[int, list] = {}
_NEXT_KEY = itertools.count()


def _linear_dynamic(x: torch.Tensor, pieces: list) -> torch.Tensor:
    if len(pieces) == 1:
        return torch.ops.quantized.linear_dynamic(x, pieces[0], False)
    return torch.cat([torch.ops.quantized.linear_dynamic(x, piece, False) for piece in pieces], dim=-1)


def _int8_linear_op(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return _linear_dynamic(x, _PACKED[layer])


# A plain Library op, not torch.library.custom_op: that one's Python wrapper cost ~50 µs a call against
# ~6 here, and a demo decode step makes 169 of them (docs/bench).
attention.LIBRARY.define("int8_linear(Tensor x, int layer, int out_features) -> Tensor")
attention.LIBRARY.impl("int8_linear", _int8_linear_op, "CPU")
attention.LIBRARY.impl("int8_linear", lambda x, layer, out_features: x.new_empty(*x.shape[:-1], out_features), "Meta")


class Int8Linear(torch.nn.Module):
    """y = x W^T + b with W as int8 per output channel. State: qdata [out, in] int8, scale [out] float32.
    Served by llmqtt's AVX2 kernel (`blocked`, `sums`: kernels.Blocked) or by fbgemm's packed pieces."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qdata", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features))
        self.bias = torch.nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._packed = None
        self.register_buffer("blocked", None, persistent=False)  # the AVX2 kernel's copy, once adopted
        self.register_buffer("sums", None, persistent=False)

    @classmethod
    def serving(cls, packed: list | kernels.Blocked, in_features: int, out_features: int) -> Int8Linear:
        """A Linear served from its packed copy alone (a fused product: no rows are read)."""
        with torch.device("meta"):
            linear = cls(in_features, out_features, False)
        linear.scale = torch.empty(0)
        linear.adopt(packed)
        return linear

    def adopt(self, packed: list | kernels.Blocked, keep_rows: bool = False) -> None:
        """Serve from `packed`: the AVX2 kernel's copy (quantstore.block_rows) or fbgemm's pieces (pack_rows);
        drop our int8 values unless rows are still read (the output head, whose rows the embedding and
        classification use)."""
        self._packed = packed
        if isinstance(packed, kernels.Blocked):
            self.blocked, self.sums, self.scale = packed.weight, packed.sums, packed.scale
            if packed.bias is not None:
                self.bias = torch.nn.Parameter(packed.bias, requires_grad=False)
        else:
            self._key = next(_NEXT_KEY)
            _PACKED[self._key] = packed
        if not keep_rows:
            self.qdata = torch.empty(0, dtype=torch.int8)

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] float32 -> [..., out]; either kernel quantizes x to uint8 per call (full 8 bits)
        if self.blocked is not None:
            return kernels.product(x, self.blocked, self.scale, self.sums, self.bias)
        if torch.compiler.is_compiling():
            return torch.ops.llmqtt.int8_linear(x, self._key, self.out_features)
        return _linear_dynamic(x, self._packed)

    def __del__(self):
        _PACKED.pop(getattr(self, "_key", None), None)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float rows of W for `ids`: [K] -> [K, in]."""
        return self.qdata[ids].float() * self.scale[ids, None]


class RowEmbedding(torch.nn.Module):
    """An embedding read from a quantized table's rows: only the looked-up rows are turned into floats."""

    def __init__(self, table: Int8Linear):
        super().__init__()
        self.table = table

    @property
    def weight(self) -> torch.Tensor:  # transformers asks for its dtype/device only
        return self.table.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids.reshape(-1)).reshape(*ids.shape, -1)  # ids: [B, S] -> [B, S, hidden]


class Int4Linear(torch.nn.Module):
    """KleidiAI int4 (groups of 32) x int8 dynamic activations. State: packed uint8 blob (kernel-specific)
    and, for the output head, the int4 values and scales so rows can be read back."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("qdata", torch.empty(0, dtype=torch.int8))  # [out, in] int4 values, head only
        self.register_buffer("scale", torch.empty(0))  # [out, in / 32], head only
        self.bias = None  # folded into `packed`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [B*S, in]
        y = torch.ops.aten._dyn_quant_matmul_4bit(rows, self.packed, INT4_GROUP, self.in_features,
                                                  self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        groups = self.qdata[ids].float().unflatten(-1, (-1, INT4_GROUP))  # [K, in/32, 32]
        return (groups * self.scale[ids].float()[..., None]).flatten(-2)  # [K, in]


def head_rows(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [K, hidden], bias [K] or None) of the output head's rows `ids`, as float32."""
    head = model.get_output_embeddings()
    if isinstance(head, (Int8Linear, Int4Linear)):
        return head.rows(ids), None
    weight = head.weight[ids].detach().clone()
    return weight, head.bias[ids].detach().clone() if head.bias is not None else None


# --------------------------------------------------------------------------- quantizing (first start)


def quantize_state(model: torch.nn.Module, scheme: str) -> dict[str, torch.Tensor]:
    """The quantized model's state from a float32 model, Linear by Linear (the float model stays as is)."""
    state = {name: t.detach() for name, t in model.state_dict().items()}
    for name, linear in _linears(model):
        del state[f"{name}.weight"]
        if scheme == "int8":
            state.update({f"{name}.{k}": v for k, v in _int8(linear.weight).items()})
        else:
            state.update({f"{name}.{k}": v for k, v in _int4(linear, keep_rows=_is_head(model, linear)).items()})
            state.pop(f"{name}.bias", None)
    embedding = model.get_input_embeddings()
    if _tied(model):
        state.pop("model.embed_tokens.weight", None)  # read from the head's rows
    else:  # an untied model's own table, int8 under either scheme: read by rows, 1 byte instead of 4
        del state["model.embed_tokens.weight"]
        state.update({f"model.embed_tokens.table.{k}": v for k, v in _int8(embedding.weight).items()})
    return {k: v.contiguous() for k, v in state.items()}


def _int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    q = Int8Tensor.from_hp(weight.detach().float(), granularity=PerRow(), reduce_range=True)  # [-64, 63]
    return {"qdata": q.qdata, "scale": q.scale.reshape(-1).float()}


def _int4(linear: torch.nn.Linear, keep_rows: bool) -> dict[str, torch.Tensor]:
    """KleidiAI-packed int4 via torchao (aarch64 only: packing needs torch.backends.kleidiai)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_
    from torchao.quantization.quant_primitives import MappingType

    unpacked = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    unpacked.load_state_dict(linear.state_dict())
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(INT4_GROUP),
                                                   weight_mapping_type=MappingType.SYMMETRIC)
    quantize_(unpacked, config)  # IntxUnpackedToInt8Tensor: the int4 values and scales, any CPU
    values = unpacked.weight
    packed = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    packed.load_state_dict(linear.state_dict())
    quantize_(packed, Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(INT4_GROUP), weight_mapping_type=MappingType.SYMMETRIC,
        intx_packing_format="opaque_aten_kleidiai"))
    state = {"packed": packed.weight.packed_weights}
    if keep_rows:
        state.update(qdata=values.qdata, scale=values.scale.float())
    return state


# --------------------------------------------------------------------------- loading (every start)


def build(model_dir: Path, weights: MappedFile | dict[str, torch.Tensor], scheme: str,
          early: EarlyPacking | None = None) -> torch.nn.Module:
    """The model from its quantized weights, never materialising a float32 Linear: the skeleton is built on
    the meta device and the stored tensors are assigned into it.

    From the mapped file (every start but a failed save) each Linear's int8 values are read once, packed
    by fbgemm and released; the tables read by rows (embedding, head) stay mapped, read as rows are looked
    up; norms, biases and scales are copied (a few MB). fbgemm packs on a thread of its own (~3 s for the
    demo), started by the caller before its imports (`early`, for `weights`) or here, beside the model code's
    import in `_skeleton`."""
    source = weights if isinstance(weights, MappedFile) else _InMemory(weights)
    if early is None and scheme == "int8":
        early = EarlyPacking(source, fuses(model_dir))
    model, swapped = _skeleton(model_dir, source, scheme)
    packed = early.packed.result() if early else {}
    groups = fused_groups([name for name, _ in swapped]) if early and early.fuse else {}  # packed as one product
    fused.install(model, groups, lambda name, in_features, out_features:
                  Int8Linear.serving(packed.pop(name), in_features, out_features))
    in_groups = {member for members in groups.values() for member in members}
    head = model.get_output_embeddings()
    for name, module in swapped:
        if isinstance(module, Int8Linear) and name not in in_groups:
            module.adopt(packed.pop(name), keep_rows=module is head)
    model._llmqtt_weights = source  # the mapping outlives every view of it
    model._llmqtt_int8_kernel = early.kernel if early else None
    if early:
        log.info("int8 products on %s%s", early.kernel, f" ({early.why_fbgemm})" if early.why_fbgemm else "")
    hand_freed_blocks_back(trim=True)
    return model.eval().requires_grad_(False)


def _skeleton(model_dir: Path, source: MappedFile | _InMemory, scheme: str) -> tuple[torch.nn.Module, list]:
    """The model on the meta device with quantized layers swapped in and the stored tensors assigned:
    (model, [(name, quantized Linear)])."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention.register())
    layer = Int8Linear if scheme == "int8" else Int4Linear
    swapped = []
    for name, linear in _linears(model):
        parent, _, child = name.rpartition(".")
        swapped.append((name, layer(linear.in_features, linear.out_features,
                                    linear.bias is not None and scheme == "int8")))
        setattr(model.get_submodule(parent) if parent else model, child, swapped[-1][1])
    head, tied = model.get_output_embeddings(), _tied(model)
    if not tied:  # its own int8 table, read by rows only
        model.set_input_embeddings(RowEmbedding(Int8Linear(config.hidden_size, config.vocab_size, False)))
    # int values stay views of the file (packed then released, or read by rows); the small rest is copied
    state = {name: source.view(name) if name.endswith(".qdata") else source.copy(name) for name in source.keys()}
    if scheme == "int4":  # the packed blob's size is the kernel's, known from the file only: take its shapes
        for name, module in swapped:
            for key in ("packed", "qdata", "scale"):
                if f"{name}.{key}" in state:
                    module.register_buffer(key, torch.empty_like(state[f"{name}.{key}"], device="meta"))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    if tied:  # the head's rows are the embedding (one copy, as in the float model)
        model.set_input_embeddings(RowEmbedding(head))
        missing = [k for k in missing if k != "model.embed_tokens.weight"]
    if scheme == "int4":  # only the head keeps its int4 values beside the packed blob
        missing = [k for k in missing if not k.endswith((".qdata", ".scale"))]
    if missing or unexpected:
        raise ValueError(f"quantized state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    _rebuild_meta_buffers(model)
    return model, swapped


class _InMemory:
    """A state dict with MappedFile's reading interface (the first start, when the file could not be saved)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def view(self, name: str) -> torch.Tensor:
        return self.state[name]

    copy = view

    def release(self, name: str, first_row: int = 0, stop_row: int | None = None) -> None:
        pass


def decode_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode step of a quantized model reads: every packed Linear (one byte a weight for
    int8), not the tables read by rows."""
    return _packed_int8_bytes(model) + sum(m.packed.numel() for m in model.modules() if isinstance(m, Int4Linear))


def _packed_int8_bytes(model: torch.nn.Module, fbgemm_only: bool = False) -> int:
    """The packed int8 copies (fbgemm's alone, which are no tensors of the module): one byte a weight."""
    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, Int8Linear) and m.packed and not (fbgemm_only and m.blocked is not None))


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights held in memory: fbgemm's packed copies and every tensor (the AVX2 kernel's blocked
    copies among them) that is not a view of the mapped file (the row tables stay on disk but for the rows read)."""
    weights = getattr(model, "_llmqtt_weights", None)
    mapped = {id(m.qdata) for m in model.modules() if isinstance(m, Int8Linear)} if isinstance(weights, MappedFile) \
        else set()
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in mapped}
    owned = sum(t.numel() * t.element_size() for t in tensors.values())
    return owned + _packed_int8_bytes(model, fbgemm_only=True)


def _rebuild_meta_buffers(model: torch.nn.Module) -> None:
    """Buffers computed in __init__ rather than stored (rotary inv_freq) are still on meta: build them again."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "config") or "rotary" not in type(module).__name__.lower():
                raise ValueError(f"{name}: buffers not stored in the quantized file")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, type(module)(config=module.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"quantized file lacks {left[:5]}")


def _linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]


def _is_head(model: torch.nn.Module, linear: torch.nn.Module) -> bool:
    return linear is model.get_output_embeddings()


def _tied(model: torch.nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


# --------------------------------------------------------------------------- the store


def load_quantized(model_dir: Path, scheme: str, store: QuantizedStore,
                   early: EarlyPacking | None = None) -> tuple[torch.nn.Module, bool]:
    """(model, whether it came from the store). The first start quantizes from float32 and stores it.
    `early`: the stored file's packing, already started (EarlyPacking.start)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} (one of {', '.join(SCHEMES)})")
    if scheme == "int4" and not torch.backends.kleidiai.is_available():
        raise RuntimeError("quantize: int4 needs torch's KleidiAI kernels (aarch64 builds of torch); "
                           "use int8 or auto on this CPU")
    if scheme == "int8" and not has_fbgemm():
        # torch's aarch64 build packs int8 weights with fbgemm's x86 code and fails ('unknown architecure',
        # seen under qemu as a Cortex-A76, 2026-11-29): say so before anything is quantized
        raise RuntimeError("quantize: int8 needs fbgemm (x86 CPUs); use auto (int4 on a Raspberry Pi 5) or none")
    if early is not None:
        return build(model_dir, early.source, scheme, early), True
    stored = store.load(model_dir, scheme)
    if stored is not None:
        return build(model_dir, stored, scheme), True
    if (Path(model_dir) / DROPPED).is_file() and not any(Path(model_dir).glob("*.safetensors")):
        raise float32_dropped_error(model_dir)
    state = quantize_from_float(model_dir, scheme)
    saved = store.save(model_dir, scheme, state)
    if saved is not None:  # built from the file, as every later start: the in-memory copy goes
        del state
        return build(model_dir, MappedFile(saved), scheme), False
    return build(model_dir, state, scheme), False


def quantize_from_float(model_dir: Path, scheme: str) -> dict[str, torch.Tensor]:
    """Load the float32 checkpoint (memory-mapped), quantize, and let the float model go."""
    from transformers import AutoModelForCausalLM

    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("quantizing needs torchao (pip install 'torchao==0.18.0'), "
                           "or set model.quantize: none for float32") from exc
    started = time.perf_counter()
    # Quantizing frees a temporary of 1-17 MB per weight: in glibc's heap (its mmap threshold rises after
    # the first large free), these stayed, and a first start's peak varied from 4.7 to 7.1 GB between runs
    # of the same code (2 GB more anonymous memory at the end of quantize_state, 2026-11-29).
    hand_freed_blocks_back()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        state = quantize_state(model, scheme)
    log.info("quantized %s to %s in %.1fs (once; kept in the model cache)", model_dir.name, scheme,
             time.perf_counter() - started)
    return state
