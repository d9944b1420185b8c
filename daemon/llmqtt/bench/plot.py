"""The bench's picture: sentiment latency per path (box plot) and throughput (bars), from the result dict."""

from __future__ import annotations

from pathlib import Path

PATHS = [("seeds_way", "(a) seeds' way: full prompt + generate + parse"),
         ("classify_one", "(b) classification path, one message"),
         ("burst", "(c) burst through the queue, batched")]


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a board or in CI
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    boxes, names, rates = [], [], {}
    for variant, v in r.get("variants", {}).items():
        s = v.get("sentiment")
        if not s:
            continue
        for key, label in PATHS:
            if s.get(key, {}).get("samples_ms"):  # `--only`: (b) alone
                boxes.append(s[key]["samples_ms"])
                names.append(f"{label[:3]}\n{variant}")  # "(a)\nfp32"
        rates[variant] = [s.get(key, {}).get("per_s") or 0 for key, _ in PATHS]
    if boxes:
        left.boxplot(boxes, showfliers=True)
        left.set_xticks(range(1, len(names) + 1), names, fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("latency per message, ms (log)")
    left.set_title("sentiment latency: (a) seeds' way, (b) one message,\n(c) burst incl. queueing")
    width = 0.8 / max(1, len(rates))
    for i, (variant, values) in enumerate(rates.items()):
        right.bar([x + i * width for x in range(len(PATHS))], values, width, label=variant)
    right.set_xticks([x + width * (len(rates) - 1) / 2 for x in range(len(PATHS))],
                     ["(a) seeds' way", "(b) one message", "(c) burst, batched"])
    right.set_yscale("log")
    right.set_ylabel("messages / s (log)")
    right.set_title("sentiment throughput")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
