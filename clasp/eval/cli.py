"""`clasp eval`: frozen-feature evaluation of a backbone; the JSON result is printed last.

    clasp eval reid       --checkpoint CKPT --data DIR --format market|idfolder|synth|folder
    clasp eval attributes --checkpoint CKPT --data DIR --format peta|market|synth
    clasp eval parsing    --checkpoint CKPT --data DIR --format ccp|synth
    clasp eval pose       --checkpoint CKPT --data DIR --format coco|synth
    clasp eval all        --checkpoint CKPT --data DIR --format synth [--out DIR]
    clasp eval zeroshot    --teacher NAME|DIR --data DIR --format peta|market|synth
    clasp eval text-search --checkpoint CKPT --data DIR --format synth|cuhk-pedes

CKPT is an exported backbone (.safetensors) or a training checkpoint, or `random` with
`--config FILE` for the randomly initialised baseline. `--task` picks the prompt: a task
name (reid, attributes, parsing, pose, generic) or a mix such as `reid=0.5,parsing=0.5`.
`all` runs every protocol under every prompt of the model and prints the task x prompt
matrix (with `--out`, also as JSON and a PNG heatmap). Splits: `clasp.eval.protocols`.
zeroshot and text-search read text through a CLIP teacher: `clasp.eval.text_cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from clasp import RANDOM_WEIGHTS
from clasp.atomic import write_json

from . import text_cli
from .features import FeatureBank, load_encoder, parse_task
from .protocols import FORMATS, PRIMARY_METRIC, PROTOCOLS, SetLoader, run_protocol
from .report import json_ready, matrix_table, plot_matrix

ALL_FORMATS = sorted({f for formats in FORMATS.values() for f in formats})


def _common(parser: argparse.ArgumentParser, formats) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help=f"exported .safetensors, training checkpoint, or {RANDOM_WEIGHTS}",
    )
    parser.add_argument(
        "--config", default=None, help=f"model/training YAML (for {RANDOM_WEIGHTS})"
    )
    parser.add_argument("--data", required=True, help="dataset root")
    parser.add_argument("--format", required=True, choices=formats, help="dataset format")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--max-images", type=int, default=None, help="evenly spaced subset of each split"
    )
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 strength of the probes")
    parser.add_argument("--alpha", type=float, default=0.2, help="PCK threshold (pose)")
    parser.add_argument(
        "--seed", type=int, default=0, help=f"initialisation seed for {RANDOM_WEIGHTS}"
    )
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
    text_cli.add_parsers(sub)


def _summary(result: dict) -> str:
    metrics = result["metrics"]
    shown = {k: v for k, v in metrics.items() if isinstance(v, float | int)}
    parts = [f"{k}={100 * v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
    sets = ", ".join(f"{k} {v}" for k, v in result["sets"].items())
    return f"{result['protocol']} [{result['task']}] on {result['format']} ({sets}): " + " ".join(
        parts
    )


def main(args: argparse.Namespace) -> int:
    if args.protocol in text_cli.COMMANDS:
        return text_cli.main(args)
    # A backbone that cannot be loaded, a set that cannot be evaluated (e.g. re-ID with no
    # valid query) or an output that cannot be written raises; `clasp.cli` says it in one line.
    start = time.perf_counter()
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {args.max_images}")
    encoder = load_encoder(
        args.checkpoint, args.config, seed=args.seed, weights=args.weights, device=args.device
    )
    bank = FeatureBank(encoder, batch_size=args.batch_size, device=args.device)
    loader = SetLoader(bank.size, max_images=args.max_images, workers=args.workers)
    options = {"l2": args.l2, "alpha": args.alpha}
    if args.protocol == "all":
        from .protocols import task_prompt_matrix

        prompts = args.prompts.split(",") if args.prompts else None
        matrix = task_prompt_matrix(bank, loader, args.data, prompts, **options)
        print(matrix_table(matrix))
        result = {"checkpoint": args.checkpoint, "data": args.data, **matrix}
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            write_json(os.path.join(args.out, "task_prompt_matrix.json"), json_ready(result))
            result["png"] = plot_matrix(matrix, os.path.join(args.out, "task_prompt_matrix.png"))
    else:
        task = parse_task(args.task)
        result = run_protocol(args.protocol, bank, loader, args.format, args.data, task, **options)
        result["checkpoint"] = args.checkpoint
        print(_summary(result))
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(json_ready(result)))
    return 0
