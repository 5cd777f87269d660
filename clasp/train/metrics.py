"""Metrics log (one JSON object per line) and a PNG of the loss curves."""

from __future__ import annotations

import json
import math
import os

from clasp.atomic import atomic_open, atomic_path

LOSS_KEYS = ("loss", "dino", "part", "attribute", "load_balance", "z_loss")


class MetricsLog:
    """Appends records to `path`. Opening for a resumed run at `step` first drops the records
    after that step, so the file reads as if the run had never stopped. With `tensorboard` (a
    folder), every numeric value of a record is also a TensorBoard scalar at its step; a
    resumed run purges the events after its step the same way."""

    def __init__(self, path: str, resume_step: int | None = None, tensorboard: str | None = None):
        self.path = path
        self.writer = open_tensorboard(tensorboard, resume_step) if tensorboard else None
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
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def open_tensorboard(folder: str, resume_step: int | None = None):
    """A TensorBoard SummaryWriter on folder (events after resume_step are purged)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "train.tensorboard=true needs the tensorboard package: pip install "
            "'clasp-triton[tensorboard]' (or tensorboard), or set train.tensorboard=false"
        ) from None
    return SummaryWriter(folder, purge_step=resume_step, flush_secs=10)


def plot_losses(records: list[dict], path: str, keys: tuple[str, ...] = LOSS_KEYS) -> None:
    """Loss curves against the step, one panel per term of `keys` the records hold."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in records)]
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
