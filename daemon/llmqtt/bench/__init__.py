"""`llmqtt bench`: accuracy and speed of the loaded model on this machine, written as JSON + Markdown + plot.

Modules: data (the labelled sample), accuracy, seeds (the generate-and-parse baseline), speed (sentiment
a/b/c), chat (first token, decode, bandwidth bound), mixed (sentiment while chats stream, 4 chats at
once, through the service's step loop), startup (subprocess timings), llamacpp (optional
peer), targets (met or missed, and why, from the run), report (JSON + Markdown), plot, runner (the order
of it all). Import is light: torch loads on run.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_OUT = Path("bench-out")


def main(config, quick: bool = False, out: Path | None = None, only: str | None = None,
         rows: int | None = None) -> int:
    from dataclasses import replace

    from . import report, runner, targets

    sizes = runner.QUICK if quick else runner.FULL
    if rows is not None:  # fewer test rows per language: a run that must fit a busy machine (meta.sizes says so)
        sizes = replace(sizes, accuracy_rows=rows)
    result = runner.run(config, sizes, only=only)
    paths = report.write(result, out or DEFAULT_OUT)
    for t in targets.targets(result):
        mark = "n/a " if t["met"] is None else ("met " if t["met"] else "MISS")
        print(f"[{mark}] {t['target']}: {targets.fmt_target(t)} (goal {t['goal']})", file=sys.stderr)
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['plot']}")
    return 0
