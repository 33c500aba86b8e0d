"""The sweep's picture: accuracy against tokens per query, one line per policy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {
    "oracle": {"color": "#7f7f7f", "linestyle": "--", "marker": "s", "label": "oracle (ceiling)"},
    "clear": {"color": "#d62728", "linestyle": "-", "marker": "o", "label": "clear"},
    "uniform": {"color": "#1f77b4", "linestyle": "-", "marker": "^", "label": "uniform"},
}


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path, *, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for policy in ("oracle", "uniform", "clear"):
        points = sorted(
            (r["tokens_per_query"], r["mean_accuracy"]) for r in rows if r["policy"] == policy
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, **STYLE[policy])
    ax.set_xlabel("tokens generated per query (probes included)")
    ax.set_ylabel("accuracy (fraction of queries answered correctly)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
