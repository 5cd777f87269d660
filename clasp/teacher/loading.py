"""Loading and saving the CLIP teacher.

Where the teacher comes from (`load_teacher`):
- an open_clip model name with a pretrained tag (`"ViT-B-16", "openai"`) or a local
  checkpoint file (`"ViT-B-16", "/models/vit_b16.safetensors"`); `pretrained="random"`
  (`clasp.RANDOM_WEIGHTS`) builds randomly initialised weights on purpose (tests,
  benchmarks);
- a directory holding `open_clip_config.json` (`{"model_cfg": {...}, "preprocess_cfg":
  {...}}`) and `open_clip_model.safetensors` (or a `.pt`/`.bin` state dict): what
  `save_teacher` writes and what open_clip itself reads as `local-dir:`;
- a model config dict or such a JSON file, plus `pretrained=<checkpoint path>`.
"""

from __future__ import annotations

import difflib
import json
import os

import open_clip
import torch
import torch.nn as nn

from clasp import RANDOM_WEIGHTS
from clasp.atomic import atomic_path, write_json

from .hub import offline_unless_reachable
from .model import ClipTeacher

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_model.pt", "open_clip_pytorch_model.bin")


class TeacherLoadError(RuntimeError):
    """The teacher's config or weights could not be found or loaded."""


def save_teacher(model: nn.Module, config: dict, directory: str) -> str:
    """Save an open_clip model as `directory/open_clip_config.json` + `open_clip_model.safetensors`.

    `config` is the model config (embed_dim, vision_cfg, text_cfg, ...) or a dict with a
    "model_cfg" key (and optionally "preprocess_cfg"). The folder loads back with
    `load_teacher(directory)` and with `open_clip.create_model("local-dir:" + directory)`.
    Both files are written to temporaries first and renamed, so a kill leaves no torn file.
    """
    from safetensors.torch import save_model

    os.makedirs(directory, exist_ok=True)
    full = dict(config) if "model_cfg" in config else {"model_cfg": dict(config)}
    if "preprocess_cfg" not in full:
        cfg = {**_default_preprocess(model), **open_clip.get_model_preprocess_cfg(model)}
        full["preprocess_cfg"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    with atomic_path(os.path.join(directory, WEIGHTS_FILES[0])) as tmp:
        save_model(model, tmp)
    write_json(os.path.join(directory, CONFIG_FILE), full)
    return directory


def load_teacher(
    name_or_config: str | dict,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dense: str = "maskclip",
) -> ClipTeacher:
    """Build a frozen `ClipTeacher` (see the module doc for the accepted sources).

    Raises TeacherLoadError within seconds when weights are missing: no network (the hub is
    probed first and offline mode set when it is unreachable, so cached weights still load),
    an unknown tag, or a path that does not exist; the message names the model, the tag
    and how to pass a local file.
    """
    if isinstance(name_or_config, dict):
        model, tokenizer, description = _from_config(dict(name_or_config), pretrained, "config")
    elif os.path.isdir(name_or_config):
        model, tokenizer, description = _from_directory(name_or_config, pretrained)
    elif name_or_config.endswith(".json"):
        if not os.path.isfile(name_or_config):
            raise TeacherLoadError(f"teacher config file not found: {name_or_config}")
        with open(name_or_config) as f:
            raw = json.load(f)
        path = os.path.abspath(name_or_config)
        model, tokenizer, description = _from_config(raw.get("model_cfg", raw), pretrained, path)
    else:
        model, tokenizer, description = _from_name(name_or_config, pretrained)
    return ClipTeacher(model, tokenizer, description, dense).to(device)


def _from_config(cfg: dict, pretrained: str | None, source: str):
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = model_class(**cfg)
    description = f"{source} (weights: {pretrained or RANDOM_WEIGHTS})"
    if pretrained not in (None, RANDOM_WEIGHTS):
        if not os.path.isfile(pretrained):
            raise TeacherLoadError(f"teacher {source}: checkpoint file not found: {pretrained}")
        open_clip.load_checkpoint(model, pretrained)
        description = f"{source} (weights: {os.path.abspath(pretrained)})"
    open_clip.set_model_preprocess_cfg(model, _default_preprocess(model))
    text_cfg = cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=context_length
        )
    else:
        tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    return model, tokenizer, description


def _default_preprocess(model) -> dict:
    from open_clip.transform import PreprocessCfg

    cfg = vars(PreprocessCfg()).copy()
    cfg["size"] = model.visual.image_size
    return cfg


