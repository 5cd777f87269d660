"""Saving and loading backbones: exported safetensors files and training checkpoints.

An exported file holds the backbone's state dict under timm's VisionTransformer names
(`patch_embed.proj.weight`, `blocks.3.attn.qkv.weight`, ...), plus the clasp-specific keys
of the PC-MoE blocks (`blocks.<i>.mlp.{w_gate,w_prompt,w1,b1,w2,b2}` in place of `fc1`/`fc2`)
the task prompts (`prompts.embedding`, `prompts.norm.*`) and the prompt modulation of the
blocks (`modulation.<i>.{scale,shift}.*`). Its safetensors metadata holds the model config
as JSON, so the file alone rebuilds the backbone. Pre-training heads that downstream code
uses (the image-text projection) may ride along under `heads.<name>.`; the backbone loaders
leave them out.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clasp.atomic import atomic_path

from .prompts import TaskSpec
from .vit import ClaspViT, model_config

FORMAT = "clasp-backbone"
VERSION = "1"
# Backbone keys outside timm's ViT, kept beside it under these names in an export.
CLASP_KEY_PREFIXES = ("prompts.", "modulation.")
# Pre-training heads kept in an export for downstream use; not part of the backbone.
HEADS_KEY_PREFIX = "heads."


class CheckpointError(ValueError):
    """A training checkpoint or exported backbone that cannot be read (truncated, damaged,
    not a state dict) or whose weights do not fit the model it describes; the message names
    the file, what is wrong and what to do."""


def read_checkpoint(path: str) -> dict:
    """A `torch.save` dict read with `weights_only=True` (no pickled code runs), on CPU.
    Raises FileNotFoundError, or CheckpointError for a truncated or damaged file, a file
    that is not a torch checkpoint, or one that holds pickled objects (a whole nn.Module)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # neither a zip nor a pickle
        raise CheckpointError(
            f"cannot read {path}: it is not a torch checkpoint (no zip or pickle header); "
            "pass a file written by torch.save, or a complete copy of it"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise CheckpointError(
                f"{path} holds pickled Python objects (such as an nn.Module saved whole), "
                "which clasp does not unpickle; save a state dict instead "
                "(torch.save(model.state_dict(), ...)) or a training checkpoint"
            ) from error
        raise CheckpointError(f"{path} is not a torch checkpoint ({error})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError) as error:
        reason = str(error).split(". ")[0].splitlines()[0] or type(error).__name__
        raise CheckpointError(
            f"cannot read {path}: it is truncated, damaged or not a torch checkpoint "
            f"({reason}); use a complete copy of the file"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def export_state_dict(backbone: ClaspViT) -> dict[str, torch.Tensor]:
    """The backbone's weights under exported names (timm names for the ViT)."""
    out = {}
    for name, tensor in backbone.state_dict().items():
        key = name.removeprefix("vit.") if name.startswith("vit.") else name
        out[key] = tensor.detach().cpu().contiguous()
    return out


def export_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A backbone state dict under exported names (the inverse of `import_state_dict`)."""
    return {k.removeprefix("vit."): v for k, v in state.items()}


def import_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k if k.startswith(CLASP_KEY_PREFIXES) else f"vit.{k}": v for k, v in state.items()}


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
    """(state dict under exported names, model config) of an exported file. Raises
    CheckpointError for a file that is truncated, damaged or not a clasp export."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(
                    f"{path} is not a clasp backbone export (metadata format "
                    f"{meta.get('format')!r}); make one with `clasp export`"
                )
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as error:
        raise CheckpointError(
            f"cannot read {path}: it is truncated or damaged ({error}); export it again "
            "with `clasp export`"
        ) from error
    try:
        config = json.loads(meta["config"])
        config["default_task"] = json.loads(meta.get("default_task", "null"))
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path}: its metadata holds no readable model config ({type(error).__name__}: "
            f"{error}); export it again with `clasp export`"
        ) from error
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
        k: v
        for k, v in state.items()
        if not k.startswith((*moe_prefixes, *CLASP_KEY_PREFIXES, HEADS_KEY_PREFIX))
    }


