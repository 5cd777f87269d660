"""The frozen CLIP teacher: loading an open_clip model, dense patch features and pseudo-labels.

Where the teacher comes from (`load_teacher`):
- an open_clip model name with a pretrained tag (`"ViT-B-16", "openai"`) or a local
  checkpoint file (`"ViT-B-16", "/models/vit_b16.safetensors"`); `pretrained="random"`
  builds randomly initialised weights on purpose (tests, benchmarks);
- a directory holding `open_clip_config.json` (`{"model_cfg": {...}, "preprocess_cfg":
  {...}}`) and `open_clip_model.safetensors` (or a `.pt`/`.bin` state dict): what
  `save_teacher` writes and what open_clip itself reads as `local-dir:`;
- a model config dict or such a JSON file, plus `pretrained=<checkpoint path>`.

How a person crop is seen: the whole crop is resized (stretched) to the model's square input
S x S, so every token lands on the crop and none is spent on padding. The stored part grid
(gh, gw) therefore covers the whole image: cell (i, j) is image rows
[i * H / gh, (i + 1) * H / gh) and columns [j * W / gw, (j + 1) * W / gw). A training loader
crops, flips and resizes it together with the image (nearest-neighbour for labels).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from clasp.kernels import patch_text_labels

from . import DENSE_MODES, RANDOM_WEIGHTS
from .prompts import Prompts

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_model.pt", "open_clip_pytorch_model.bin")
REACHABILITY_TIMEOUT_S = 3.0


class TeacherLoadError(RuntimeError):
    """The teacher's config or weights could not be found or loaded."""


@dataclass(frozen=True)
class TextEmbeddings:
    parts: torch.Tensor  # (C, E) fp32, L2-normalised, in `Prompts.part_names` order
    attributes: torch.Tensor  # (A, E) fp32, L2-normalised, in `Prompts.attribute_names` order
    group_sizes: tuple[int, ...]  # values per attribute group; sums to A


