"""Saving and loading backbones: exported safetensors files and training checkpoints.

An exported file holds the backbone's state dict under timm's VisionTransformer names
(`patch_embed.proj.weight`, `blocks.3.attn.qkv.weight`, ...), plus the clasp-specific keys
of the PC-MoE blocks (`blocks.<i>.mlp.{w_gate,w_prompt,w1,b1,w2,b2}` in place of `fc1`/`fc2`)
the task prompts (`prompts.embedding`, `prompts.norm.*`) and the prompt modulation of the
blocks (`modulation.<i>.{scale,shift}.*`). Its safetensors metadata holds the model config
as JSON, so the file alone rebuilds the backbone.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clasp.atomic import atomic_path

from .prompts import TaskSpec
from .vit import ClaspViT, model_config

FORMAT = "clasp-backbone"
VERSION = "1"
# Backbone keys outside timm's ViT, kept beside it under these names in an export.
CLASP_KEY_PREFIXES = ("prompts.", "modulation.")


def export_state_dict(backbone: ClaspViT) -> dict[str, torch.Tensor]:
    """The backbone's weights under exported names (timm names for the ViT)."""
    out = {}
    for name, tensor in backbone.state_dict().items():
        key = name.removeprefix("vit.") if name.startswith("vit.") else name
        out[key] = tensor.detach().cpu().contiguous()
    return out


def import_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k if k.startswith(CLASP_KEY_PREFIXES) else f"vit.{k}": v for k, v in state.items()}


def save_backbone(
    backbone: ClaspViT, path: str, *, default_task: TaskSpec = None, metadata: dict | None = None
) -> None:
    """Write the backbone to a safetensors file, atomically (temp file + rename)."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(backbone.config),
        "default_task": json.dumps(default_task if isinstance(default_task, str | dict) else None),
        **{k: json.dumps(v) for k, v in (metadata or {}).items()},
    }
    with atomic_path(path) as tmp:
        save_file(export_state_dict(backbone), tmp, metadata=meta)


def read_export(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict under exported names, model config) of an exported file."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a clasp backbone export (metadata format "
                f"{meta.get('format')!r}); make one with `clasp export`"
            )
        state = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    config["default_task"] = json.loads(meta.get("default_task", "null"))
    return state, config


def with_legacy_prompt(config: dict) -> dict:
    """A stored model config from before prompt conditioning was configurable: its backbone
    had raw prompts in the router and no modulation."""
    if "prompt" in config:
        return config
    return {**config, "prompt": {"normalize": False, "routing": True, "modulation": "none"}}


def timm_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights a plain timm VisionTransformer can take from an export: everything but the
    PC-MoE blocks' router/expert weights, the prompt modulation and the prompts. Load with
    `strict=False`; the MoE blocks' `mlp.fc1` / `mlp.fc2` stay missing, since a routed layer
    has no dense equivalent."""
    state, config = read_export(path)
    moe_blocks = {i % config["depth"] for i in config["moe"]["blocks"]}
    moe_prefixes = tuple(f"blocks.{i}.mlp." for i in moe_blocks)
    return {
        k: v for k, v in state.items() if not k.startswith((*moe_prefixes, *CLASP_KEY_PREFIXES))
    }


def load_backbone(
    path: str,
    task: TaskSpec = None,
    *,
    weights: str = "student",
    kernels: str | None = None,
    device: str | torch.device = "cpu",
) -> ClaspViT:
    """A backbone in eval mode from an exported safetensors file or a training checkpoint.

    task: default task of `extract` (a name or {name: weight} mix); None keeps the one
    stored at export, else "generic". weights: from a checkpoint, "student" or the EMA
    "teacher". kernels: override the MoE kernel backend ("auto", "triton", "reference").
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no backbone file at {path}")
    if _is_safetensors(path):
        state, config = read_export(path)
        default_task = config.pop("default_task")
        config = with_legacy_prompt(config)
        state = import_state_dict(state)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if "model" not in checkpoint or "config" not in checkpoint:
            raise ValueError(f"{path} is neither a clasp export nor a clasp training checkpoint")
        if weights not in ("student", "teacher"):
            raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
        source = checkpoint["model"] if weights == "student" else checkpoint["teacher"]
        state = {
            k.removeprefix("backbone."): v for k, v in source.items() if k.startswith("backbone.")
        }
        config = model_config(with_legacy_prompt(checkpoint["config"].get("model", {})))
        default_task = None
    if kernels is not None:
        config["kernels"] = kernels
    backbone = ClaspViT(config)
    backbone.load_state_dict(state, strict=True)
    backbone.default_task = task if task is not None else default_task
    if backbone.default_task is not None:
        backbone.prompts.weights(backbone.default_task, 1, torch.device("cpu"))  # validates
    return backbone.to(device).eval()


def _is_safetensors(path: str) -> bool:
    try:
        with safe_open(path, framework="pt"):
            return True
    except Exception:  # safetensors raises its own error types for non-safetensors files
        return False
