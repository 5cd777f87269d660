"""Metrics log (one JSON object per line) and a PNG of the loss curves."""

from __future__ import annotations

import json
import math
import os

from clasp.atomic import atomic_open, atomic_path

LOSS_KEYS = ("loss", "dino", "part", "attribute", "load_balance", "z_loss")


class MetricsLog:
    """Appends records to `path`. Opening for a resumed run at `step` first drops the records
    after that step, so the file reads as if the run had never stopped."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        records = self.read(path) if os.path.exists(path) else []
        if resume_step is None:
            records = []
        else:
            records = [r for r in records if r.get("step", 0) <= resume_step]
        with atomic_open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        self.records = records

    @staticmethod
    def read(path: str) -> list[dict]:
        records = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a kill mid-write
                        break
        return records

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(records: list[dict], path: str) -> None:
    """Loss curves against the step, one panel per term."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in LOSS_KEYS if any(k in r for r in records)]
    # Fixed margins instead of tight_layout, which costs seconds per figure.
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.18, top=0.88, wspace=0.35)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, lw=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