def load_backbone(
    path: str,
    task: TaskSpec = None,
    *,
    weights: str = "student",
    kernels: str | None = None,
    device: str | torch.device = "cpu",
    checkpoint: dict | None = None,
) -> ClaspViT:
    """A backbone in eval mode from an exported safetensors file or a training checkpoint.

    task: default task of `extract` (a name or {name: weight} mix); None keeps the one
    stored at export, else "generic". weights: from a checkpoint, "student" or the EMA
    "teacher". kernels: override the MoE kernel backend ("auto", "triton", "reference").
    checkpoint: the training checkpoint at path when the caller has read it already.
    Every way a file can fail to load is a FileNotFoundError or a `CheckpointError` naming
    the file, what is wrong and what to do (see `read_checkpoint`, `read_export`).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no backbone file at {path}")
    if weights not in ("student", "teacher"):
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    if is_safetensors(path):
        state, config = read_export(path)
        default_task = config.pop("default_task")
        config = with_legacy_prompt(config)
        state = import_state_dict(
            {k: v for k, v in state.items() if not k.startswith(HEADS_KEY_PREFIX)}
        )
        what = "the model config stored with them"
    else:
        checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
        if not isinstance(checkpoint.get("model"), dict) or "config" not in checkpoint:
            raise CheckpointError(
                f"{path} is neither a clasp export nor a clasp training checkpoint (it has "
                f"no model and config entries); pass a file from `clasp pretrain` or "
                "`clasp export`"
            )
        source = checkpoint["model"] if weights == "student" else checkpoint.get("teacher")
        if not isinstance(source, dict):
            raise CheckpointError(f"{path} holds no {weights} weights")
        state = {
            k.removeprefix("backbone."): v for k, v in source.items() if k.startswith("backbone.")
        }
        config = checkpoint["config"]
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            config = with_legacy_prompt(config["model"])
        default_task = None
        what = "the training config stored with them"
    try:
        config = model_config(config)
        if kernels is not None:
            config["kernels"] = kernels
        backbone = ClaspViT(config)
    except (KeyError, ValueError, TypeError) as error:
        reason = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise CheckpointError(
            f"{path}: {what} does not describe a backbone ({reason}); the file was edited or "
            "written by another version: export or train it again"
        ) from error
    mismatch = state_mismatch(export_names(backbone.state_dict()), export_names(state))
    if mismatch:
        raise CheckpointError(
            f"{path}: its weights do not fit {what} ({mismatch}); the file was edited or "
            "written by another version: export or train it again"
        )
    backbone.load_state_dict(state, strict=True)
    backbone.default_task = task if task is not None else default_task
    if backbone.default_task is not None:
        backbone.prompts.weights(backbone.default_task, 1, torch.device("cpu"))  # validates
    return backbone.to(device).eval()


def state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """'' when `found` has exactly `expected`'s keys and shapes, else what differs (a few
    names of each kind)."""

    def some(names) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    shapes = [
        f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & found.keys())
        if found[k].shape != expected[k].shape
    ]
    parts = [f"{len(missing)} missing: {some(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected: {some(unexpected)}"] if unexpected else []
    parts += [f"{len(shapes)} of other shapes: {some(shapes)}"] if shapes else []
    return "; ".join(parts)


def is_safetensors(path: str) -> bool:
    """By content: a safetensors file starts with its JSON header's 8-byte length and '{';
    a torch checkpoint is a zip or a pickle. A damaged file named .safetensors counts as
    one, so that its error says what it is."""
    with open(path, "rb") as f:
        head = f.read(9)
    header_length = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and 8 + header_length <= os.path.getsize(path):
        return True
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return False
    return path.endswith(".safetensors")


def read_head(
    path: str, name: str, *, weights: str = "student", checkpoint: dict | None = None
) -> dict[str, torch.Tensor] | None:
    """The state dict of the pre-training head `name` (e.g. "image_text") kept in an export
    (`heads.<name>.*`) or a training checkpoint (the model's `<name>_head.*`; `weights`: the
    "student" or the EMA "teacher"; `checkpoint`: its content when already read); None when
    the file has no such head."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no backbone file at {path}")
    if is_safetensors(path):
        prefix = f"{HEADS_KEY_PREFIX}{name}."
        with safe_open(path, framework="pt") as f:
            keys = [k for k in f.keys() if k.startswith(prefix)]
            state = {k.removeprefix(prefix): f.get_tensor(k) for k in keys}
    else:
        checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
        source = checkpoint.get("model" if weights == "student" else "teacher") or {}
        prefix = f"{name}_head."
        state = {k.removeprefix(prefix): v for k, v in source.items() if k.startswith(prefix)}
    return state or None


def read_metadata(path: str, checkpoint: dict | None = None) -> dict:
    """The metadata of an export (`save_backbone`'s, JSON-decoded: "config" is the model
    config), or of a training checkpoint {"training_config": its full training config};
    `checkpoint`: the training checkpoint's content when already read."""
    if is_safetensors(path):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version")}
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    return {"training_config": checkpoint.get("config", {})}
