"""`clasp pretrain`: CLASP pre-training from a YAML config with command-line overrides.

    clasp pretrain --config configs/demo.yaml data.root=data/synth optim.steps=2000
    clasp pretrain --config configs/demo.yaml data.root=data/synth --resume
    torchrun --nproc-per-node 8 -m clasp pretrain --config configs/vit-b.yaml ...

Writes to output_dir: config.yaml (the merged config), checkpoint.pt (every
train.checkpoint_every steps, on SIGINT/SIGTERM and at the end), metrics.jsonl and
losses.png. Exit status: 0 when training ran to the end or stopped on a signal with a
checkpoint saved, 2 for a bad config, data, checkpoint or output folder (one line saying
what to do; see `clasp.cli`), 3 when a loss became NaN/Inf.
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("clasp.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config merged over the defaults")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT, or (no value) from output_dir's checkpoint",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an output_dir that holds an earlier one, replacing it",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=1e-3"
    )


def main(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    from .config import build_config
    from .trainer import NonFiniteLossError, train

    # A bad config, data, checkpoint or output folder raises; `clasp.cli` says it in one line.
    config = build_config(args.config, args.overrides, args.resume, args.overwrite)
    try:
        result = train(config)
    except NonFiniteLossError as error:
        log.error("%s", error)
        return 3
    if rank == 0 and result.stopped_by is None:
        last = result.records[-1] if result.records else {}
        log.info(
            "done: %d steps, final loss %.4f; checkpoint %s; export the backbone with "
            "`clasp export --checkpoint %s --out BACKBONE.safetensors`",
            result.step, last.get("loss", float("nan")), result.checkpoint, result.checkpoint,
        )  # fmt: skip
    return 0
