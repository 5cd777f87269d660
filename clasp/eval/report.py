"""Presenting evaluation results: the task x prompt matrix as a text table and as a PNG
heatmap, and results made strict JSON (NaN -> null); shared by `clasp eval` and the demo."""

from __future__ import annotations

import math

import torch


def json_ready(value):
    """NaN -> None (strict JSON), tensors -> lists, recursively."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, torch.Tensor):
        return json_ready(value.tolist())
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def format_value(value: float) -> str:
    return "  n/a" if value is None or math.isnan(value) else f"{100 * value:5.1f}"


def matrix_table(matrix: dict) -> str:
    """The task x prompt matrix as text, values in percent, each row's best marked *."""
    width = max(10, *(len(p) + 1 for p in matrix["prompts"]))
    lines = ["protocol (metric)".ljust(22) + "".join(p.rjust(width) for p in matrix["prompts"])]
    for protocol, metric, row in zip(
        matrix["protocols"], matrix["metrics"], matrix["values"], strict=True
    ):
        finite = [v for v in row if not math.isnan(v)]
        best = max(finite) if finite else None
        cells = [(format_value(v) + ("*" if v == best else " ")).rjust(width) for v in row]
        lines.append(f"{protocol} ({metric})".ljust(22) + "".join(cells))
    return "\n".join(lines)


def plot_matrix(matrix: dict, path: str, title: str = "task x prompt") -> str:
    """A PNG heatmap: colour scaled per row (metrics differ), values in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array(matrix["values"], dtype=np.float64)
    filled = np.where(np.isnan(values), np.inf, values)
    low = filled.min(axis=1, keepdims=True)
    span = np.where(np.isnan(values), -np.inf, values).max(axis=1, keepdims=True) - low
    span = np.where(np.isfinite(span), span, 0.0)
    scaled = np.where(span > 0, (values - low) / np.where(span > 0, span, 1), 0.5)
    scaled = np.ma.masked_invalid(scaled)  # NaN cells (nothing to score) stay blank
    rows = [f"{p} ({m})" for p, m in zip(matrix["protocols"], matrix["metrics"], strict=True)]
    fig, ax = plt.subplots(figsize=(1.4 * len(matrix["prompts"]) + 2.5, 0.6 * len(rows) + 1.6))
    ax.imshow(scaled, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(len(matrix["prompts"])), matrix["prompts"], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("prompt given to the backbone")
    for (i, j), value in np.ndenumerate(values):
        colour = "black" if scaled[i, j] > 0.6 else "white"
        ax.text(j, i, format_value(value).strip(), ha="center", va="center", color=colour)
    ax.set_title(f"{title} (colour: per row, best = yellow)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
