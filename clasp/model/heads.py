"""Pre-training heads: DINO projection, part labels on patches, attributes on the pooled token,
and the image-text projection of the pooled token into a CLIP text space."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear to `out_dim` prototypes.

    x (B, in_dim) -> logits (B, out_dim). With `norm_last_layer` the prototype norms are fixed
    to 1 (the weight-norm gain is frozen), which keeps the softmax temperature meaningful.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(x)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return list(self.last_layer.parameters())


class PartHead(nn.Module):
    """Per-patch part classifier: patches (B, gh, gw, D) -> logits (B, gh, gw, n_parts)."""

    def __init__(self, in_dim: int, num_parts: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, num_parts)
        _init_linear(self.linear)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(patches))


class AttributeHead(nn.Module):
    """Attribute logits from the pooled token: (B, D) -> (B, A)."""

    def __init__(self, in_dim: int, num_attributes: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, num_attributes)
        _init_linear(self.linear)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(pooled))


class ImageTextHead(nn.Module):
    """The pooled token projected into a CLIP teacher's text-embedding space, with the
    learnable inverse temperature of the contrast: (B, D) -> ((B, E) not normalised, scalar).

    The temperature starts at CLIP's 0.07 and its inverse is clamped at 100, as CLIP's is.
    Kept in training checkpoints and exports (`clasp export`), so a student trained with
    `loss.image_text` searches images by text with it (`clasp eval text-search`)."""

    INIT_TEMPERATURE = 0.07
    MAX_LOGIT_SCALE = 100.0

    def __init__(self, in_dim: int, text_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, text_dim)
        _init_linear(self.linear)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.INIT_TEMPERATURE)))

    @property
    def text_dim(self) -> int:
        return self.linear.out_features

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.logit_scale.exp().clamp(max=self.MAX_LOGIT_SCALE)
        return self.linear(self.norm(pooled)), scale

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ImageTextHead:
        """The head of a state dict holding norm.*, linear.* and logit_scale."""
        text_dim, in_dim = state["linear.weight"].shape
        head = cls(in_dim, text_dim)
        head.load_state_dict(state, strict=True)
        return head.eval()


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
