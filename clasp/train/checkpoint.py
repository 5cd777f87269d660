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

import os
import random

import numpy as np
import torch

from clasp.atomic import atomic_open

CHECKPOINT_NAME = "checkpoint.pt"


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb", durable=True) as f:
        torch.save(checkpoint, f)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(f"cannot read checkpoint {path}: {error}") from error


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
