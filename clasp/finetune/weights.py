"""The starting weights of a fine-tuning run, and the fine-tuned model file.

`--checkpoint` may be
- an export of `clasp export` (.safetensors, metadata format "clasp-backbone");
- a fine-tuned model of `clasp finetune` (`model.safetensors`, format "clasp-finetuned":
  the backbone under export names plus the recipe's head under `task_head.`);
- a training checkpoint (`checkpoint.pt` of `clasp pretrain` or `clasp finetune`);
- a plain state dict of a ViT (timm names, optionally under `module.`, `backbone.`, or in a
  "state_dict" / "model" entry) together with `--config` describing its model;
- a folder holding `model.safetensors` or `checkpoint.pt`;
- `random` with `--config` (a model or training YAML): the randomly initialised backbone.

A file whose keys or shapes do not fit the backbone is refused with a `CheckpointError` that
names the missing and unexpected keys and says what the file looks like. Position embeddings
are resampled when the fine-tuning size differs from the pre-training size.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clasp import RANDOM_WEIGHTS
from clasp.atomic import atomic_path
from clasp.model.io import (
    CLASP_KEY_PREFIXES,
    CheckpointError,
    export_state_dict,
    import_state_dict,
    is_safetensors,
    read_checkpoint,
    read_export,
    state_mismatch,
)
from clasp.model.io import FORMAT as EXPORT_FORMAT
from clasp.model.vit import ClaspViT, model_config

log = logging.getLogger("clasp.finetune")

FINETUNED_FORMAT = "clasp-finetuned"
HEAD_PREFIX = "task_head."
# Keys a foreign ViT may carry that a backbone does not need: a classification head.
IGNORED_FOREIGN = ("head.weight", "head.bias")


@dataclass
class Initial:
    """What a run starts from: the backbone, the head's weights when the file has a head of
    `recipe`, and a description of the source for the log and result.json."""

    backbone: ClaspViT
    head_state: dict[str, torch.Tensor] | None
    head_config: dict | None
    recipe: str | None
    description: str


def _listing(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def describe_state(state: dict[str, torch.Tensor]) -> str:
    """What a state dict looks like: its size, key prefixes and the ViT shape it implies."""
    prefixes = Counter(k.split(".", 1)[0] for k in state)
    top = ", ".join(f"{p} ({n})" for p, n in prefixes.most_common(4))
    parts = [f"{len(state)} tensors, key prefixes {top}"]
    proj = [k for k in state if k.endswith("patch_embed.proj.weight")]
    if proj:
        w = state[proj[0]]
        parts.append(f"a ViT with embed_dim {w.shape[0]}, patch {w.shape[-1]} ({proj[0]})")
        blocks = {int(m.group(1)) for k in state if (m := re.search(r"blocks\.(\d+)\.", k))}
        if blocks:
            parts.append(f"depth {max(blocks) + 1}")
        if any(".mlp.w_gate" in k for k in state):
            parts.append("with PC-MoE blocks")
    elif any(re.search(r"layers\.\d+\.blocks\.\d+\.", k) for k in state):
        parts.append("a Swin transformer (not a ViT)")
    elif any(re.search(r"layer\d\.\d+\.conv\d", k) for k in state):
        parts.append("a ResNet (not a ViT)")
    return "; ".join(parts)


def _check_fit(
    backbone: ClaspViT, state: dict, path: str, what: str, source: str, grid=None
) -> dict:
    """state with its pos_embed resampled to the backbone's grid (from the file's patch grid,
    `grid`); a CheckpointError naming missing, unexpected and mis-shaped keys if the rest
    does not fit exactly."""
    expected = backbone.state_dict()
    state = dict(state)
    pos = "vit.pos_embed"
    if pos in state and pos in expected and state[pos].shape != expected[pos].shape:
        state[pos] = _resample_pos_embed(backbone, state[pos], grid)
    mismatch = state_mismatch(export_names_of(expected), export_names_of(state))
    if mismatch:
        cfg = backbone.config
        parts = [f"{path} does not fit the backbone ({mismatch})"]
        parts.append(f"the file is {what}")
        parts.append(
            f"the backbone (from {source}) has embed_dim {cfg['embed_dim']}, depth "
            f"{cfg['depth']}, patch {cfg['patch_size']}, PC-MoE blocks {backbone.moe_blocks}"
        )
        parts.append(
            "pass an export of `clasp export`, a checkpoint.pt of `clasp pretrain`, or "
            "--config FILE describing the file's model"
        )
        raise CheckpointError("; ".join(parts))
    return state


def export_names_of(state: dict) -> dict:
    return {k.removeprefix("vit."): v for k, v in state.items()}


def _resample_pos_embed(backbone: ClaspViT, pos: torch.Tensor, grid) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    vit = backbone.vit
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    n = pos.shape[1] - prefix
    old = _grid_of(n, grid)
    if old is None:
        return pos  # _check_fit names the shape mismatch
    return resample_abs_pos_embed(
        pos, new_size=vit.patch_embed.grid_size, old_size=old, num_prefix_tokens=prefix
    )


def _grid_of(n: int, hint) -> tuple[int, int] | None:
    if hint and hint[0] * hint[1] == n:
        return tuple(hint)
    for h in range(int(n**0.5), 0, -1):  # the person aspect: taller than wide
        if n % h == 0:
            return (max(h, n // h), min(h, n // h))
    return None


def _model_overrides(config: dict, overrides: dict) -> tuple[dict, tuple[int, int] | None]:
    """(the model config with the fine-tuning overrides (None values keep the file's), the
    patch grid of the file's own image size)."""
    config = model_config(config)
    patch = config["patch_size"]
    grid = tuple(s // patch for s in config["img_size"])
    for key, value in overrides.items():
        if value is not None:
            config[key] = list(value) if key == "img_size" else value
    return model_config(config), grid


def _foreign_state(value) -> dict[str, torch.Tensor] | None:
    """The tensors of a plain state dict (possibly nested one level), keys normalised to the
    backbone's names; None if value holds no tensors."""
    if isinstance(value, dict):
        for key in ("state_dict", "model", "student", "teacher"):
            if isinstance(value.get(key), dict):
                value = value[key]
                break
    if not isinstance(value, dict) or not any(isinstance(v, torch.Tensor) for v in value.values()):
        return None
    state = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "backbone.", "base.", "encoder."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_initial(
    checkpoint: str,
    config_path: str | None,
    model_overrides: dict,
    *,
    seed: int = 0,
) -> Initial:
    """The backbone (training mode, CPU) and any head of `checkpoint`; see the module doc."""
    if checkpoint == RANDOM_WEIGHTS:
        if config_path is None:
            raise CheckpointError("--checkpoint random needs --config FILE (the model to build)")
        config, _ = _model_overrides(model_config(config_path), model_overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = ClaspViT(config)
        return Initial(backbone, None, None, None, f"random init ({config_path}, seed {seed})")
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--checkpoint: no file or folder at {checkpoint}")
    if os.path.isdir(checkpoint):
        for name in ("model.safetensors", "checkpoint.pt"):
            if os.path.isfile(os.path.join(checkpoint, name)):
                checkpoint = os.path.join(checkpoint, name)
                break
        else:
            raise FileNotFoundError(
                f"--checkpoint {checkpoint} is a folder without model.safetensors or checkpoint.pt"
            )
    head_state = head_config = recipe = None
    if is_safetensors(checkpoint):
        with safe_open(checkpoint, framework="pt") as f:
            meta = f.metadata() or {}
        kind = meta.get("format")
        if kind == EXPORT_FORMAT:
            state, config = read_export(checkpoint)
            config.pop("default_task", None)
            state, what = import_state_dict(state), "a clasp export"
        elif kind == FINETUNED_FORMAT:
            state, config, head_state, head_config, recipe = read_finetuned(checkpoint)
            what = f"a clasp {recipe} fine-tuned model"
        else:
            with safe_open(checkpoint, framework="pt") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}
            return _from_foreign(checkpoint, raw, config_path, model_overrides, "safetensors")
    else:
        value = read_checkpoint(checkpoint)
        if isinstance(value, dict) and "model" in value and "config" in value:
            train_config = value["config"]
            recipe = train_config.get("recipe") if isinstance(train_config, dict) else None
            model = value["model"]
            state = {k[9:]: v for k, v in model.items() if k.startswith("backbone.")}
            if recipe:
                head_state = {
                    k.removeprefix("head."): v for k, v in model.items() if k.startswith("head.")
                }
                head_config = value.get("head_config")
                what = f"a clasp {recipe} fine-tuning checkpoint (step {value.get('step')})"
            else:
                what = f"a clasp pre-training checkpoint (step {value.get('step')})"
            if not state:
                raise CheckpointError(
                    f"{checkpoint} is {what} without backbone weights (keys "
                    f"{_listing(model)}); its model does not look like a clasp model"
                )
            config = value.get("backbone_config") or model_config(train_config)
        else:
            state = _foreign_state(value)
            if state is None:
                raise CheckpointError(
                    f"{checkpoint} holds no tensors (a {type(value).__name__}); pass a "
                    ".safetensors export or a checkpoint.pt"
                )
            return _from_foreign(checkpoint, state, config_path, model_overrides, "torch")
    config, grid = _model_overrides(config, model_overrides)
    backbone = ClaspViT(config)
    state = _check_fit(backbone, state, checkpoint, what, "its own config", grid)
    backbone.load_state_dict(state, strict=True)
    return Initial(backbone, head_state, head_config, recipe, f"{what} ({checkpoint})")


def _from_foreign(path, state, config_path, model_overrides, container) -> Initial:
    what = f"a {container} state dict that is not a clasp file: {describe_state(state)}"
    if config_path is None:
        raise CheckpointError(
            f"{path} is {what}; pass --config FILE with its model (embed_dim, depth, patch_size, "
            "moe.blocks: [] for a plain ViT) to load it, or use a clasp export"
        )
    state = import_state_dict({k: v for k, v in state.items() if k not in IGNORED_FOREIGN})
    config, grid = _model_overrides(model_config(config_path), model_overrides)
    backbone = ClaspViT(config)
    # A plain ViT has no prompts or prompt modulation: they keep their initialisation.
    fresh = {k: v for k, v in backbone.state_dict().items() if k.startswith(CLASP_KEY_PREFIXES)}
    added = [k for k in fresh if k not in state]
    state = {**{k: fresh[k].detach().clone() for k in added}, **state}
    state = _check_fit(backbone, state, path, what, config_path, grid)
    if added:
        log.warning("%s has no %s; they start from their initialisation", path, _listing(added))
    backbone.load_state_dict(state, strict=True)
    return Initial(backbone, None, None, None, f"{path} ({describe_state(state)})")


# -- the fine-tuned model file ----------------------------------------------------------------
def save_finetuned(
    path: str,
    backbone: ClaspViT,
    head: torch.nn.Module,
    *,
    recipe: str,
    head_config: dict,
    task,
    metadata: dict | None = None,
) -> None:
    """backbone (export names) + head (`task_head.` names) as one safetensors file, atomically."""
    state = export_state_dict(backbone)
    state.update({HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in
                  head.state_dict().items()})  # fmt: skip
    meta = {
        "format": FINETUNED_FORMAT,
        "version": "1",
        "recipe": recipe,
        "config": json.dumps(backbone.config),
        "head": json.dumps(head_config),
        "task": json.dumps(task),
        **{k: json.dumps(v) for k, v in (metadata or {}).items()},
    }
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=meta)


def read_finetuned(path: str):
    """(backbone state under module names, model config, head state, head config, recipe)."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    head = {k.removeprefix(HEAD_PREFIX): v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    backbone = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
    config = json.loads(meta["config"])
    return import_state_dict(backbone), config, head, json.loads(meta["head"]), meta["recipe"]
