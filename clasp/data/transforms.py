"""Multi-crop augmentation whose label maps follow the crops, an eval transform, and collate.

Geometry is in normalised image coordinates: a crop box is (top, left, height, width) in
[0, 1] of the source image, so the same box cuts a pixel mask at image resolution and a
coarse patch-grid map over the whole image (a teacher's pseudo-labels) alike. Every output
cell, image pixel or label cell, reads the source at the centre of that cell: images
bilinearly (one `grid_sample` per crop size), label maps by nearest neighbour (any dtype,
any leading dims, ignore values intact). Keypoints move with the crop. A flip mirrors all
three together and swaps left/right keypoints.

Crop parameters are computed with numpy (cheaper than torch for a handful of numbers) from
a generator seeded by torch's, so DataLoader worker seeding makes them reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Pixel statistics every backbone and probe normalises with: RGB in [0, 1], then (x - mean) / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
LUMA = np.array([0.299, 0.587, 0.114])
TO_GRAY = np.ones((3, 1)) * LUMA[None, :]  # every channel becomes the luma
# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)


def _label_spec(label_keys, patch_size) -> dict[str, str]:
    """key -> "pixel" or "patch"; a plain sequence means patch when patch_size is set."""
    if isinstance(label_keys, Mapping):
        spec = dict(label_keys)
    else:
        spec = {k: "patch" if patch_size else "pixel" for k in label_keys}
    bad = {k: v for k, v in spec.items() if v not in ("pixel", "patch")}
    if bad:
        raise ValueError(f"label resolution must be 'pixel' or 'patch', got {bad}")
    if "patch" in spec.values() and not patch_size:
        raise ValueError("patch-resolution label maps need patch_size")
    return spec


def source_coordinates(boxes, flips, out_size) -> tuple[np.ndarray, np.ndarray]:
    """Normalised source coordinates (float64) of the centres of an output grid's cells.

    boxes (N, 4) = top, left, height, width; flips (N,) bool; returns ys (N, rows) and
    xs (N, cols). A mirrored crop reads its column j where the unmirrored one reads
    column cols - 1 - j."""
    rows, cols = out_size
    boxes = np.asarray(boxes, dtype=np.float64)
    j = np.arange(cols, dtype=np.float64)
    j = np.where(np.asarray(flips, dtype=bool)[:, None], cols - 1 - j, j)
    xs = boxes[:, 1:2] + (j + 0.5) / cols * boxes[:, 3:4]
    ys = boxes[:, 0:1] + (np.arange(rows) + 0.5) / rows * boxes[:, 2:3]
    return ys, xs


def crop_label_maps(label: torch.Tensor, boxes, flips, out_size) -> torch.Tensor:
    """Nearest-neighbour crops of `label` (..., h, w), which spans the whole image.

    Returns (N, ..., rows, cols): each output cell holds the source cell under its centre."""
    h, w = label.shape[-2:]
    ys, xs = source_coordinates(boxes, flips, out_size)
    rows = torch.from_numpy(np.clip(np.floor(ys * h), 0, h - 1).astype(np.int64))
    cols = torch.from_numpy(np.clip(np.floor(xs * w), 0, w - 1).astype(np.int64))
    return label[..., rows[:, :, None], cols[:, None, :]].movedim(-3, 0)


def crop_keypoints(keypoints, boxes, flips, out_size, image_size, flip_perm=None) -> torch.Tensor:
    """Keypoints (K, 3) in source pixels -> (N, K, 3) in crop pixels; out_size is one
    (rows, cols) for all crops or an (N, 2) array.

    A mirrored crop swaps left and right (`flip_perm`); keypoints outside the crop or absent
    (visibility 0) become (0, 0, 0)."""
    sizes = np.broadcast_to(np.asarray(out_size, dtype=np.float64), (len(boxes), 2))
    oh, ow = sizes[:, 0:1], sizes[:, 1:2]
    ih, iw = image_size
    b = np.asarray(boxes, dtype=np.float64)[:, None, :]
    kp = np.asarray(keypoints, dtype=np.float64)[None]
    x = (kp[..., 0] / iw - b[..., 1]) / b[..., 3] * ow
    y = (kp[..., 1] / ih - b[..., 0]) / b[..., 2] * oh
    flipped = np.asarray(flips, dtype=bool)[:, None]
    x = np.where(flipped, ow - x, x)
    out = np.stack([x, y, np.broadcast_to(kp[..., 2], x.shape)], axis=-1)
    if flip_perm is not None:
        out = np.where(flipped[..., None], out[:, flip_perm], out)
    inside = (out[..., 0] >= 0) & (out[..., 0] < ow) & (out[..., 1] >= 0) & (out[..., 1] < oh)
    out[~(inside & (out[..., 2] > 0))] = 0.0
    return torch.from_numpy(out.astype(np.float32))


def flip_permutation(num_keypoints: int, pairs=COCO_FLIP_PAIRS) -> np.ndarray | None:
    """Index map that swaps left/right keypoints after a mirror (None if pairs do not fit)."""
    if not pairs or max(max(p) for p in pairs) >= num_keypoints:
        return None
    perm = np.arange(num_keypoints)
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


def resample_crops(image: torch.Tensor, boxes, flips, size) -> torch.Tensor:
    """image (3, H, W) float -> (N, 3, *size): bilinear crops sampled at the same cell
    centres as crop_label_maps."""
    ys, xs = source_coordinates(boxes, flips, size)
    n, (rows, cols) = len(ys), size
    grid = np.empty((n, rows, cols, 2), dtype=np.float32)
    grid[..., 0] = (2 * xs - 1)[:, None, :]
    grid[..., 1] = (2 * ys - 1)[:, :, None]
    return F.grid_sample(
        image.unsqueeze(0).expand(n, -1, -1, -1),
        torch.from_numpy(grid),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )


class MultiCrop:
    """Global and local crops at person aspect for self-distillation, labels following along.

    Input: a sample dict with "image" uint8 (3, H, W), optional label maps under
    `label_keys` (tensors (..., h, w) covering the whole image: a part mask at image
    resolution, a (gh, gw) pseudo-label grid, ...) and optional "keypoints" (K, 3) in image
    pixels. Output: the sample without those, plus
        "crops"          list of n_global + n_local float tensors (3, h, w), normalised;
                         globals (global_size) first, then locals (local_size)
        "crop_boxes"     float64 tensor (n_crops, 5): top, left, height, width (normalised
                         source coordinates) and 1.0 where the crop is mirrored
        "crop_labels"    {key: list of n_crops label maps (..., h, w)} at the crop's pixel
                         size ("pixel") or its patch grid, crop size // patch_size ("patch")
        "crop_keypoints" list of n_crops (K, 3) in crop pixels (when the sample has keypoints)

    `label_keys` is a sequence (every map at "patch" resolution if patch_size is set, else
    "pixel") or a mapping key -> "pixel" | "patch". A crop's area is drawn from global_scale
    or local_scale of the image area, its aspect (h / w) is the output's times a log-uniform
    factor in `ratio`. Colour jitter (brightness, contrast, saturation, hue strengths) applies
    to a crop with probability jitter_p, then greyscale with grayscale_p; both act as one
    colour matrix per crop, clamped once. With `focus_key` (a label map of the sample, e.g.
    the teacher's part labels), local crops are drawn inside the box around the map's
    foreground (values > 0), their area a fraction of that box's: the student's small views
    then show the person rather than the background. Sources much larger than needed are first
    downscaled with antialiasing so that the smallest global crop keeps about global_size
    pixels.
    """

    def __init__(
        self,
        global_size: tuple[int, int] = (128, 64),
        local_size: tuple[int, int] = (64, 32),
        n_global: int = 2,
        n_local: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        color_jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        label_keys: Sequence[str] | Mapping[str, str] = ("parts",),
        patch_size: int | None = None,
        keypoint_flip_pairs=COCO_FLIP_PAIRS,
        focus_key: str | None = None,
        generator: torch.Generator | None = None,
    ):
        if n_global < 1 or n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        if patch_size:
            for size in (global_size, local_size):
                if size[0] % patch_size or size[1] % patch_size:
                    raise ValueError(
                        f"crop size {size} is not a multiple of patch_size {patch_size}"
                    )
        self.global_size, self.local_size = tuple(global_size), tuple(local_size)
        self.n_global, self.n_local = n_global, n_local
        self.global_scale, self.local_scale = global_scale, local_scale
        self.log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
        self.flip_p, self.color_jitter = flip_p, color_jitter
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p
        self.mean_np, self.std_np = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        self.low = torch.tensor(-self.mean_np / self.std_np, dtype=torch.float32).view(1, 3, 1)
        self.high = torch.tensor((1 - self.mean_np) / self.std_np, dtype=torch.float32).view(
            1, 3, 1
        )
        self.label_spec = _label_spec(label_keys, patch_size)
        self.patch_size = patch_size
        self.keypoint_flip_pairs = keypoint_flip_pairs
        self.focus_key = focus_key
        self.generator = generator
        shrink = np.sqrt(global_scale[0])
        self.work_size = (global_size[0] / shrink, global_size[1] / shrink)

    def patch_grid(self, size) -> tuple[int, int]:
        return size[0] // self.patch_size, size[1] // self.patch_size

    def sample_boxes(self, rng: np.random.Generator, image_size, out_sizes, scales, regions=None):
        """(N, 4) normalised boxes, one per row of out_sizes (N, 2) and scales (N, 2): area
        a fraction in scale of its region's, aspect near the output's, inside the region.
        regions (N, 4) normalised top, left, height, width; None: the whole image."""
        ih, iw = image_size
        n = len(out_sizes)
        if regions is None:
            regions = np.tile([0.0, 0.0, 1.0, 1.0], (n, 1))
        rh, rw = regions[:, 2] * ih, regions[:, 3] * iw
        area = rng.uniform(scales[:, 0], scales[:, 1]) * rh * rw
        aspect = out_sizes[:, 0] / out_sizes[:, 1] * np.exp(rng.uniform(*self.log_ratio, n))
        ch = np.minimum(np.sqrt(area * aspect), rh)
        cw = np.minimum(np.sqrt(area / aspect), rw)
        top = regions[:, 0] + (rh - ch) * rng.random(n) / ih
        left = regions[:, 1] + (rw - cw) * rng.random(n) / iw
        return np.stack([top, left, ch / ih, cw / iw], axis=1)

    def focus_region(self, sample: dict) -> np.ndarray | None:
        """The normalised box (top, left, height, width) around the cells of the focus map
        labelled > 0 (the person's parts; 0 is background, negative unknown), or None
        when there is no such map or fewer than two such cells."""
        label = sample.get(self.focus_key) if self.focus_key else None
        if label is None:
            return None
        cells = torch.nonzero(label.reshape(label.shape[-2:]) > 0)
        if len(cells) < 2:
            return None
        (r0, c0), (r1, c1) = cells.amin(0).tolist(), cells.amax(0).tolist()
        gh, gw = label.shape[-2:]
        return np.array([r0 / gh, c0 / gw, (r1 + 1 - r0) / gh, (c1 + 1 - c0) / gw])

    def color_matrices(self, rng: np.random.Generator, mean_rgb: np.ndarray):
        """Per-crop colour jitter and greyscale as one affine map: (N, 3, 3) and (N, 3, 1).

        Brightness b, contrast c (towards the crop's mean luma m), saturation s (towards each
        pixel's luma) and hue (a rotation of the YIQ chroma plane) are linear, so together
        x -> G H S c b x + (1 - c) b m, with G greyscale or identity."""
        n = len(mean_rgb)
        matrix = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
        offset = np.zeros((n, 3, 1))
        if self.color_jitter:
            *strengths, hue = self.color_jitter
            on = rng.random(n) < self.jitter_p
            b, c, s = (1 + on * k * rng.uniform(-1, 1, n) for k in strengths)
            matrix = s[:, None, None] * np.eye(3) + (1 - s)[:, None, None] * TO_GRAY
            matrix *= (c * b)[:, None, None]
            if hue:
                angle = on * hue * rng.uniform(-1, 1, n) * 2 * np.pi
                rotation = np.zeros((n, 3, 3))
                rotation[:, 0, 0] = 1
                rotation[:, 1, 1], rotation[:, 1, 2] = np.cos(angle), -np.sin(angle)
                rotation[:, 2, 1], rotation[:, 2, 2] = np.sin(angle), np.cos(angle)
                matrix = YIQ_TO_RGB @ rotation @ RGB_TO_YIQ @ matrix
            offset[:, :, 0] = ((1 - c) * b * (mean_rgb @ LUMA))[:, None]
        if self.grayscale_p:
            gray = rng.random(n) < self.grayscale_p
            matrix = np.where(gray[:, None, None], TO_GRAY @ matrix, matrix)
        return matrix, offset

    def finish(self, rng: np.random.Generator, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Colour-jitter, clamp to [0, 1] and normalise each group of crops (N, 3, h, w)
        holding 0..255 values; one colour matrix per crop, drawn for all groups at once.

        The 1/255 scale and the normalisation are folded into the colour matrix, and the
        clamp to [0, 1] becomes a clamp to each channel's normalised range."""
        flats = [g.reshape(g.shape[0], 3, -1) for g in groups]
        means = torch.cat([f.mean(dim=2) for f in flats]).double().numpy() / 255
        matrix, offset = self.color_matrices(rng, means)
        std = self.std_np[:, None]
        matrix = torch.from_numpy((matrix / (255 * std)).astype(np.float32))
        offset = torch.from_numpy(((offset - self.mean_np[:, None]) / std).astype(np.float32))
        out, start = [], 0
        for group, flat in zip(groups, flats, strict=True):
            n = group.shape[0]
            flat = torch.baddbmm(offset[start : start + n], matrix[start : start + n], flat)
            # maximum/minimum: clamp with per-channel tensor bounds is ~8x slower on the CPU
            torch.minimum(torch.maximum(flat, self.low, out=flat), self.high, out=flat)
            out.append(flat.view(group.shape))
            start += n
        return out

    def __call__(self, sample: dict) -> dict:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        rng = np.random.default_rng(seed)
        image = sample["image"]
        ih, iw = image.shape[-2:]
        source = image.float()
        factor = min(1.0, self.work_size[0] / ih, self.work_size[1] / iw)
        if factor < 0.5:
            size = (max(1, round(ih * factor)), max(1, round(iw * factor)))
            source = F.interpolate(source[None], size, mode="bilinear", antialias=True)[0]
        sizes = [self.global_size] * self.n_global + [self.local_size] * self.n_local
        scales = [self.global_scale] * self.n_global + [self.local_scale] * self.n_local
        regions = None
        focus = self.focus_region(sample) if self.n_local else None
        if focus is not None:
            regions = np.tile([0.0, 0.0, 1.0, 1.0], (len(sizes), 1))
            regions[self.n_global :] = focus
        boxes = self.sample_boxes(rng, (ih, iw), np.array(sizes, float), np.array(scales), regions)
        flips = rng.random(len(sizes)) < self.flip_p
        groups = [(slice(0, self.n_global), self.global_size)]
        if self.n_local:
            groups.append((slice(self.n_global, len(sizes)), self.local_size))
        images = [resample_crops(source, boxes[g], flips[g], size) for g, size in groups]
        crops = [crop for group in self.finish(rng, images) for crop in group.unbind(0)]
        labels = {k: sample[k] for k in self.label_spec if sample.get(k) is not None}
        crop_labels = {}
        for key, label in labels.items():
            crop_labels[key] = []
            for g, size in groups:
                grid = size if self.label_spec[key] == "pixel" else self.patch_grid(size)
                crop_labels[key] += list(crop_label_maps(label, boxes[g], flips[g], grid).unbind(0))
        out = {k: v for k, v in sample.items() if k not in ("image", "keypoints", *labels)}
        out["crops"] = crops
        out["crop_boxes"] = torch.from_numpy(np.concatenate([boxes, flips[:, None]], axis=1))
        out["crop_labels"] = crop_labels
        keypoints = sample.get("keypoints")
        if keypoints is not None:
            flip_perm = flip_permutation(keypoints.shape[0], self.keypoint_flip_pairs)
            kps = crop_keypoints(keypoints, boxes, flips, np.array(sizes), (ih, iw), flip_perm)
            out["crop_keypoints"] = list(kps.unbind(0))
        return out


class EvalTransform:
    """Resize the whole image to `size` and normalise; label maps and keypoints follow.

    "image" becomes float (3, *size); maps under `label_keys` are resampled (nearest) to
    `size` ("pixel") or to size // patch_size ("patch"); "keypoints" are rescaled."""

    def __init__(
        self,
        size: tuple[int, int] = (128, 64),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        label_keys: Sequence[str] | Mapping[str, str] = ("parts",),
        patch_size: int | None = None,
    ):
        self.size = tuple(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.label_spec = _label_spec(label_keys, patch_size)
        self.patch_size = patch_size

    def __call__(self, sample: dict) -> dict:
        out = dict(sample)
        image = sample["image"]
        ih, iw = image.shape[-2:]
        x = image.float().div_(255)[None]
        x = F.interpolate(x, self.size, mode="bilinear", antialias=True, align_corners=False)[0]
        out["image"] = ((x - self.mean) / self.std).contiguous()
        whole, unflipped = np.array([[0.0, 0.0, 1.0, 1.0]]), np.zeros(1, dtype=bool)
        for key, resolution in self.label_spec.items():
            if sample.get(key) is not None:
                grid = self.size
                if resolution == "patch":
                    grid = (self.size[0] // self.patch_size, self.size[1] // self.patch_size)
                out[key] = crop_label_maps(sample[key], whole, unflipped, grid)[0]
        if sample.get("keypoints") is not None:
            kps = crop_keypoints(sample["keypoints"], whole, unflipped, self.size, (ih, iw), None)
            out["keypoints"] = kps[0]
        return out
