"""A learned head: a linear classifier over the model's hidden states, fitted from a task owner's labels.

The prompt's label logits use only what the model says at the answer cue. A small linear map over the
hidden states of a middle layer (where sentiment, topic and urgency separate best in small models) reads
more of what the model knows: on the bench, 92-94 % instead of 90.6 % (English sentiment). Serving it costs
one matrix-vector product instead of the output head's label rows, and the forward pass can stop at the
deepest layer the head reads.

A head file is a small safetensors next to its task file (`sentiment.yaml` -> `sentiment.head.safetensors`):
the weight and bias (feature standardisation and temperature already folded in) and JSON metadata: which
model weights it was fitted on (fingerprint), which layers and pooling, the label order, how many rows and
the cross-validated accuracy.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .headfile import META_KEY

log = logging.getLogger(__name__)

FORMAT = 1
Pool = str  # "cue": the state at the answer cue (last token); "mean": averaged over the text and the cue


class HeadFileError(ValueError):
    """A head file that cannot be read (torn, foreign or from a newer llmqtt)."""


@dataclass(frozen=True)
class Features:
    """Which hidden states a head reads: decoder-layer outputs (1 = first layer), each pooled one way,
    concatenated in this order."""

    parts: tuple[tuple[int, Pool], ...]

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.parts})

    def describe(self) -> str:
        return " + ".join(f"layer {layer} {pool}" for layer, pool in self.parts)

    def pick(self, states: dict[tuple[int, Pool], torch.Tensor]) -> torch.Tensor:
        """[B, F] from per-(layer, pool) states [B, H]."""
        return torch.cat([states[part] for part in self.parts], dim=-1)


@dataclass
class Head:
    labels: list[str]
    features: Features
    weight: torch.Tensor  # [labels, F], standardisation and temperature folded in
    bias: torch.Tensor  # [labels]
    meta: dict = field(default_factory=dict)  # fingerprint, quantization, rows, cv_accuracy, temperature, C, ...

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated label probabilities [B, labels] from features [B, F]."""
        return torch.softmax(torch.nn.functional.linear(x.float(), self.weight, self.bias), dim=-1)

    def save(self, path: Path) -> None:
        meta = {**self.meta, "format": FORMAT, "labels": self.labels, "features": [list(p) for p in self.features.parts]}
        tmp = path.with_suffix(".tmp")
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, tmp,
                  metadata={META_KEY: json.dumps(meta, ensure_ascii=False)})
        tmp.chmod(0o644)  # readable by the daemon's service user, like the task file beside it
        tmp.replace(path)


def load_head(path: Path) -> Head:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            weight, bias = f.get_tensor("weight").float(), f.get_tensor("bias").float()
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this llmqtt reads {FORMAT}")
        features = Features(tuple((int(layer), str(pool)) for layer, pool in meta["features"]))
        labels = list(meta["labels"])
        if weight.shape[0] != len(labels) or bias.shape != (len(labels),):
            raise ValueError("weight shape does not match the labels")
    except Exception as exc:
        raise HeadFileError(f"{path}: not a usable head file ({exc})") from None
    return Head(labels, features, weight, bias, meta)


def mismatch(head: Head, weights: str, labels: Sequence[str], num_layers: int, prompt: str) -> str | None:
    """Why `head` cannot serve this model and task prompt, or None if it can."""
    if head.meta.get("fingerprint") != weights:
        return (f"it was fitted on other model weights ({head.meta.get('model', '?')}, fingerprint "
                f"{head.meta.get('fingerprint')}; this model's is {weights}); re-fit with `llmqtt fit`")
    if head.meta.get("prompt") != prompt:
        return "the task's prompt changed since the head was fitted (its hidden states differ); re-fit with `llmqtt fit`"
    if sorted(head.labels) != sorted(labels):
        return f"its labels {head.labels} are not the task's {list(labels)}; re-fit with `llmqtt fit`"
    if max(head.features.layers) > num_layers:
        return f"it reads layer {max(head.features.layers)}, the model has {num_layers}"
    return None


# -- fitting -------------------------------------------------------------------------------------------

# Inverse L2 strength per row, on standardised features. The low end is for many rows of a hard distinction:
# on the demo's sentiment rows (896-wide states, both pools) cross-validation picked the grid's strongest
# regularisation whenever it was offered (docs/accuracy.md).
C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
C_FOR_FEATURES = 0.003  # features are compared at this C first; then C is chosen for the winner
FOLDS = 5


