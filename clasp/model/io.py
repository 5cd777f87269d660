"""Saving and loading backbones: exported safetensors files and training checkpoints.

An exported file holds the backbone's state dict under timm's VisionTransformer names
(`patch_embed.proj.weight`, `blocks.3.attn.qkv.weight`, ...), plus the clasp-specific keys
of the PC-MoE blocks (`blocks.<i>.mlp.{w_gate,w_prompt,w1,b1,w2,b2}` in place of `fc1`/`fc2`)
and the task prompts (`prompts.embedding`). Its safetensors metadata holds the model config
as JSON, so the file alone rebuilds the backbone. Pre-training heads that downstream code
uses (the image-text projection) may ride along under `heads.<name>.`; the backbone loaders
leave them out.
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
PROMPT_KEY_PREFIX = "prompts."
HEADS_KEY_PREFIX = "heads."


def export_state_dict(backbone: ClaspViT) -> dict[str, torch.Tensor]:
    """The backbone's weights under exported names (timm names for the ViT)."""
    out = {}
    for name, tensor in backbone.state_dict().items():
        key = name.removeprefix("vit.") if name.startswith("vit.") else name
        out[key] = tensor.detach().cpu().contiguous()
    return out


def import_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k if k.startswith(PROMPT_KEY_PREFIX) else f"vit.{k}": v for k, v in state.items()}


def save_backbone(
    backbone: ClaspViT,
    path: str,
    *,
    default_task: TaskSpec = None,
    metadata: dict | None = None,
    heads: dict[str, torch.nn.Module] | None = None,
) -> None:
    """Write the backbone to a safetensors file, atomically (temp file + rename); `heads`
    {name: module} are stored beside it under `heads.<name>.`."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(backbone.config),
        "default_task": json.dumps(default_task if isinstance(default_task, str | dict) else None),
        **{k: json.dumps(v) for k, v in (metadata or {}).items()},
    }
    tensors = export_state_dict(backbone)
    for name, head in (heads or {}).items():
        for key, tensor in head.state_dict().items():
            tensors[f"{HEADS_KEY_PREFIX}{name}.{key}"] = tensor.detach().cpu().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


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


def timm_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights a plain timm VisionTransformer can take from an export: everything but the
    PC-MoE blocks' router/expert weights and the prompts. Load with `strict=False`; the MoE
    blocks' `mlp.fc1` / `mlp.fc2` stay missing, since a routed layer has no dense equivalent."""
    state, config = read_export(path)
    moe_blocks = {i % config["depth"] for i in config["moe"]["blocks"]}
    moe_prefixes = tuple(f"blocks.{i}.mlp." for i in moe_blocks)
    return {
        k: v
        for k, v in state.items()
        if not k.startswith((*moe_prefixes, PROMPT_KEY_PREFIX, HEADS_KEY_PREFIX))
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
        state = import_state_dict(
            {k: v for k, v in state.items() if not k.startswith(HEADS_KEY_PREFIX)}
        )
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
        config = model_config(checkpoint["config"])
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


def read_head(path: str, name: str, *, weights: str = "student") -> dict[str, torch.Tensor] | None:
    """The state dict of the pre-training head `name` (e.g. "image_text") kept in an export
    (`heads.<name>.*`) or a training checkpoint (the model's `<name>_head.*`; `weights`: the
    "student" or the EMA "teacher"); None when the file has no such head."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no backbone file at {path}")
    if _is_safetensors(path):
        prefix = f"{HEADS_KEY_PREFIX}{name}."
        with safe_open(path, framework="pt") as f:
            keys = [k for k in f.keys() if k.startswith(prefix)]
            state = {k.removeprefix(prefix): f.get_tensor(k) for k in keys}
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        source = checkpoint.get("model" if weights == "student" else "teacher") or {}
        prefix = f"{name}_head."
        state = {k.removeprefix(prefix): v for k, v in source.items() if k.startswith(prefix)}
    return state or None


def read_metadata(path: str) -> dict:
    """The metadata of an export (`save_backbone`'s, JSON-decoded: "config" is the model
    config), or of a training checkpoint {"training_config": its full training config}."""
    if _is_safetensors(path):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version")}
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {"training_config": checkpoint.get("config", {})}
