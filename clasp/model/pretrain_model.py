"""The backbone with its pre-training heads, run over all crops of a batch in one forward.

One module (and so one DDP forward per step) handles both crop resolutions: DDP expects a
single forward per backward, and the global and local crops need two backbone passes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .heads import AttributeHead, DINOHead, ImageTextHead, PartHead
from .vit import ClaspViT

HEAD_DEFAULTS = {
    "dino": {
        "out_dim": 4096,
        "hidden_dim": 2048,
        "bottleneck_dim": 256,
        "nlayers": 3,
        "norm_last_layer": True,
    },
}


class PretrainModel(nn.Module):
    """backbone + DINO head (+ part head, + attribute head when their labels are trained,
    + image-text head into a text space of text_dim when image-text alignment is trained,
    + joint head over num_joints part pairs when the joint loss is trained).

    forward(global_crops (G*B, 3, H, W), task_weights (B, n_tasks), local_crops (L*B, 3, h, w)
    or None) with crops ordered crop-major (all samples of crop 0, then crop 1, ...) returns
    a dict:
        dino_global (G*B, K), dino_local (L*B, K) or None,
        part_logits (G*B, gh, gw, n_parts) or None, attribute_logits (G*B, A) or None,
        image_text (G*B, text_dim) or None and image_text_scale (scalar) or None,
        joint_logits (G*B, gh, gw, num_joints) or None,
        probs_mean (R, E), counts (R, E), z_loss (R,): routing statistics of every MoE layer
        and resolution (R = MoE layers x passes), for the auxiliary losses.
    """

    def __init__(
        self,
        backbone: ClaspViT,
        dino: dict,
        num_parts: int | None = None,
        num_attributes: int | None = None,
        text_dim: int | None = None,
        num_joints: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.dino_head = DINOHead(dim, **dino)
        self.part_head = PartHead(dim, num_parts) if num_parts else None
        self.attribute_head = AttributeHead(dim, num_attributes) if num_attributes else None
        # Built last, so that a model without it draws the same initial weights as before.
        self.image_text_head = ImageTextHead(dim, text_dim) if text_dim else None
        self.joint_head = PartHead(dim, num_joints) if num_joints else None  # per patch, too

    def forward(
        self,
        global_crops: torch.Tensor,
        task_weights: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        label_heads: bool = True,
    ) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {}
        routings = []
        tokens, r = self._tokens(global_crops, task_weights)
        routings += r
        prefix = self.backbone.vit.num_prefix_tokens
        pooled = tokens[:, 0]
        out["dino_global"] = self.dino_head(pooled)
        out["part_logits"] = out["attribute_logits"] = out["joint_logits"] = None
        patch_heads = {"part_logits": self.part_head, "joint_logits": self.joint_head}
        patch_heads = {k: h for k, h in patch_heads.items() if label_heads and h is not None}
        if patch_heads:
            gh, gw = self.backbone.grid_size(*global_crops.shape[2:])
            patches = tokens[:, prefix:].reshape(tokens.shape[0], gh, gw, -1)
            out.update({key: head(patches) for key, head in patch_heads.items()})
        if label_heads and self.attribute_head is not None:
            out["attribute_logits"] = self.attribute_head(pooled)
        out["image_text"] = out["image_text_scale"] = None
        if label_heads and self.image_text_head is not None:
            out["image_text"], out["image_text_scale"] = self.image_text_head(pooled)
        out["dino_local"] = None
        if local_crops is not None and local_crops.shape[0] > 0:
            tokens, r = self._tokens(local_crops, task_weights)
            routings += r
            out["dino_local"] = self.dino_head(tokens[:, 0])
        if routings:
            out["probs_mean"] = torch.stack([r.probs_mean for r in routings])
            out["counts"] = torch.stack([r.counts for r in routings])
            out["z_loss"] = torch.stack([r.z_loss for r in routings])
        else:
            out["probs_mean"] = out["counts"] = out["z_loss"] = None
        return out

    def _tokens(self, crops: torch.Tensor, task_weights: torch.Tensor):
        B = task_weights.shape[0]
        if crops.shape[0] % B:
            raise ValueError(
                f"{crops.shape[0]} crops is not a whole number of crops per sample for B={B}"
            )
        weights = task_weights.repeat(crops.shape[0] // B, 1)
        return self.backbone.forward_tokens(crops, weights)