@dataclass
class FitResult:
    head: Head
    cv_accuracy: float
    candidates: list[tuple[str, float, float]]  # (features, C, cv accuracy) for every tried combination


def logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, c: float, iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an L2 penalty |W|^2 / (2 C n), by L-BFGS (float64).

    x: [N, F] standardised, y: [N] class ids. Returns (weight [classes, F], bias [classes]).
    """
    x, n = x.double(), len(y)
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ w.T + b, y) + (w * w).sum() / (2 * c * n)
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return w.detach(), b.detach()


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The T minimising held-out log loss of softmax(logits / T): one number, by a 1-D search on log T."""
    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / t, y))

    lo, hi = math.log(0.05), math.log(20.0)
    for _ in range(60):  # golden-section search; NLL is unimodal in log T
        a, b = hi - (hi - lo) * 0.618, lo + (hi - lo) * 0.618
        if nll(math.exp(a)) < nll(math.exp(b)):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def folds(y: torch.Tensor, k: int, seed: int = 0) -> list[torch.Tensor]:
    """Stratified fold index per row [N]: each label's rows dealt round-robin after a seeded shuffle."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    for label in y.unique():
        rows = (y == label).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        fold[rows] = torch.arange(len(rows)) % k
    return [fold == i for i in range(k)]


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0) + 1e-4


def cross_validate(x: torch.Tensor, y: torch.Tensor, classes: int, c: float, held_out: list[torch.Tensor]) -> torch.Tensor:
    """Out-of-fold logits [N, classes]: each fold scored by a model fitted on the other folds."""
    out = torch.zeros(len(y), classes, dtype=torch.float64)
    for test in held_out:
        mu, sd = _standardise(x[~test])
        w, b = logistic_regression((x[~test] - mu) / sd, y[~test], classes, c)
        out[test] = ((x[test] - mu) / sd).double() @ w.T + b
    return out


def fit_head(states: dict[tuple[int, Pool], torch.Tensor], y: torch.Tensor, labels: list[str],
             candidates: Sequence[Features], meta: dict, c_grid: Sequence[float] = C_GRID,
             on_step: Callable[[str], None] = lambda s: None) -> FitResult:
    """Choose features and C by stratified cross-validation, fit the temperature on the out-of-fold logits,
    refit on every row. `states` holds [N, H] per (layer, pool); y [N] indexes `labels`.

    Two stages, so the cost grows with features + C values, not their product (each fit of a few thousand
    rows takes seconds on a Pi-class CPU): the candidate features at C_FOR_FEATURES, then every C for the
    best of them."""
    k = min(FOLDS, int(torch.bincount(y, minlength=len(labels)).min()))
    if k < 2:
        raise ValueError("every label needs at least 2 rows to cross-validate")
    held_out = folds(y, k)
    tried, best = [], None

    def attempt(features: Features, c: float) -> None:
        nonlocal best
        logits = cross_validate(features.pick(states).float(), y, len(labels), c, held_out)
        acc = float((logits.argmax(-1) == y).double().mean())
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        tried.append((features.describe(), c, acc))
        on_step(f"{features.describe()}, C={c}: {acc:.3f}")
        if best is None or (acc, -loss) > (best[0], -best[1]):
            best = (acc, loss, features, c, logits)

    for features in candidates:
        attempt(features, C_FOR_FEATURES if C_FOR_FEATURES in c_grid else c_grid[len(c_grid) // 2])
    chosen, first_c = best[2], best[3]
    for c in c_grid:
        if c != first_c:
            attempt(chosen, c)
    acc, _, features, c, oof = best
    temperature = fit_temperature(oof.float(), y)
    x = features.pick(states).float()
    mu, sd = _standardise(x)
    w, b = logistic_regression((x - mu) / sd, y, len(labels), c)
    # Fold standardisation and temperature into one affine map: logits = (x - mu) / sd @ w.T / T + b / T.
    weight = (w / sd.double() / temperature).float()
    bias = ((b - (w * (mu / sd).double()).sum(-1)) / temperature).float()
    meta = {**meta, "rows": int(len(y)), "cv_accuracy": round(acc, 4), "cv_folds": k, "C": c,
            "temperature": round(temperature, 4)}
    return FitResult(Head(labels, features, weight, bias, meta), acc, tried)
