"""The labelled sentiment sample: a fixed, seeded draw from ../shared/data, split into dev and test.

The sample is copied into `bench/data/` once (`python -m llmqtt.bench.data`), so the benchmark reads the
same rows on every machine. Prompts are tuned on `dev` only; accuracy is reported on `test`, which is
disjoint from it (every row gets exactly one split).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 20250101
SOURCES = {"en": "sentiment-en-uci.jsonl", "zh": "sentiment-zh-reviews-dev.jsonl"}
N_DEV, N_TEST = 300, 600  # per language
# The shipped sentiment head's rows: every dev row, then the rows after the sample in the same shuffle.
FIT_FILE = "sentiment-fit.jsonl"
# English: every row that is not a test row (2,400, less 5 longer than MAX_FIT_CHARS). Chinese: the first
# 2,200 of the 13,290 in the same order, less 28 longer than MAX_FIT_CHARS; the model's pass bounded it
# (~0.35 rows/s per core on the loaded 2-core dev machine), and cross-validated accuracy had flattened:
# 81.5 / 84.1 / 84.6 % at 400 / 800 / 1,400 Chinese rows (docs/accuracy.md).
FIT_ROWS = {"en": 2395, "zh": 2172}
# Reviews longer than this are left out of fitting: 1.7 % of the Chinese rows, up to 590 tokens each, each
# costing the model time of ~5 median rows. The test split keeps them.
MAX_FIT_CHARS = 280


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    label: str
    split: str  # "dev" | "test"
    lang: str = ""  # in the fit file, which holds both languages


def repo_data_dir() -> Path:
    """`bench/data/` of the repository this package is installed from (editable install)."""
    return Path(__file__).resolve().parents[3] / "bench" / "data"


def load_rows(path: Path, split: str | None = None, limit: int | None = None) -> list[Row]:
    """Rows of one sample file in file order (already shuffled), optionally one split and the first `limit`."""
    rows = [Row(**json.loads(line)) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if split is not None:
        rows = [r for r in rows if r.split == split]
    return rows[:limit] if limit is not None else rows


@dataclass(frozen=True)
class FitRows:
    """The rows a shipped head was fitted on, and the file's digest (which the head records)."""

    rows: list[Row]
    sha256: str


def load_fit_rows(path: Path, test_files: list[Path]) -> FitRows:
    """A fit file; ValueError if any of its ids is in a test split (never train on test rows)."""
    rows = load_rows(path)
    test_ids = {r.id for f in test_files for r in load_rows(f, "test")}
    leaked = [r.id for r in rows if r.id in test_ids or r.split != "dev"]
    if leaked:
        raise ValueError(f"{path}: {len(leaked)} rows are not dev rows or are in a test split, e.g. {leaked[:3]}")
    return FitRows(rows, hashlib.sha256(path.read_bytes()).hexdigest())


def draw(source: Path, seed: int = SEED, n_dev: int = N_DEV, n_test: int = N_TEST) -> list[Row]:
    """Shuffle the source with `seed`; the first n_dev rows are dev, the next n_test are test."""
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").split("\n") if line.strip()]
    random.Random(seed).shuffle(rows)
    picked = rows[: n_dev + n_test]
    return [Row(str(r["id"]), r["text"], r["label"], "dev" if i < n_dev else "test") for i, r in enumerate(picked)]


def draw_fit(source: Path, lang: str, n: int, seed: int = SEED) -> list[Row]:
    """n dev rows for fitting: the sample's dev rows, then the rows after the sample (never its test rows),
    each at most MAX_FIT_CHARS long."""
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").split("\n") if line.strip()]
    random.Random(seed).shuffle(rows)
    picked = [r for r in rows[:N_DEV] + rows[N_DEV + N_TEST:] if len(r["text"]) <= MAX_FIT_CHARS][:n]
    return [Row(str(r["id"]), r["text"], r["label"], "dev", lang) for r in picked]


def write_sample(source_dir: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fit = []
    for lang, name in SOURCES.items():
        rows = draw(source_dir / name)
        lines = [json.dumps({k: v for k, v in r.__dict__.items() if k != "lang"}, ensure_ascii=False) for r in rows]
        (out_dir / f"sentiment-{lang}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        fit += [json.dumps(r.__dict__, ensure_ascii=False) for r in draw_fit(source_dir / name, lang, FIT_ROWS[lang])]
    (out_dir / FIT_FILE).write_text("\n".join(fit) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import sys

    write_sample(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"), repo_data_dir())
