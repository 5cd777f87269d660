"""`clasp finetune`: the downstream recipes, from one backbone checkpoint.

    clasp finetune reid       --checkpoint CKPT --data DIR --format F --out RUN  (F: market,
                                                       idfolder, msmt17, synth)
    clasp finetune attributes --checkpoint CKPT --data DIR --format F --out RUN  (peta, pa100k,
                                                       market, synth)
    clasp finetune parsing    --checkpoint CKPT --data DIR --format F --out RUN  (ccp, lip, synth)
    clasp finetune pose       --checkpoint CKPT --data DIR --format F --out RUN  (coco, synth)
    ... [--task PROMPT] [--recipe-config FILE] [--resume] [--overwrite] [--eval-only]
        [key.sub=value ...]

CKPT is an export (.safetensors of `clasp export`), a training checkpoint (checkpoint.pt of
`clasp pretrain`), a fine-tuned model (RUN/model.safetensors), a plain ViT state dict with
`--config`, or `random` with `--config FILE` (a model or training YAML). The recipe's config
is `clasp/finetune/configs/<recipe>.yaml`, merged under `--recipe-config FILE` and the overrides.
`--eval-only` evaluates CKPT on the test split without training (RUN optional). The JSON
result is printed last and written to RUN/result.json. Exit status: 0 done (or stopped by a
signal with a checkpoint saved), 2 bad arguments, config, checkpoint or data, 3 NaN/Inf loss.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

RECIPES = {
    "reid": ("clasp.finetune.reid", "ReIDRecipe", "market, idfolder, msmt17, synth"),
    "attributes": ("clasp.finetune.attributes", "AttributeRecipe", "peta, pa100k, market, synth"),
    "parsing": ("clasp.finetune.parsing", "ParsingRecipe", "ccp, lip, synth"),
    "pose": ("clasp.finetune.pose", "PoseRecipe", "coco, synth"),
}

log = logging.getLogger("clasp.finetune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name, (_, _, formats) in RECIPES.items():
        p = sub.add_parser(name, help=f"fine-tune for {name} ({formats})")
        p.add_argument(
            "--checkpoint", required=True,
            help="export (.safetensors), checkpoint.pt, fine-tuned model.safetensors, or random",
        )  # fmt: skip
        p.add_argument("--config", default=None, help="model or training YAML (for random)")
        p.add_argument("--data", required=True, help="dataset root")
        p.add_argument("--format", required=True, help=f"dataset format: {formats}")
        p.add_argument("--out", default=None, help="output folder (required unless --eval-only)")
        p.add_argument("--task", default=None, help=f"prompt (default {name}); a mix: a=0.5,b=0.5")
        p.add_argument(
            "--recipe-config", default=None, metavar="FILE",
            help="YAML merged over the recipe's config (clasp/finetune/configs/<recipe>.yaml)",
        )  # fmt: skip
        p.add_argument(
            "--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
            help="continue RUN's checkpoint (or CHECKPOINT)",
        )  # fmt: skip
        p.add_argument("--overwrite", action="store_true", help="replace an earlier run in RUN")
        p.add_argument("--eval-only", action="store_true", help="evaluate CKPT, no training")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def recipe_class(name: str):
    module, cls, _ = RECIPES[name]
    return getattr(importlib.import_module(module), cls)


def main(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    from clasp.eval.features import parse_task
    from clasp.eval.report import json_ready
    from clasp.model.io import CheckpointError
    from clasp.train.loop import NonFiniteLossError

    from .config import build_config
    from .run import run

    prefix = f"clasp finetune {args.recipe}"
    try:
        if args.out is None and not args.eval_only:
            raise ValueError("--out DIR is required to fine-tune (it holds the run)")
        if args.eval_only and args.resume:
            raise ValueError("--eval-only evaluates --checkpoint; it does not take --resume")
        if args.out and args.eval_only and not args.overwrite:
            existing = os.path.join(args.out, "result.json")
            if os.path.exists(existing):
                raise ValueError(f"{existing} exists; pass --overwrite to replace it")
        config = build_config(
            args.recipe, args.recipe_config, args.overrides,
            output_dir=args.out, task=parse_task(args.task), data_root=args.data,
            data_format=args.format, resume=args.resume, overwrite=args.overwrite,
        )  # fmt: skip
        result = run(
            recipe_class(args.recipe), config, args.checkpoint, args.config,
            eval_only=args.eval_only,
        )  # fmt: skip
    except NonFiniteLossError as error:
        log.error("%s", error)
        return 3
    except (CheckpointError, KeyError, ValueError, FileNotFoundError, NotADirectoryError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{prefix}: {message}", file=sys.stderr)
        return 2
    if rank == 0 and result:
        if "metric" in result:
            print(f"{result['protocol']} {result['metric']} = {100 * result['value']:.2f}")
        print(json.dumps(json_ready(result)))
    return 0
