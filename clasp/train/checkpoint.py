"""Training checkpoints: written atomically, holding everything a bit-exact resume needs.

A checkpoint is a `torch.save` dict loadable with `weights_only=True`:
    config            the full training config
    step              optimiser steps done; epoch, batch_in_epoch: the data-loader position
    model, teacher    student and EMA-teacher state dicts (full, unsharded, on CPU)
    optimizer         optimiser state dict
    dino_loss         the DINO loss state (its center)
    rng               per rank: torch CPU and CUDA generator states, numpy, python random
    metrics           {name: value} of the last logged step, for the record
Written through `clasp.atomic` (a temporary beside `path`, flushed to disk, renamed over it):
a kill at any moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import errno
import os
import random

import numpy as np
import torch

from clasp.atomic import atomic_open
from clasp.model.io import CheckpointError, read_checkpoint

__all__ = [
    "CHECKPOINT_NAME", "CheckpointError", "check_training_checkpoint", "load_checkpoint",
    "resolve_resume", "resume_mismatch", "rng_state", "save_checkpoint", "set_rng_state",
]  # fmt: skip

CHECKPOINT_NAME = "checkpoint.pt"
TRAINING_KEYS = ("config", "step", "epoch", "batch_in_epoch", "rng")
# What decides the shapes of a run's weights: a resumed run must match the checkpoint here.
ARCHITECTURE_SECTIONS = ("model", "heads")


def rng_state() -> dict:
    mt_name, mt_keys, mt_pos, has_gauss, cached = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": mt_name,
            "keys": torch.from_numpy(mt_keys.astype(np.int64)),
            "pos": int(mt_pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": python_version, "state": list(python_state), "gauss": python_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write `checkpoint` to path atomically. A failed write (a full disk) leaves the previous
    checkpoint and raises OSError naming path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with atomic_open(path, "wb", durable=True) as f:
            torch.save(checkpoint, f)
    except OSError as error:
        if error.filename is not None:
            raise
        # torch's writer reports the failed write without the file's name
        raise OSError(error.errno, error.strerror or str(error), path) from error
    except RuntimeError as error:
        # The zip writer's failed write ("unexpected pos ..."): with no space left, say so.
        free = _free_bytes(os.path.dirname(os.path.abspath(path)))
        if free is not None and free < (64 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from error
        raise


def _free_bytes(directory: str) -> int | None:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def load_checkpoint(path: str) -> dict:
    """The checkpoint dict at path; FileNotFoundError, or CheckpointError for a file that is
    truncated, damaged or not a checkpoint (see `clasp.model.io.read_checkpoint`)."""
    return read_checkpoint(path)


def check_training_checkpoint(checkpoint: dict, path: str) -> None:
    """Raise CheckpointError unless `checkpoint` has every entry a resume reads."""
    missing = [key for key in TRAINING_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} is not a clasp training checkpoint (it has no {', '.join(missing)}); "
            "resume from a checkpoint.pt written by `clasp pretrain`"
        )


def resume_mismatch(path: str, stored: dict, wanted: dict, error: Exception) -> CheckpointError:
    """The error of a resume whose state does not load into this run's model: which
    architecture settings differ (or, if none does, the loader's own first line)."""
    differences = architecture_differences(stored, wanted)
    reason = "; ".join(differences) or str(error).strip().splitlines()[0]
    return CheckpointError(
        f"cannot resume from {path}: its weights do not fit this run's model ({reason}); "
        "resume with the settings it was trained with, or start a new run with --overwrite "
        "or another output_dir"
    )


def architecture_differences(stored: dict, wanted: dict, shown: int = 6) -> list[str]:
    """'key: checkpoint X, this run Y' for each setting that shapes the weights and differs
    (the model and heads sections, and whether pseudo-labels are on), at most `shown`."""

    def leaves(value, prefix: str) -> dict:
        if not isinstance(value, dict):
            return {prefix: value}
        out = {}
        for key, sub in value.items():
            out.update(leaves(sub, f"{prefix}.{key}"))
        return out

    # Settings that change how the same weights run, not their shapes.
    ignored = {"model.kernels", "model.attention", "model.grad_checkpointing",
               "model.drop_path_rate"}  # fmt: skip
    a, b = {}, {}
    for section in ARCHITECTURE_SECTIONS:
        a.update(leaves(stored.get(section, {}), section))
        b.update(leaves(wanted.get(section, {}), section))
    out = [
        f"{key}: checkpoint {a.get(key)!r}, this run {b.get(key)!r}"
        for key in sorted(a.keys() | b.keys())
        if key not in ignored and a.get(key) != b.get(key)
    ]
    labelled = [bool(c.get("data", {}).get("labels")) for c in (stored, wanted)]
    if labelled[0] != labelled[1]:
        with_labels = "with pseudo-labels (data.labels)"
        out.append(
            f"the checkpoint was trained {with_labels if labelled[0] else 'without them'}, "
            f"this run {with_labels if labelled[1] else 'without them'}"
        )
    return out[:shown] + ([f"and {len(out) - shown} more"] if len(out) > shown else [])


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: None (a new run), "auto" (output_dir's checkpoint,
    which must exist: that is what `--resume` asks for) or a checkpoint path or folder."""
    if resume in (None, "", False):
        return None
    if resume == "auto":
        path = os.path.join(output_dir, CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--resume: no checkpoint in {output_dir} to resume from ({CHECKPOINT_NAME} "
                "is missing); start a new run without --resume"
            )
        return path
    if os.path.isdir(resume):
        resume = os.path.join(resume, CHECKPOINT_NAME)
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"train.resume: no checkpoint at {resume}")
    return resume
