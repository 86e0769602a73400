"""A PNG of a run's metrics.jsonl: loss, rewards, margins, accuracy (and SGDPO pilots)."""
from __future__ import annotations

import json
import os
from typing import List, Optional

PANELS = [
    ("loss", ["loss"]),
    ("rewards", ["rewards/chosen", "rewards/rejected"]),
    ("margin", ["rewards/margins"]),
    ("accuracy", ["rewards/accuracies"]),
    ("pilots (SGDPO)", ["sgdpo/pilot_chosen", "sgdpo/pilot_rejected"]),
    ("NLL", ["nll"]),
    ("learning rate", ["lr"]),
]


def read_metrics(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(jsonl: str, png: str, title: Optional[str] = None) -> Optional[str]:
    """Write ``png`` from ``jsonl``; returns its path, or None without rows or matplotlib."""
    rows = read_metrics(jsonl)
    if not rows:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    panels = [(t, [k for k in keys if any(k in r for r in rows)]) for t, keys in PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, (t, keys) in zip(axes[0], panels):
        for k in keys:
            xs = [r["step"] for r in rows if k in r]
            ax.plot(xs, [r[k] for r in rows if k in r], marker="." if len(xs) < 40 else None,
                    label=k.split("/")[-1])
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png
