"""A re-ID baseline without learning: HSV colour histograms of horizontal stripes.

Each image is cut into `stripes` horizontal bands; each band gets a joint HSV histogram
(`bins` = hue, saturation, value bins; hue wraps around), normalised to sum 1; the feature is
their concatenation, matched by cosine (as `clasp.eval.metrics.reid_metrics` does). Clothing
colour is the strongest cue of person re-ID that needs no training; a learnt backbone should
beat this. Use it as `clasp eval reid --checkpoint colour-histogram ...`.
"""

from __future__ import annotations

import torch

from clasp.data.transforms import IMAGENET_MEAN, IMAGENET_STD

NAME = "colour-histogram"


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the turn)."""
    r, g, b = rgb.unbind(-3)
    high, _ = rgb.max(-3)
    low, _ = rgb.min(-3)
    span = high - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    hue = torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)
    hue = torch.where(high == r, ((g - b) / safe) % 6, hue)
    hue = torch.where(span > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(high > 0, span / torch.where(high > 0, high, torch.ones_like(high)), 0)
    return torch.stack([hue, saturation, high], dim=-3)


def stripe_histograms(
    rgb: torch.Tensor, stripes: int = 6, bins: tuple[int, int, int] = (8, 4, 4)
) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, stripes * prod(bins)) per-stripe HSV histograms,
    each summing to 1. Stripe s holds rows [s H / stripes, (s + 1) H / stripes)."""
    B, _, H, W = rgb.shape
    if H < stripes:
        raise ValueError(f"images of height {H} cannot be cut into {stripes} stripes")
    hsv = rgb_to_hsv(rgb.float().clamp(0, 1))
    nh, ns, nv = bins
    h = (hsv[:, 0] * nh).long().clamp(max=nh - 1)
    s = (hsv[:, 1] * ns).long().clamp(max=ns - 1)
    v = (hsv[:, 2] * nv).long().clamp(max=nv - 1)
    cell = (h * ns + s) * nv + v  # (B, H, W)
    stripe = (torch.arange(H) * stripes // H).view(1, H, 1).expand(B, H, W)
    index = (torch.arange(B).view(B, 1, 1) * stripes + stripe) * (nh * ns * nv) + cell
    counts = torch.bincount(index.flatten(), minlength=B * stripes * nh * ns * nv).float()
    counts = counts.view(B, stripes, nh * ns * nv)
    return (counts / counts.sum(-1, keepdim=True).clamp(min=1)).flatten(1)


class ColourHistogramEncoder(torch.nn.Module):
    """The evaluation encoder interface (`clasp.eval.features`): `extract(images, task)`
    -> (histograms (B, D), the same as a 1 x 1 patch grid (B, 1, 1, D)); the task is ignored."""

    def __init__(self, stripes: int = 6, bins: tuple[int, int, int] = (8, 4, 4), size=(128, 64)):
        super().__init__()
        self.stripes, self.bins, self.img_size = stripes, tuple(bins), tuple(size)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    def extract(self, images: torch.Tensor, task=None) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = images * self.pixel_std + self.pixel_mean
        features = stripe_histograms(rgb.cpu(), self.stripes, self.bins).to(images.device)
        return features, features[:, None, None, :]
