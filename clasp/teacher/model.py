"""The frozen CLIP teacher: an open_clip model that turns person crops into pseudo-labels.

`ClipTeacher` wraps an open_clip model with a VisionTransformer image tower (loading it from
a name, a folder or a file is `clasp.teacher.loading`): text embeddings of the prompts,
pooled and dense image features (the MaskCLIP value path by default), and part and
attribute labels through the fused `patch_text_labels` kernel.

How a person crop is seen: the whole crop is resized (stretched) to the model's square input
S x S, so every token lands on the crop and none is spent on padding. The stored part grid
(gh, gw) therefore covers the whole image: cell (i, j) is image rows
[i * H / gh, (i + 1) * H / gh) and columns [j * W / gw, (j + 1) * W / gw). A training loader
crops, flips and resizes it together with the image (nearest-neighbour for labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from clasp.kernels import patch_text_labels
from clasp.vocabulary import Prompts

from . import DENSE_MODES


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

    def _pooled(self, x: torch.Tensor, patch_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled embedding of the final tokens (B, L, D); with average pooling,
        patch_weights (B, L - 1) replace the plain mean by a weighted one."""
        visual = self.model.visual
        if visual.pool_type == "avg":
            patches = x[:, 1:] if visual.final_ln_after_pool else visual.ln_post(x[:, 1:])
            if patch_weights is None:
                mean = patches.mean(1)
            else:
                weights = patch_weights.to(x.dtype)
                weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-12)
                mean = torch.einsum("bp,bpd->bd", weights, patches)
            pooled = visual.ln_post(mean) if visual.final_ln_after_pool else mean
        else:
            pooled = visual.ln_post(x[:, 0])
        return pooled @ visual.proj

    def _class_attention_bias(
        self, patch_weights: torch.Tensor, block: nn.Module, x: torch.Tensor
    ) -> torch.Tensor:
        """An additive attention mask (B * heads, L, L): log(weight) on the class token's
        row over the patch columns (floored at log 1e-4: a patch is never quite shut out), 0
        everywhere else."""
        B, L, _ = x.shape
        heads = block.attn.num_heads
        bias = x.new_zeros(B, L, L)
        bias[:, 0, 1:] = patch_weights.to(x.dtype).clamp(min=1e-4).log()
        return bias.repeat_interleave(heads, dim=0)

    @torch.no_grad()
    def encode_image(
        self, pixels: torch.Tensor, patch_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embedding (B, E) and dense patch features (B, gh * gw, E), not normalised.

        "plain": the final patch tokens through ln_post and the visual projection.
        "maskclip": the last block's value path (value projection of its normed input, the
        attention output projection) through ln_post and the projection, skipping the
        query-key mixing, the residual and the MLP: each token keeps its own content, which
        localises far better than the final tokens of a CLIP trained on pooled embeddings.

        patch_weights (B, gh * gw) >= 0, optional, says where to look: the class token's
        attention over the patches in the last block is multiplied by them (and
        renormalised), so the pooled embedding reads the weighted region through the path
        CLIP was trained on (with average pooling, the final patches are averaged with these
        weights). The dense features do not change.
        """
        visual = self.model.visual
        x = self._tokens_before_last_block(pixels)
        last = visual.transformer.resblocks[-1]
        if patch_weights is None or visual.pool_type == "avg":
            final = last(x)
            pooled = self._pooled(final, patch_weights)
        else:
            final = last(x, attn_mask=self._class_attention_bias(patch_weights, last, x))
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
