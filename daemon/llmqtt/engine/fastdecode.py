"""Decode's matrix-vector products as a compiled multiply-and-sum, read at memory speed.

Decoding one token multiplies one row through every Linear layer: a matrix-vector product per weight
matrix, so decode speed is how fast those products read the weights. torch's fp32 F.linear (MKL sgemv)
reads them at ~40 % of the memory bandwidth on the bench machine; the same product written as
`(weight * x).sum(-1)` and compiled by inductor into one fused loop reads them at ~90 % (docs/bench).

`wrap(model)` wraps every fp32 Linear. A one-row input goes to the compiled kernel once it is ready,
anything else (prefill, batches) to F.linear. The kernels compile on a background thread (inductor needs a
C compiler; its cache makes later starts quick), so start-up never waits for them: until they are ready,
or if compiling fails, decode runs on torch's own kernels with the same results.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

log = logging.getLogger(__name__)


def _gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (weight * x).sum(-1)  # weight [out, in], x [in] -> [out]; compiled into one loop, no temporary


class Kernels:
    """The compiled kernel and whether it may be used yet (`ready`), shared by every wrapped layer."""

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = weights  # one per distinct weight shape
        self.ready = threading.Event()
        self.failed: str | None = None
        self.compile_s: float | None = None
        self._compiled = None
        self._thread: threading.Thread | None = None

    def __call__(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._compiled(weight, x)

    def start(self) -> None:
        """Compile on a daemon thread (once); requests keep running on torch's kernels meanwhile."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.compile, name="fast-decode-compile", daemon=True)
            self._thread.start()

    def compile(self) -> None:
        """Compile for each weight shape by calling once, under inference_mode as requests run, and check
        each result against F.linear before any request may use it."""
        started = time.perf_counter()
        try:
            import torch._dynamo

            from .decode import one_compile_worker

            one_compile_worker()
            # One specialised kernel per weight shape; a model has a handful (a 0.5B Qwen2: five).
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
            self._compiled = torch.compile(_gemv, dynamic=False, fullgraph=True)
            with torch.inference_mode():
                for weight in self.weights:
                    x = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0))
                    expected = torch.nn.functional.linear(x, weight)
                    if not torch.allclose(self._compiled(weight, x), expected, rtol=1e-4, atol=1e-4):
                        raise RuntimeError(f"compiled kernel disagrees with F.linear for {tuple(weight.shape)}")
        except Exception as exc:  # no compiler, unsupported platform...: keep torch's kernels
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("fast decode kernels unavailable, decoding with torch's own (%s)", self.failed)
            return
        self.compile_s = time.perf_counter() - started
        self.ready.set()
        log.info("fast decode kernels ready (%d shapes, %.1fs)", len(self.weights), self.compile_s)

    def wait(self, timeout: float | None = None) -> None:
        """Until compiling has ended (ready or failed), if it was started."""
        if self._thread is not None:
            self._thread.join(timeout)

    def state(self) -> str:
        return "ready" if self.ready.is_set() else "failed" if self.failed else "pending"


class DecodeLinear(torch.nn.Module):
    """A Linear whose one-row products use the compiled kernel once it is ready."""

    def __init__(self, linear: torch.nn.Linear, kernels: Kernels):
        super().__init__()
        self.linear, self.kernels = linear, kernels
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or not self.kernels.ready.is_set():
            return self.linear(x)
        y = self.kernels(self.linear.weight, x.reshape(-1)).reshape(*x.shape[:-1], self.out_features)
        return y + self.linear.bias if self.linear.bias is not None else y


def wrap(model: torch.nn.Module) -> Kernels:
    """Wrap every fp32 Linear of `model`; call `start()` (or `compile()`) on the result to build the kernels."""
    linears = [(module, name, child) for module in list(model.modules())
               for name, child in module.named_children()
               if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32]
    shapes = {tuple(child.weight.shape): child.weight for _, _, child in linears}
    kernels = Kernels(list(shapes.values()))
    for module, name, child in linears:
        setattr(module, name, DecodeLinear(child, kernels))
    return kernels
