"""Fine-tuning configs: the common defaults <- the recipe's shipped YAML
(`clasp/finetune/configs/<recipe>.yaml`) <- a user's YAML file <- `key.sub=value` overrides."""

from __future__ import annotations

import copy
import os

from clasp.config import load_config, load_yaml, merge

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

COMMON_DEFAULTS = {
    "seed": 0,
    "output_dir": None,  # --out
    "task": None,  # the prompt (a task name or {task: weight}); None: the recipe's own task
    "model": {
        # The backbone comes from --checkpoint; these override its config for fine-tuning.
        "img_size": None,  # [H, W] training and test size; None: the checkpoint's
        "drop_path_rate": 0.1,
        "kernels": None,  # auto | triton | reference; None: the checkpoint's
        "grad_checkpointing": False,
    },
    "head": {},
    "data": {
        "format": None,  # --format
        "root": None,  # --data
        "batch_size": 32,  # per process
        "num_workers": 0,
        "eval_batch_size": 64,
        "max_eval_images": None,  # evenly spaced subset of each test split (quick checks)
    },
    "augment": {
        "flip_p": 0.5,
        "scale": [1.0, 1.0],  # zoom range (> 1 zooms in)
        "rotation": 0.0,  # max degrees
        "rotation_p": 1.0,
        "pad": 0,  # max shift in pixels (pad-and-crop)
        "erasing_p": 0.0,
    },
    "loss": {"load_balance": 0.01, "z_loss": 0.001},
    "optim": {
        "steps": None,  # optimiser steps; wins over epochs when set
        "epochs": 10,
        "lr": 1e-4,
        "min_lr": 1e-6,
        "warmup_steps": 0,
        "warmup_epochs": None,  # wins over warmup_steps when set
        "weight_decay": 0.05,
        # Layer-wise lr decay: the lr of ViT layer l (0 = patch embedding, depth + 1 = final
        # norm and head) is lr * layer_decay ** (depth + 1 - l).
        "layer_decay": 0.75,
        "head_lr_scale": 1.0,  # the head's lr = lr * head_lr_scale
        "betas": [0.9, 0.999],
        "clip_grad": 3.0,
    },
    "eval": {"flip": False},
    "train": {
        "log_every": 10,
        "plot_every": 100,
        "checkpoint_every": 500,
        "amp": "auto",  # auto: bf16 autocast on CUDA | bf16 | off
        "compile": False,
        "resume": None,  # None: a new run | auto: output_dir's checkpoint | a path
        "overwrite": False,
        "progress": True,
        "deterministic": False,
        "cpu_threads": None,
        "tensorboard": False,  # also log the metrics as TensorBoard events (output_dir/tensorboard)
    },
    "distributed": {"strategy": "ddp", "backend": "auto"},
}


def recipe_defaults(recipe: str) -> dict:
    """COMMON_DEFAULTS <- the recipe's shipped YAML: every key a config of it may set."""
    path = os.path.join(CONFIG_DIR, f"{recipe}.yaml")
    with open(path) as f:
        shipped = load_yaml(f) or {}
    defaults = copy.deepcopy(COMMON_DEFAULTS)
    for key, value in shipped.items():  # recipe sections add keys the common ones lack
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            defaults[key] = merge(defaults[key], value)
        else:
            defaults[key] = copy.deepcopy(value)
    defaults["recipe"] = recipe
    return defaults


def build_config(
    recipe: str,
    path: str | None = None,
    overrides: list[str] = (),
    **arguments,
) -> dict:
    """The full config of a fine-tuning run. `arguments` are command-line values written into
    the config when not None: output_dir, task, data_root, data_format, resume, overwrite."""
    config = load_config(recipe_defaults(recipe), path, list(overrides))
    places = {
        "output_dir": ("output_dir",),
        "task": ("task",),
        "data_root": ("data", "root"),
        "data_format": ("data", "format"),
        "resume": ("train", "resume"),
        "overwrite": ("train", "overwrite"),
    }
    for name, value in arguments.items():
        if value is None or value is False:
            continue
        *parents, leaf = places[name]
        section = config
        for p in parents:
            section = section[p]
        section[leaf] = value
    check(config)
    return config


def check(config: dict) -> None:
    """Raise ValueError naming the first config value that cannot work."""
    optim, data = config["optim"], config["data"]
    if optim["steps"] is None and not optim["epochs"]:
        raise ValueError("set optim.steps or optim.epochs (a positive number)")
    for key in ("steps", "epochs", "warmup_epochs"):
        if optim[key] is not None and (not isinstance(optim[key], int | float) or optim[key] < 0):
            raise ValueError(f"optim.{key} must be a non-negative number, got {optim[key]!r}")
    if not isinstance(data["batch_size"], int) or data["batch_size"] < 1:
        raise ValueError(f"data.batch_size must be a positive integer, got {data['batch_size']!r}")
    if not 0 < optim["layer_decay"] <= 1:
        raise ValueError(f"optim.layer_decay must be in (0, 1], got {optim['layer_decay']!r}")
    if optim["lr"] <= 0:
        raise ValueError(f"optim.lr must be positive, got {optim['lr']!r}")
    size = config["model"]["img_size"]
    if size is not None and (
        not isinstance(size, list | tuple) or len(size) != 2 or min(size) <= 0
    ):
        raise ValueError(f"model.img_size must be [H, W] or null, got {size!r}")
    if config["train"]["amp"] not in ("auto", "bf16", "off"):
        raise ValueError(f"train.amp must be auto, bf16 or off, got {config['train']['amp']!r}")