class ClipTeacher(nn.Module):
    """A frozen open_clip model with a VisionTransformer image tower, ready to label images.

    `description` identifies the weights (it is stored in label caches); `dense` picks the
    dense feature path, "maskclip" or "plain" (see `dense_features`).
    """

    def __init__(self, model: nn.Module, tokenizer, description: str, dense: str = "maskclip"):
        super().__init__()
        visual = getattr(model, "visual", None)
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise TypeError(
                f"teacher {description}: dense patch labels need an open_clip VisionTransformer "
                f"image tower, got {type(visual).__name__}; choose a ViT-based CLIP model"
            )
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise TypeError(
                f"teacher {description}: image towers with attentional pooling (CoCa) or "
                f"pool_type={visual.pool_type!r} are not supported; use a ViT CLIP model"
            )
        if dense not in DENSE_MODES:
            raise ValueError(f"dense must be one of {DENSE_MODES}, got {dense!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.description = description
        self.dense = dense
        cfg = open_clip.get_model_preprocess_cfg(model)
        self.register_buffer("mean", torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)))
        self.register_buffer("std", torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)))

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.model.visual.image_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.visual.grid_size)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def default_temperature(self) -> float:
        """1 / logit_scale of the CLIP model (about 0.01 for trained CLIPs)."""
        return float(1.0 / self.model.logit_scale.detach().float().exp().clamp(max=100.0))

    def resize(self, image: Image.Image) -> torch.Tensor:
        """A PIL image stretched to the model input: (3, S, S) uint8 (see module doc)."""
        height, width = self.image_size
        resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> normalised float input on the teacher's device."""
        images = images.to(self.device, non_blocking=True).float().div_(255.0)
        return (images - self.mean[:, None, None]) / self.std[:, None, None]

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def class_embeddings(self, classes: list[list[str]], templates: list[str]) -> torch.Tensor:
        """One embedding per class: each prompt through every template, L2-normalised,
        averaged over the class's prompts and templates, then re-normalised. -> (C, E)."""
        texts = [
            template.format(p) for prompts in classes for p in prompts for template in templates
        ]
        embedded = self.encode_text(texts)
        counts = torch.tensor([len(p) * len(templates) for p in classes], device=self.device)
        owner = torch.repeat_interleave(torch.arange(len(classes), device=self.device), counts)
        sums = embedded.new_zeros(len(classes), embedded.shape[1]).index_add_(0, owner, embedded)
        return F.normalize(sums / counts[:, None], dim=-1)

    def text_embeddings(self, prompts: Prompts) -> TextEmbeddings:
        values = [v for group in prompts.attributes.values() for v in group.values()]
        return TextEmbeddings(
            parts=self.class_embeddings(list(prompts.parts.values()), prompts.templates),
            attributes=self.class_embeddings(values, prompts.templates),
            group_sizes=tuple(prompts.group_sizes),
        )

    def _tokens_before_last_block(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        blocks = visual.transformer.resblocks
        if not visual.transformer.batch_first:
            raise TypeError(f"teacher {self.description}: sequence-first transformers unsupported")
        for block in blocks[:-1]:
            x = block(x)
        return x

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        if visual.final_ln_after_pool:
            pooled = visual.ln_post(x[:, 1:].mean(1) if visual.pool_type == "avg" else x[:, 0])
        else:
            x = visual.ln_post(x)
            pooled = x[:, 1:].mean(1) if visual.pool_type == "avg" else x[:, 0]
        return pooled @ visual.proj

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embedding (B, E) and dense patch features (B, gh * gw, E), not normalised.

        "plain": the final patch tokens through ln_post and the visual projection.
        "maskclip": the last block's value path (value projection of its normed input, the
        attention output projection) through ln_post and the projection, skipping the
        query-key mixing, the residual and the MLP: each token keeps its own content, which
        localises far better than the final tokens of a CLIP trained on pooled embeddings.
        """
        visual = self.model.visual
        x = self._tokens_before_last_block(pixels)
        last = visual.transformer.resblocks[-1]
        final = last(x)
        pooled = self._pooled(final)
        tokens = _value_path(last, x) if self.dense == "maskclip" else final
        dense = visual.ln_post(tokens[:, 1:]) @ visual.proj
        return pooled, dense

    @torch.no_grad()
    def label(
        self,
        images: torch.Tensor,
        text: TextEmbeddings,
        *,
        temperature: float | None = None,
        threshold: float | None = None,
        backend: str = "auto",
    ) -> dict[str, torch.Tensor]:
        """Pseudo-labels of a batch of (B, 3, S, S) uint8 images (from `resize`).

        Returns parts (B, gh, gw) int64 (-1 under threshold), part_confidence (B, gh, gw)
        fp32 and attributes (B, A) fp32: a softmax per attribute group over the cosine of
        the pooled image embedding with each value's text embedding, over temperature.
        """
        temperature = self.default_temperature if temperature is None else temperature
        pixels = self.normalize(images)
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            pooled, dense = self.encode_image(pixels)
        B = images.shape[0]
        gh, gw = self.grid_size
        parts = patch_text_labels(
            dense, text.parts, temperature, threshold=threshold, backend=backend
        )
        logits = F.normalize(pooled.float(), dim=-1) @ text.attributes.T / temperature
        attributes = torch.cat(
            [g.softmax(dim=-1) for g in logits.split(list(text.group_sizes), dim=-1)], dim=-1
        )
        return {
            "parts": parts.labels.view(B, gh, gw),
            "part_confidence": parts.confidence.view(B, gh, gw),
            "attributes": attributes,
        }


def _value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention branch of `block` with every token attending only to itself."""
    attn = block.attn
    y = block.ln_1(x)
    width = y.shape[-1]
    if isinstance(attn, nn.MultiheadAttention):
        if attn._qkv_same_embed_dim:
            weight = attn.in_proj_weight[2 * width :]
        else:
            weight = attn.v_proj_weight
        bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
        out = attn.out_proj(F.linear(y, weight, bias))
    elif isinstance(attn, open_clip.transformer.Attention):
        bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
        v = F.linear(y, attn.in_proj_weight[2 * width :], bias)
        if attn.head_scale is not None:
            B, L, _ = v.shape
            v = (v.view(B, L, attn.num_heads, -1) * attn.head_scale.view(1, 1, -1, 1)).flatten(2)
        out = attn.out_proj(attn.ln_inner(v))
        out = block.ln_attn(out) if hasattr(block, "ln_attn") else out
    else:
        raise TypeError(f"maskclip dense features: unsupported attention {type(attn).__name__}")
    return block.ls_1(out)


# ---------------------------------------------------------------------------------------------
# Loading and saving


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
    weights = os.path.join(directory, WEIGHTS_FILES[0])
    save_model(model, weights + ".tmp")
    os.replace(weights + ".tmp", weights)
    config_path = os.path.join(directory, CONFIG_FILE)
    with open(config_path + ".tmp", "w") as f:
        json.dump(full, f, indent=1)
    os.replace(config_path + ".tmp", config_path)
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
    weights_label = "random" if weights == RANDOM_WEIGHTS else os.path.basename(weights)
    return model, tokenizer, f"{directory} (weights: {weights_label})"


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
    with _offline_unless_reachable():
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


def _reachable(url: str) -> bool:
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=REACHABILITY_TIMEOUT_S).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_unless_reachable():
    """Switch the Hugging Face hub client to offline mode while loading when the hub cannot
    be reached: cached weights still load, missing ones fail at once instead of after a
    minute of retries. (The client reads HF_HUB_OFFLINE once, at import.)"""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    env_offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    offline = constants.HF_HUB_OFFLINE or env_offline or not _reachable(constants.ENDPOINT)
    previous_constant, previous_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    if offline:
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous_constant
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env
