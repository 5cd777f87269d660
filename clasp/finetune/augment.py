"""Training views for fine-tuning: one random similarity transform per sample that the image,
its label mask and its keypoints all follow, and random erasing.

Coordinates are continuous pixels (a pixel's centre at i + 0.5), as in `clasp.data.transforms`:
an output pixel centre (u, v) reads the source at `A @ (u, v, 1)`, with A a 2x3 matrix. The
view stretches the whole source to the output size (as evaluation does), then, about the
centre, mirrors, scales by s (s > 1 zooms in), rotates and shifts by whole output pixels.
Outside the source the image is black (the field's pad-and-crop fills zeros) and the mask
is ignore (-1).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from clasp.data.transforms import IMAGENET_MEAN, IMAGENET_STD

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def view_matrix(
    source_size: tuple[int, int],
    out_size: tuple[int, int],
    *,
    flip: bool = False,
    scale: float = 1.0,
    angle: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """(2, 3) float64 map from output pixel coordinates to source pixel coordinates.

    angle in degrees (counter-clockwise as seen in the output); shift (dx, dy) in output
    pixels (the content moves by +shift)."""
    (sh, sw), (oh, ow) = source_size, out_size
    a = math.radians(angle)
    rotation = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    mirror = np.diag([-1.0 if flip else 1.0, 1.0])
    stretch = np.diag([sw / ow, sh / oh])
    linear = stretch @ rotation @ mirror / scale
    centre_out = np.array([ow / 2 + shift[0], oh / 2 + shift[1]])
    offset = np.array([sw / 2, sh / 2]) - linear @ centre_out
    return np.concatenate([linear, offset[:, None]], axis=1)


def _grid(matrix: np.ndarray, source_size, out_size) -> torch.Tensor:
    """The grid_sample grid (1, oh, ow, 2) of `matrix` (align_corners=False)."""
    (sh, sw), (oh, ow) = source_size, out_size
    v, u = np.meshgrid(np.arange(oh) + 0.5, np.arange(ow) + 0.5, indexing="ij")
    x = matrix[0, 0] * u + matrix[0, 1] * v + matrix[0, 2]
    y = matrix[1, 0] * u + matrix[1, 1] * v + matrix[1, 2]
    grid = np.stack([2 * x / sw - 1, 2 * y / sh - 1], axis=-1).astype(np.float32)
    return torch.from_numpy(grid)[None]


def warp_image(image: torch.Tensor, matrix: np.ndarray, out_size) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, *out_size) in [0, 1], bilinear, black outside. A large
    downscale is antialiased first (bilinear sampling alone would alias)."""
    source = image.float()[None] / 255.0
    size = tuple(image.shape[-2:])
    shrink = min(out_size[0] / size[0], out_size[1] / size[1])
    if shrink < 0.5:  # resample to about twice the output first; the matrix scales with it
        smaller = (max(1, round(size[0] * 2 * shrink)), max(1, round(size[1] * 2 * shrink)))
        source = F.interpolate(source, smaller, mode="bilinear", antialias=True)
        matrix = np.diag([smaller[1] / size[1], smaller[0] / size[0]]) @ matrix
        size = smaller
    grid = _grid(matrix, size, out_size)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[
        0
    ]


def warp_mask(mask: torch.Tensor, matrix: np.ndarray, out_size) -> torch.Tensor:
    """int (H, W) labels -> int64 out_size by nearest neighbour; -1 outside the source."""
    grid = _grid(matrix, tuple(mask.shape), out_size)
    shifted = (mask.double() + 1)[None, None]  # 0 becomes "outside" under zero padding
    out = F.grid_sample(shifted, grid.double(), mode="nearest", align_corners=False)
    return out[0, 0].long() - 1


def warp_keypoints(
    keypoints: torch.Tensor, matrix: np.ndarray, out_size, flip_perm=None
) -> torch.Tensor:
    """(K, 3) source pixels -> (K, 3) output pixels; a mirrored view swaps left and right
    (`flip_perm`); keypoints that leave the view or were absent become (0, 0, 0)."""
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    kp = keypoints.double().numpy()
    xy = kp[:, :2] @ inverse[:, :2].T + inverse[:, 2]
    out = np.concatenate([xy, kp[:, 2:3]], axis=1)
    if flip_perm is not None:
        out = out[flip_perm]
    oh, ow = out_size
    inside = (out[:, 0] >= 0) & (out[:, 0] < ow) & (out[:, 1] >= 0) & (out[:, 1] < oh)
    out[~(inside & (out[:, 2] > 0))] = 0.0
    return torch.from_numpy(out.astype(np.float32))


def swap_labels(mask: torch.Tensor, pairs) -> torch.Tensor:
    """Exchange the label ids of each (left, right) pair, for a mirrored mask."""
    if not pairs:
        return mask
    out = mask.clone()
    for a, b in pairs:
        out[mask == a], out[mask == b] = b, a
    return out


def normalize(image: torch.Tensor) -> torch.Tensor:
    """float (3, H, W) in [0, 1] -> ImageNet-normalised."""
    return (image - _MEAN) / _STD


def random_erasing(
    image: torch.Tensor,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    min_aspect: float = 0.3,
    attempts: int = 100,
) -> torch.Tensor:
    """Random erasing (Zhong et al.): with probability p, one rectangle of the normalised image
    (3, H, W) covering an `area` fraction, aspect in [min_aspect, 1 / min_aspect], becomes 0
    (the ImageNet mean colour). Draws from torch's global generator."""
    if p <= 0 or float(torch.rand(())) >= p:
        return image
    _, h, w = image.shape
    for _ in range(attempts):
        target = float(torch.empty(()).uniform_(*area)) * h * w
        log_r = torch.empty(()).uniform_(math.log(min_aspect), -math.log(min_aspect))
        aspect = math.exp(float(log_r))
        eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < eh < h and 0 < ew < w:
            top = int(torch.randint(0, h - eh + 1, ()))
            left = int(torch.randint(0, w - ew + 1, ()))
            image = image.clone()
            image[:, top : top + eh, left : left + ew] = 0.0
            return image
    return image


def draw_view(
    augment: dict, rng: np.random.Generator | None = None
) -> tuple[bool, float, float, tuple[float, float]]:
    """(flip, scale, angle, shift) from an augment config: flip_p, scale [lo, hi], rotation
    (max degrees, applied with probability rotation_p), pad (max shift in pixels)."""
    rng = rng or np.random.default_rng(int(torch.randint(0, 2**62, ())))
    flip = bool(rng.random() < augment.get("flip_p", 0.0))
    lo, hi = augment.get("scale") or (1.0, 1.0)
    scale = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)
    angle = 0.0
    if augment.get("rotation") and rng.random() < augment.get("rotation_p", 1.0):
        angle = float(rng.uniform(-augment["rotation"], augment["rotation"]))
    pad = int(augment.get("pad") or 0)
    shift = (0.0, 0.0)
    if pad:
        shift = (float(rng.integers(-pad, pad + 1)), float(rng.integers(-pad, pad + 1)))
    return flip, scale, angle, shift
