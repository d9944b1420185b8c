"""`llmqtt bench --compare A/result.json B/result.json`: models side by side from their bench runs.

Each model is benched with its own config (`llmqtt bench --config A.yaml --out a/`, the same for B); this
module only reads the results and puts accuracy, speed and memory in one table. Runs from different
machines or at different times are flagged: absolute speeds only compare on one machine under one load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

Row = tuple[str, Callable[[dict], str]]


def compare_markdown(results: list[dict]) -> str:
    """One Markdown table, a column per result, a row per figure; '-' where a run did not measure it."""
    header = "| | " + " | ".join(r["meta"]["model"] for r in results) + " |"
    lines = ["# llmqtt bench: models side by side\n", header, "|---" * (len(results) + 1) + "|"]
    for label, get in _rows(results):
        lines.append(f"| {label} | " + " | ".join(_safe(get, r) for r in results) + " |")
    lines += ["", *_caveats(results)]
    return "\n".join(lines) + "\n"


def _rows(results: list[dict]) -> list[Row]:
    langs = sorted({lang for r in results for lang in [*_served(r), *r.get("accuracy_default", {}).get("sentiment", {})]})
    rows: list[Row] = [("bench mode, machine", lambda r: f"{r['meta']['mode']}, {r['meta']['cpu']} x{r['meta']['cores']}")]
    for lang in langs:
        rows.append((f"sentiment accuracy {lang} (fp32, test split)",
                     lambda r, lang=lang: _accuracy(_served(r)[lang])))
    rows.append(("sentiment read-out served", lambda r: r["accuracy"]["sentiment"]["served"]))
    for lang in langs:  # what an unchanged config serves (quantize: auto), on the same rows
        rows.append((f"sentiment accuracy {lang} (default config)",
                     lambda r, lang=lang: _accuracy(r["accuracy_default"]["sentiment"][lang])))
    for variant in ("fp32", "default"):
        rows += _speed_rows(variant)
    return rows


def _speed_rows(variant: str) -> list[Row]:
    """Speed and memory of one variant: fp32 (`model.quantize: none`) or the default config's scheme."""
    v = lambda r: r["variants"][variant]  # noqa: E731
    ready = lambda r: r["startup"][f"ready_{variant}"]  # noqa: E731
    tag = "fp32" if variant == "fp32" else "default"
    rows: list[Row] = []
    if variant != "fp32":
        rows.append(("default config's weights", lambda r: f"{v(r)['dtype']}"))
    rows += [
        (f"sentiment p50, one message ({tag})", lambda r: f"{v(r)['sentiment']['classify_one']['p50_ms']:.0f} ms"),
        (f"sentiment burst throughput ({tag})", lambda r: f"{v(r)['sentiment']['burst']['per_s']:.2f} msg/s"),
        (f"chat first token, cached prompt ({tag})", lambda r: f"{v(r)['chat']['first_token_cached_ms']:.0f} ms"),
        (f"chat decode ({tag})", lambda r: f"{v(r)['chat']['decode_tokens_per_s']:.1f} tok/s"),
        (f"weights in memory ({tag})", lambda r: f"{v(r)['weight_bytes'] / 1e9:.2f} GB"),
    ]
    if variant != "fp32":
        rows.append(("weights at rest in the cache (default)", lambda r: f"{ready(r)['at_rest_bytes'] / 1e9:.2f} GB"))
    if variant != "fp32":  # `llmqtt bench --only served`: the process held this engine alone
        rows.append(("peak RSS of a process serving it (default, --only served)",
                     lambda r: f"{v(r)['process_peak_rss_bytes'] / 1e9:.2f} GB"))
    rows += [
        (f"peak RSS, ready ({tag})", lambda r: f"{ready(r)['peak_rss_bytes'] / 1e9:.2f} GB"),
        (f"time to ready, restart ({tag})", lambda r: f"{ready(r)['seconds']:.1f} s"),
    ]
    return rows


def _served(result: dict) -> dict[str, dict]:
    """language -> accuracy summary of what the daemon serves (the head if the task has one, else the
    prompt); results from before learned heads hold the prompt's summary per language directly."""
    section = result.get("accuracy", {}).get("sentiment") or {}
    if "by_language" in section:
        return {lang: per[section["served"]] for lang, per in section["by_language"].items()}
    return {lang: s for lang, s in section.items() if isinstance(s, dict)}


def _accuracy(summary: dict) -> str:
    return f"{100 * summary['accuracy']:.1f} % of {summary['n']}"


def _safe(get: Callable[[dict], str], result: dict) -> str:
    try:
        return get(result)
    except (KeyError, TypeError, ZeroDivisionError):
        return "-"


def _caveats(results: list[dict]) -> list[str]:
    notes = []
    machines = {(r["meta"].get("cpu"), r["meta"].get("cores")) for r in results}
    if len(machines) > 1:
        notes.append("Runs come from different machines: compare accuracy, not speed.")
    modes = {r["meta"].get("mode") for r in results}
    if len(modes) > 1:
        notes.append(f"Runs used different sample sizes ({', '.join(sorted(map(str, modes)))}): accuracy is on "
                     "different numbers of test rows.")
    dates = ", ".join(str(r["meta"].get("date")) for r in results)
    notes.append(f"Run dates: {dates}. Speeds measured at different times move with the machine's load.")
    return notes


def main(paths: list[Path], out: Path | None = None) -> int:
    results = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    text = compare_markdown(results)
    if out is not None:
        out.write_text(text, encoding="utf-8")
    print(text)
    return 0
