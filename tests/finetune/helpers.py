"""Running `clasp finetune` in-process and reading what it wrote."""

from __future__ import annotations

import json
import os

from clasp.cli import main as clasp_main

from .conftest import FAST


def finetune(
    recipe,
    data,
    fmt,
    out=None,
    *overrides,
    checkpoint="random",
    model=None,
    eval_only=False,
    extra=(),
) -> dict:
    """`clasp finetune RECIPE ...` in this process; returns its result.json."""
    argv = ["finetune", recipe, "--checkpoint", checkpoint, "--data", data, "--format", fmt]
    argv += ["--config", model] if model else []
    argv += ["--out", str(out)] if out is not None else []
    argv += ["--eval-only"] if eval_only else []
    argv += [*extra, *FAST, *overrides]
    assert clasp_main(argv) == 0
    with open(os.path.join(str(out), "result.json")) as f:
        return json.load(f)


def records(out) -> list[dict]:
    with open(os.path.join(str(out), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
