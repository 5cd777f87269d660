"""`clasp eval`: frozen-feature evaluation of a backbone; the JSON result is printed last.

    clasp eval reid       --checkpoint CKPT --data DIR --format market|idfolder|synth|folder
    clasp eval attributes --checkpoint CKPT --data DIR --format peta|market|synth
    clasp eval parsing    --checkpoint CKPT --data DIR --format ccp|synth
    clasp eval pose       --checkpoint CKPT --data DIR --format coco|synth
    clasp eval all        --checkpoint CKPT --data DIR --format synth [--out DIR]

CKPT is an exported backbone (.safetensors) or a training checkpoint, or `random` with
`--config FILE` for the randomly initialised baseline. `--task` picks the prompt: a task
name (reid, attributes, parsing, pose, generic) or a mix such as `reid=0.5,parsing=0.5`.
`all` runs every protocol under every prompt of the model and prints the task x prompt
matrix (with `--out`, also as JSON and a PNG heatmap). Splits: `clasp.eval.protocols`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from .features import FeatureBank, load_encoder, parse_task
from .protocols import FORMATS, PRIMARY_METRIC, PROTOCOLS, SetLoader, run_protocol

ALL_FORMATS = sorted({f for formats in FORMATS.values() for f in formats})


def _common(parser: argparse.ArgumentParser, formats) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="exported .safetensors, training checkpoint, or random"
    )
    parser.add_argument("--config", default=None, help="model/training YAML (for random)")
    parser.add_argument("--data", required=True, help="dataset root")
    parser.add_argument("--format", required=True, choices=formats, help="dataset format")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--max-images", type=int, default=None, help="evenly spaced subset of each split"
    )
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 strength of the probes")
    parser.add_argument("--alpha", type=float, default=0.2, help="PCK threshold (pose)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed for random")
    parser.add_argument(
        "--weights", choices=("student", "teacher"), default="student",
        help="which weights of a training checkpoint: the student or its EMA teacher",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    for protocol in PROTOCOLS:
        p = sub.add_parser(protocol, help=f"{protocol} ({PRIMARY_METRIC[protocol]})")
        _common(p, FORMATS[protocol])
        p.add_argument(
            "--task", default=None, help="prompt: a task name or a mix like reid=0.5,pose=0.5"
        )
    p = sub.add_parser("all", help="every protocol under every prompt: the task x prompt matrix")
    _common(p, ["synth"])
    p.add_argument(
        "--prompts", default=None, help="comma-separated prompts (default: all of the model's)"
    )
    p.add_argument("--out", default=None, help="folder for the matrix as JSON and PNG")


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


def _summary(result: dict) -> str:
    metrics = result["metrics"]
    shown = {k: v for k, v in metrics.items() if isinstance(v, float | int)}
    parts = [f"{k}={100 * v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
    sets = ", ".join(f"{k} {v}" for k, v in result["sets"].items())
    return f"{result['protocol']} [{result['task']}] on {result['format']} ({sets}): " + " ".join(
        parts
    )


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        encoder = load_encoder(
            args.checkpoint, args.config, seed=args.seed, weights=args.weights, device=args.device
        )
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"clasp eval: cannot load the backbone: {error}", file=sys.stderr)
        return 2
    bank = FeatureBank(encoder, batch_size=args.batch_size, device=args.device)
    loader = SetLoader(bank.size, max_images=args.max_images, workers=args.workers)
    options = {"l2": args.l2, "alpha": args.alpha}
    try:
        if args.protocol == "all":
            from .protocols import task_prompt_matrix

            prompts = args.prompts.split(",") if args.prompts else None
            matrix = task_prompt_matrix(bank, loader, args.data, prompts, **options)
            print(matrix_table(matrix))
            result = {"checkpoint": args.checkpoint, "data": args.data, **matrix}
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "task_prompt_matrix.json"), "w") as f:
                    json.dump(json_ready(result), f, indent=1)
                result["png"] = plot_matrix(
                    matrix, os.path.join(args.out, "task_prompt_matrix.png")
                )
        else:
            task = parse_task(args.task)
            result = run_protocol(
                args.protocol, bank, loader, args.format, args.data, task, **options
            )
            result["checkpoint"] = args.checkpoint
            print(_summary(result))
    except (FileNotFoundError, ValueError) as error:
        print(f"clasp eval {args.protocol}: {error}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(json_ready(result)))
    return 0


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
