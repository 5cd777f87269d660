"""`clasp demo`: the whole method end to end on a synthetic set, on a CPU, in minutes.

    clasp demo [--out runs/demo] [--scale default|tiny] [--config demo] [--force] [key=value ...]
    clasp demo --ablation [--seeds 3] [same options]

The ablation (`clasp.demo.ablation`): self-distillation alone, + part loss, + attribute loss,
+ both, + MoE without prompts, full CLASP, each over --seeds pre-training seeds.

The stages and what they write: `clasp.demo.run`; the report: `clasp.demo.report`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .report import OUTPUTS
from .run import SCALES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--config", default="demo",
        help="pre-training config: a YAML file or a packaged config's name (default demo)",
    )  # fmt: skip
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ablation", action="store_true",
        help="pre-train and evaluate the ablation's six variants instead of the demo's two runs",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=int, default=3,
        help="with --ablation: pre-training seeds per variant, from --seed on (default 3)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=2,
        help="torch threads per process (default 2; the numbers depend on it)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="data loading processes")
    parser.add_argument(
        "pretrain_overrides", nargs="*", metavar="key=value",
        help="extra overrides for both pre-training runs, e.g. optim.steps=600",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from clasp.train.trainer import NonFiniteLossError

    from .ablation import run_ablation
    from .run import StageInterrupted, run_demo

    # The stages log through `logging` (pre-training progress, unreadable images).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = dict(
        scale=args.scale, force=args.force, seed=args.seed, threads=args.threads,
        workers=args.workers, pretrain_overrides=args.pretrain_overrides,
    )  # fmt: skip
    try:
        if args.ablation:
            run_ablation(args.out, args.config, seeds=args.seeds, **options)
        else:
            run_demo(args.out, args.config, **options)
    except (FileNotFoundError, KeyError, ValueError) as error:
        # str() of a KeyError quotes its message: print the message itself
        reason = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"clasp demo: {reason}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"clasp demo: {error}", file=sys.stderr)
        return 3
    except StageInterrupted as error:
        print(f"clasp demo: {error}", file=sys.stderr)
        return 1
    if args.ablation:
        print(f"\n[demo] ablation in {os.path.join(os.path.abspath(args.out), 'ablation')}")
    else:
        print(f"\n[demo] outputs in {os.path.abspath(args.out)}: {', '.join(OUTPUTS)}")
    return 0
