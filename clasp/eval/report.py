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
        return {str(k): json_ready(v) for k, v in value.items()}
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


def own_prompt_differences(matrix: dict) -> list[list[float]]:
    """Per cell, in points: value - the row's own-prompt value (the prompt named like the
    protocol; the row's best value where no prompt is)."""
    out = []
    for protocol, row in zip(matrix["protocols"], matrix["values"], strict=True):
        if protocol in matrix["prompts"]:
            anchor = row[matrix["prompts"].index(protocol)]
        else:
            anchor = max((v for v in row if not math.isnan(v)), default=math.nan)
        out.append([100 * (v - anchor) for v in row])
    return out


def own_prompt_margins(matrix: dict) -> dict[str, float]:
    """Per protocol that has a prompt of its name, in points: its own-prompt value minus the
    best value under any other prompt (> 0: the own prompt is best)."""
    margins = {}
    for protocol, row in zip(matrix["protocols"], matrix["values"], strict=True):
        if protocol in matrix["prompts"]:
            own = matrix["prompts"].index(protocol)
            others = [v for j, v in enumerate(row) if j != own and not math.isnan(v)]
            margins[protocol] = 100 * (row[own] - max(others)) if others else math.nan
    return margins


def plot_matrix(
    matrix: dict, path: str, title: str = "task x prompt", noise: float | None = None
) -> str:
    """A PNG heatmap of each cell's difference from its row's own-prompt value, in points, on
    one colour scale shared by every row (so a 0.004-point spread looks flat, as it is);
    cells within `noise` points (e.g. the seed spread) of the own-prompt value are marked ~."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array(matrix["values"], dtype=np.float64)
    diff = np.array(own_prompt_differences(matrix), dtype=np.float64)
    finite = np.abs(diff[np.isfinite(diff)])
    limit = max(1.0, float(finite.max()) if finite.size else 1.0)
    rows = [f"{p} ({m})" for p, m in zip(matrix["protocols"], matrix["metrics"], strict=True)]
    fig, ax = plt.subplots(figsize=(1.5 * len(matrix["prompts"]) + 3.0, 0.65 * len(rows) + 1.8))
    image = ax.imshow(
        np.ma.masked_invalid(diff), cmap="RdBu", aspect="auto", vmin=-limit, vmax=limit
    )
    ax.set_xticks(range(len(matrix["prompts"])), matrix["prompts"], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("prompt given to the backbone")
    for i, protocol in enumerate(matrix["protocols"]):
        if protocol in matrix["prompts"]:  # the own-prompt cell, framed
            j = matrix["prompts"].index(protocol)
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    for (i, j), value in np.ndenumerate(values):
        if math.isnan(value):
            continue
        delta = diff[i, j]
        own = matrix["prompts"][j] == matrix["protocols"][i]
        near = noise is not None and abs(delta) < noise and not own
        label = f"{100 * value:.1f}\n{delta:+.1f}{' ~' if near else ''}"
        colour = "white" if abs(delta) > 0.6 * limit else "black"
        ax.text(j, i, label, ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(image, ax=ax, label="points vs the task's own prompt")
    note = f"; ~ within {noise:.1f} points (seed spread)" if noise is not None else ""
    ax.set_title(f"{title}\n(value, and difference from the framed own prompt{note})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_prompt_mix(curve: dict, path: str, title: str = "prompt mix") -> str:
    """One panel per protocol: its metric (%) against the weight of the `end` prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curve["protocols"])
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 2.8), squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.2, top=0.8, wspace=0.35)
    for ax, protocol, metric, row in zip(
        axes[0], curve["protocols"], curve["metrics"], curve["values"], strict=True
    ):
        ax.plot(curve["weights"], [100 * v for v in row], marker="o", lw=1.2)
        ax.set_title(f"{protocol} ({metric})", fontsize=10)
        ax.set_xlabel(f"{curve['start']} -> {curve['end']}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
