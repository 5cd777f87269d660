"""PNG overlays of the teacher's part labels, so a person can judge what it says."""

from __future__ import annotations

import colorsys
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from clasp.data.images import ImageReadError, list_images, read_rgb

from .cache import LabelCache, file_sha256

# Distinct colours for the first classes (background first: dark blue), then evenly spaced hues.
BASE_PALETTE = [
    (30, 40, 110),
    (230, 60, 60),
    (60, 180, 75),
    (255, 200, 40),
    (70, 140, 240),
    (240, 130, 40),
    (170, 70, 200),
    (70, 220, 220),
]
LOW_CONFIDENCE = (128, 128, 128)
DISPLAY_HEIGHT = 256
LEGEND_ROW = 14


def palette(n: int) -> list[tuple[int, int, int]]:
    extra = [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618) % 1.0, 0.7, 0.95))
        for i in range(max(0, n - len(BASE_PALETTE)))
    ]
    return (BASE_PALETTE + extra)[:n]


def overlay(image: Image.Image, parts: torch.Tensor, part_names: list[str]) -> Image.Image:
    """The image beside the same image tinted by part label (grey: under the threshold), with
    a legend. `parts` is the (gh, gw) grid over the whole image."""
    scale = DISPLAY_HEIGHT / image.height
    size = (max(1, round(image.width * scale)), DISPLAY_HEIGHT)
    photo = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    colours = np.array([*palette(len(part_names)), LOW_CONFIDENCE], dtype=np.uint8)
    grid = colours[parts.numpy()]  # -1 picks the last row: LOW_CONFIDENCE
    tint = Image.fromarray(grid).resize(size, Image.Resampling.NEAREST)
    tinted = Image.blend(photo, tint, 0.55)
    legend_height = LEGEND_ROW * (len(part_names) + 1) + 4
    canvas = Image.new("RGB", (max(2 * size[0], 160), DISPLAY_HEIGHT + legend_height), "white")
    canvas.paste(photo, (0, 0))
    canvas.paste(tinted, (size[0], 0))
    draw = ImageDraw.Draw(canvas)
    entries = [*zip(part_names, colours[:-1].tolist(), strict=True)]
    entries.append(("low confidence", LOW_CONFIDENCE))
    for row, (name, colour) in enumerate(entries):
        y = DISPLAY_HEIGHT + 2 + row * LEGEND_ROW
        draw.rectangle([4, y, 14, y + 10], fill=tuple(colour))
        draw.text((20, y - 1), name, fill="black")
    return canvas


def write_overlays(
    cache: LabelCache, images: str | list[str], out_dir: str, count: int
) -> list[str]:
    """Overlays of the first `count` images that the cache labels, from a folder (sorted) or
    a list of paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = list_images(images) if isinstance(images, str) else images
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    written = []
    for path in paths:
        if len(written) >= count:
            break
        labels = cache.get(file_sha256(path))
        if labels is None:
            continue
        try:
            image = read_rgb(path)
        except ImageReadError:
            continue
        stem = os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "__")
        target = os.path.join(out_dir, f"{stem}.png")
        overlay(image, labels["parts"], cache.part_names).save(target)
        written.append(target)
    return written