def _from_directory(directory: str, pretrained: str | None):
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise TeacherLoadError(
            f"teacher directory {directory} has no {CONFIG_FILE}; save one with "
            f"clasp.teacher.save_teacher(model, config, directory)"
        )
    weights = pretrained or next(
        (
            os.path.join(directory, w)
            for w in WEIGHTS_FILES
            if os.path.isfile(os.path.join(directory, w))
        ),
        None,
    )
    if weights is None:
        raise TeacherLoadError(
            f"teacher directory {directory} has {CONFIG_FILE} but no weights "
            f"({', '.join(WEIGHTS_FILES)}); pass --pretrained PATH to a state dict, or "
            f"--pretrained {RANDOM_WEIGHTS} for random weights"
        )
    with open(config_path) as f:
        raw = json.load(f)
    model, tokenizer, _ = _from_config(dict(raw.get("model_cfg", raw)), weights, directory)
    if "preprocess_cfg" in raw:
        cfg = open_clip.get_model_preprocess_cfg(model)
        open_clip.set_model_preprocess_cfg(model, {**cfg, **raw["preprocess_cfg"]})
    return model, tokenizer, f"{directory} (weights: {os.path.basename(weights)})"


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))


def _from_name(name: str, pretrained: str | None):
    is_hub = name.startswith(open_clip.factory.HF_HUB_PREFIX)
    if not is_hub and name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TeacherLoadError(
            f"unknown open_clip model {name!r}{hint} (open_clip.list_models() lists all), or "
            f"pass a directory with {CONFIG_FILE}"
        )
    if pretrained is None and not is_hub:
        raise TeacherLoadError(
            f"teacher {name!r}: say which weights to use: a pretrained tag "
            f"({_tags(name)}), a local checkpoint file, or {RANDOM_WEIGHTS!r}"
        )
    description = name if is_hub else f"{name} (pretrained: {pretrained})"
    if pretrained == RANDOM_WEIGHTS:
        model = open_clip.create_model(name, pretrained=None)
        return model, open_clip.get_tokenizer(name), description
    if pretrained is not None and (_looks_like_path(pretrained) or os.path.exists(pretrained)):
        if not os.path.isfile(pretrained):
            raise TeacherLoadError(
                f"teacher {name!r}: checkpoint file not found: {pretrained}; pass an existing "
                f"open_clip state dict (.pt, .bin or .safetensors)"
            )
        model = open_clip.create_model(name, pretrained=pretrained)
        return (
            model,
            open_clip.get_tokenizer(name),
            f"{name} (pretrained: {os.path.abspath(pretrained)})",
        )
    tag_cfg = None if is_hub else open_clip.get_pretrained_cfg(name, pretrained)
    if not is_hub and not tag_cfg:
        raise TeacherLoadError(
            f"teacher {name!r}: {pretrained!r} is neither a known pretrained tag ({_tags(name)}) "
            f"nor an existing file"
        )
    # Tags trained with QuickGELU (OpenAI's) need it in the architecture too.
    quick_gelu = bool(tag_cfg and tag_cfg.get("quick_gelu"))
    with offline_unless_reachable():
        try:
            model = open_clip.create_model(
                name,
                pretrained=None if is_hub else pretrained,
                force_quick_gelu=quick_gelu,
                require_pretrained=True,
            )
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as error:  # noqa: BLE001 - every download failure gets the same advice
            raise TeacherLoadError(
                _missing_weights_message(name, pretrained, tag_cfg, error)
            ) from error
    return model, tokenizer, description


def _tags(name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(name)
    return ", ".join(tags) if tags else "none known"


def _missing_weights_message(name, pretrained, tag_cfg, error) -> str:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    reason = reason if len(reason) <= 500 else reason[:500] + "..."
    if name.startswith(open_clip.factory.HF_HUB_PREFIX):
        how = (
            f"download the repo's {CONFIG_FILE} and weights into a folder and pass it as "
            f"--teacher DIR"
        )
    else:
        source = f" (Hugging Face hub repo {tag_cfg['hf_hub'].rstrip('/')})" if tag_cfg else ""
        how = (
            f"download the checkpoint elsewhere{source} and pass the file: --teacher {name} "
            f"--pretrained /path/to/open_clip_model.safetensors (or .bin/.pt), or a folder with "
            f"{CONFIG_FILE} and the weights as --teacher DIR"
        )
    return (
        f"could not load weights for open_clip model {name!r} with pretrained={pretrained!r}: "
        f"{reason} Without network access, {how}"
    )
