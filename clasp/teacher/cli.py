"""`clasp teacher fit`: fit a small open_clip teacher offline (see `clasp.teacher.fit`).

    clasp teacher fit --data DIR --out DIR [--epochs N] [--config FILE] [key=value ...]

DIR holds a synthetic set (`clasp synth`) or PETA. The held-out pseudo-label quality of a
teacher fitted on a synthetic set is printed and stored in OUT/fit.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from clasp.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="teacher_command", metavar="COMMAND", required=True)
    p = sub.add_parser("fit", help="train a small open_clip teacher on a synthetic set or PETA")
    p.add_argument("--data", required=True, help="synthetic set (clasp synth) or PETA folder")
    p.add_argument("--out", required=True, help="teacher folder to write")
    p.add_argument("--epochs", type=float, default=None, help="passes over the training images")
    p.add_argument("--config", default=None, help="YAML file over the defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def main(args: argparse.Namespace) -> int:
    from clasp.eval.pseudo_labels import teacher_quality

    from .fit import FIT_DEFAULTS, fit

    try:
        cfg = load_config(FIT_DEFAULTS, args.config, args.overrides)
    except (KeyError, ValueError, FileNotFoundError) as error:
        print(f"clasp teacher fit: {error}", file=sys.stderr)
        return 2
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    try:
        summary = fit(args.data, args.out, cfg, quality=teacher_quality)
    except (FileNotFoundError, ValueError) as error:
        print(f"clasp teacher fit: {error}", file=sys.stderr)
        return 2
    print(f"saved the teacher to {args.out} (use: clasp label --teacher {args.out} ...)")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0
