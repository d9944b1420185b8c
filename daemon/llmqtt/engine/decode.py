"""One token at a time over a static KV cache, compiled whole: gpt-fast's `decode_one_token`.

An eager transformers step runs ~300 small Python-dispatched ops per token for a 24-layer model; compiled
once into one graph over a cache whose shapes never change, Python runs once per token. The cache holds
`max_context` positions per layer, allocated once (a 0.5B Qwen2 at 2048 positions: 24 layers x 2 x
2 kv heads x 64 x 2048 x 4 bytes = 50 MB). One such cache is shared: the compiled graph is specialised
to it, and a new cache object would compile again. A generation that starts while the shared cache is in
use gets a cache of its own (kept for the next one afterwards), decoded eagerly: batch.py steps it together
with the others.

    with decoder.cache(prefix) as cache:               # the static cache, prefix KV copied in: [1, kv, T, d]
        logits = decoder.prefill(ids, cache, position) # ids: [1, S] eager (compute-bound anyway) -> [V]
        logits = decoder.step(token, cache, position)  # one token: compiled once ready, else eager -> [V]

The compiled step is built on a background thread after the daemon is ready (`start()`) and checked
against the eager step before any request uses it; if compiling fails, or the two disagree, decode stays
eager with the same results. It is compiled ahead of time (torch's `aot_compile`) and kept on disk
(`saved`), so a restart loads it instead of tracing the model again: tracing holds the GIL for seconds, and
each of an eager token's ~300 ops waits for it, so a chat during that window decoded at ~2 tok/s.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import torch
from transformers import StaticCache

from .prefixstore import Layers

log = logging.getLogger(__name__)

CHECK_STEPS = 8  # tokens on which the compiled step must give eager's logits before it is used
CHECK_TOLERANCE = 0.05  # largest logit difference allowed, as a fraction of the largest logit


def decode_one_token(model: torch.nn.Module, token: torch.Tensor, position: torch.Tensor,
                     cache: StaticCache) -> torch.Tensor:
    """token: [1, 1] at position [1, 1] -> float logits of the next token: [V]. Writes one cache position."""
    out = model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True)
    return out.logits[0, -1].float()


def one_compile_worker() -> None:
    """Compile with one worker process instead of one per core. The compile runs after READY, beside
    requests: inductor's default pool (a process per core, each importing torch) held 0.42 GB at most in
    child processes compiling the tiny test model's step on 2 cores, against 0.28 GB with one (gcc's own
    share included; 2026-11-29), and left the cores to the requests. On a 4-core Pi 5 the pool would be 4."""
    import torch._inductor.config as inductor

    inductor.compile_threads = 1


def _no_guards(guards: list) -> list[bool]:
    """Keep none of dynamo's guards. The step is only ever called by `StaticDecoder.step` with the same
    model, the shared cache and [1, 1] int64 tensors, and `_check` compares it with eager after every build
    or load. Checking the model's module guards cost ~0.85 ms of a ~40 ms token (TorchDynamo Cache Lookup,
    demo model, 2026-11-29), and some guards (closures in transformers' mask code) cannot be saved to disk."""
    return [False] * len(guards)


# Inductor's C++ wrapper calls the step's ~200 kernels and ops from C++ instead of Python: a demo step (int8,
# position ~200) took 33.3 instead of 36.2 ms (medians of 3 interleaved processes x 150 steps, 2026-11-29).
# Tried first; the Python wrapper if the C++ one cannot be built here. The slug names the file it is kept in.
COMPILE_OPTIONS = {"C++ wrapper": {"guard_filter_fn": _no_guards, "cpp_wrapper": True},
                   "Python wrapper": {"guard_filter_fn": _no_guards}}
SLUGS = {"C++ wrapper": "cpp", "Python wrapper": "python"}
KEEP_STEPS = 4  # most recently used steps kept in the directory (3.7 MB each for the demo): a few models or configs


def saved_step_stem(directory: Path, model_fingerprint: str, max_context: int, int8_kernel: str | None) -> Path:
    """Where the compiled step of this exact build is kept: its name hashes the model build
    (prefixstore.model_fingerprint: files, dtype, scheme, torch and transformers versions), the cache's
    length, the int8 product it calls, Python, and llmqtt's engine sources, so any change compiles again.
    (Inductor's own disk cache holds the built kernels the file refers to: without it, loading rebuilds them.)"""
    sources = sorted(p for p in Path(__file__).parent.iterdir() if p.suffix in (".py", ".cpp"))
    digest = hashlib.sha256()
    for part in (model_fingerprint, str(max_context), str(int8_kernel), sys.version, platform.machine()):
        digest.update(part.encode() + b"\0")
    for path in sources:
        digest.update(path.read_bytes())
    return directory / digest.hexdigest()[:32]


# Python's switch interval while the step is built: an eager token's ~300 ops each give the GIL back and wait
# up to this long for it while dynamo traces on the build's thread. A first start's chats during the compile
# decoded at 0.6 tok/s with the default 5 ms, at 1.8-3.4 tok/s with 0.5 ms (demo, 16-token chats, 2026-11-29).
BUILD_SWITCH_INTERVAL_S = 0.0005


@contextlib.contextmanager
def short_gil_turns() -> Iterator[None]:
    """The whole process's switch interval at BUILD_SWITCH_INTERVAL_S meanwhile (it is global), then back."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, BUILD_SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _failure(what: str, exc: Exception) -> str:
    """One line for the log and `StaticDecoder.failed`."""
    return f"{what}: {type(exc).__name__}: {exc}".splitlines()[0][:300]


class StaticDecoder:
    """The compiled step for one model, and whether requests may use it yet (`ready`)."""

    def __init__(self, model: torch.nn.Module, max_context: int, saved: Path | None = None):
        """`saved`: where the compiled step is kept between starts (a name per model build, see
        `saved_step_stem`); None compiles at every start and keeps nothing."""
        self.model, self.max_context, self.saved = model, max_context, saved
        self.ready = threading.Event()
        self.failed: str | None = None
        self.compile_s: float | None = None
        self.wrapper: str | None = None  # the COMPILE_OPTIONS entry that compiled
        self.check_error: float | None = None  # largest logit difference compiled vs eager, when checked
        self.from_disk = False  # the step was loaded from `saved`, not compiled by this process
        self._compiled = None
        self._shared = self._new_cache()
        self._spare: list[StaticCache] = []  # private caches of generations that ran beside the shared one
        self._in_use = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def cache(self, prefix: Layers) -> Iterator[StaticCache]:
        """A static cache holding `prefix` ([1, kv_heads, P, head_dim] per layer) at positions 0..P-1 for
        one generation: the shared one (the compiled step's), or a private one if that is in use."""
        shared = self._in_use.acquire(blocking=False)
        cache = self._shared if shared else (self._spare.pop() if self._spare else self._new_cache())
        try:
            yield self._reset(cache, prefix)
        finally:
            if shared:
                self._in_use.release()
            else:  # kept for the next generation beside the shared one: allocating 48 MB again costs a prefill's time
                self._spare.append(cache)

    def _new_cache(self) -> StaticCache:
        config = self.model.config
        cache = StaticCache(config=config, max_cache_len=self.max_context)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = getattr(self.model, "dtype", torch.float32)  # the KV cache's: the model's compute dtype
        cache.early_initialization(1, config.num_key_value_heads, head_dim, dtype, torch.device("cpu"))
        return cache

    @staticmethod
    def _reset(cache: StaticCache, prefix: Layers) -> StaticCache:
        for i, layer in enumerate(cache.layers):  # stale positions beyond are masked out, then overwritten
            layer.cumulative_length.zero_()
            if prefix:
                cache.update(prefix[i][0], prefix[i][1], i)
        return cache

    def prefill(self, ids: torch.Tensor, cache: StaticCache, position: int) -> torch.Tensor:
        """ids: [1, S] at positions position..position+S-1 -> float logits of the last one: [V]."""
        positions = torch.arange(position, position + ids.shape[1]).unsqueeze(0)  # [1, S]
        with torch.inference_mode():
            out = self.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[0, -1].float()

    def step(self, token: int, cache: StaticCache, position: int) -> torch.Tensor:
        """The next token's logits [V] after `token` at `position`."""
        compiled = self.ready.is_set() and cache is self._shared  # the graph is specialised to that cache
        step = self._compiled if compiled else decode_one_token
        with torch.inference_mode():
            return step(self.model, torch.tensor([[token]]), torch.tensor([[position]]), cache)

    def start(self) -> None:
        """Compile on a daemon thread (once); requests decode eagerly meanwhile."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.compile, name="decode-compile", daemon=True)
            self._thread.start()

    def compile(self) -> None:
        """Load the step kept on disk, or compile it (and keep it); check it; then requests use it."""
        started = time.perf_counter()
        one_compile_worker()
        failures = []
        with short_gil_turns():
            loaded = self._load_saved(failures)
            built = loaded or self._compile_one(failures)
        if built is None:
            self.failed = "; ".join(failures)
            log.warning("compiled decode unavailable, decoding eagerly (%s)", self.failed)
            return
        self._compiled, self.wrapper = built
        self.from_disk = loaded is not None
        self.compile_s = time.perf_counter() - started
        self.ready.set()
        log.info("compiled decode ready (%.1fs, %s%s)", self.compile_s, self.wrapper,
                 ", loaded from disk" if self.from_disk else "")

    def _load_saved(self, failures: list[str]):
        """(step, wrapper) from the file a start before this one kept, checked; None if there is none or it
        fails (then it is removed and the step compiled again)."""
        for wrapper, slug in SLUGS.items():
            path = self._saved_path(slug)
            if path is None or not path.is_file():
                continue
            try:
                with open(path, "rb") as file:  # a pickle, trusted as inductor's own .so files beside it are
                    step = torch.compiler.load_compiled_function(file)
                path.touch()  # recently used: kept when other builds' steps are removed
                with self._in_use:
                    self._check(step)
                return step, wrapper
            except Exception as exc:  # torch or the model code changed under the same name, a torn file
                failures.append(_failure(f"saved {wrapper}", exc))
                log.info("not using the compiled decode kept in %s (%s); compiling again", path, failures[-1])
                path.unlink(missing_ok=True)
        return None

    def _compile_one(self, failures: list[str]):
        """(step, wrapper) compiled with the first COMPILE_OPTIONS entry that builds and passes the check,
        kept on disk for the next start; None if none does."""
        for wrapper, options in COMPILE_OPTIONS.items():
            try:
                with self._in_use, torch.inference_mode():
                    example = (self.model, torch.tensor([[1]]), torch.tensor([[0]]), self._reset(self._shared, []))
                    # a copy of the options: torch.compile pops guard_filter_fn out of the dict it is given
                    step = torch.compile(decode_one_token, fullgraph=True, dynamic=False,
                                         options=dict(options)).aot_compile((example, {}))
                    self._check(step)
            except Exception as exc:  # no compiler, an op inductor cannot take, a mismatch: the next, then eager
                failures.append(_failure(wrapper, exc))
                log.info("compiled decode with %s failed (%s)", wrapper, failures[-1])
                continue
            self._keep(step, SLUGS[wrapper])
            return step, wrapper
        return None

    def _keep(self, step, slug: str) -> None:
        """Best effort, like the prefix store: a read-only or full disk costs the next start a compile."""
        path = self._saved_path(slug)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            step.save_compiled_function(str(path))  # written beside it, then renamed: never a torn file
            for stale in sorted(path.parent.glob("*.step"), key=lambda p: p.stat().st_mtime)[:-KEEP_STEPS]:
                stale.unlink(missing_ok=True)  # other builds' (an engine change renames every step)
        except Exception as exc:
            log.warning("could not keep the compiled decode on disk (%s); the next start compiles it again", exc)

    def _saved_path(self, slug: str) -> Path | None:
        return None if self.saved is None else self.saved.with_name(f"{self.saved.name}.{slug}.step")

    def _check(self, compiled) -> None:
        """The eager step picks CHECK_STEPS greedy tokens; the compiled step, fed the very same tokens
        (teacher-forced), must give logits within CHECK_TOLERANCE of the largest, and the same pick wherever
        eager's is clear (its top two further apart than twice the largest difference).

        Not the same free-running greedy tokens: from token 1 the demo model soon emits end-of-text and
        near-tied junk, and int8 quantizes activations per call, so a sum inductor orders differently moves
        some to the next int8 step: on 2026-11-29 a start saw the 8th token differ with logits 0.51 apart
        (largest logit ~20), and the daemon decoded eagerly at 20.7 instead of ~25 tok/s. float32 differs
        by ~1e-4."""
        inputs, eager, ours = [1], [], []  # not 0: often the padding token, whose embedding is all zeros
        with torch.inference_mode():  # under the lock: no request uses the cache meanwhile
            cache = self._reset(self._shared, [])
            for position in range(CHECK_STEPS):
                eager.append(decode_one_token(self.model, torch.tensor([[inputs[-1]]]), torch.tensor([[position]]), cache))
                inputs.append(int(eager[-1].argmax()))
            cache = self._reset(self._shared, [])
            for position, token in enumerate(inputs[:-1]):
                ours.append(compiled(self.model, torch.tensor([[token]]), torch.tensor([[position]]), cache).clone())
        eager_logits, logits = torch.stack(eager), torch.stack(ours)  # [CHECK_STEPS, V]
        error = (logits - eager_logits).abs().max().item()
        first, second = eager_logits.topk(2, dim=-1).values.unbind(-1)
        clear = (first - second) > 2 * error
        same = logits.argmax(-1) == eager_logits.argmax(-1)
        if error > CHECK_TOLERANCE * eager_logits.abs().max().item() or not bool(same[clear].all()):
            raise RuntimeError(f"compiled decode disagrees with eager (picks {logits.argmax(-1).tolist()} vs "
                               f"{eager_logits.argmax(-1).tolist()}, largest logit difference {error:.3g})")
        self.check_error = error

    def wait(self, timeout: float | None = None) -> None:
        """Until compiling has ended (ready or failed), if it was started."""
        if self._thread is not None:
            self._thread.join(timeout)

    def cache_bytes(self) -> int:
        """Bytes of the shared static KV cache (allocated once, max_context positions)."""
        return sum(t.numel() * t.element_size() for layer in self._shared.layers for t in (layer.keys, layer.values))

    def state(self) -> str:
        return "ready" if self.ready.is_set() else "failed" if self.failed else "pending"
