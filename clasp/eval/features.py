"""Frozen features for evaluation: loading an encoder, preparing labelled sets, caching.

An encoder is any object with `extract(images, task=...) -> (pooled (B, D), patches
(B, gh, gw, D))` taking images (B, 3, H, W) normalised with its `pixel_mean` / `pixel_std`
(ImageNet statistics when it has none) at its `img_size` (H, W) (128 x 64 when it has none).
A CLASP backbone (`clasp.load_backbone`, `clasp.model.build_backbone`) is one; so is any
wrapper of a timm ViT that returns its pooled and patch tokens.

Each image is stretched to the encoder's input size (as the teacher and the eval transform
do), so patch cell (i, j) covers rows [i H / gh, (i + 1) H / gh) and columns
[j W / gw, (j + 1) W / gw) of the original image. Labels stay at the original resolution.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clasp import RANDOM_WEIGHTS
from clasp.data.base import FailedSample, PersonDataset
from clasp.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_SIZE = (128, 64)


def load_encoder(
    checkpoint: str,
    config: str | None = None,
    *,
    task: str | dict | None = None,
    seed: int = 0,
    weights: str = "student",
    device: str | torch.device = "cpu",
):
    """A CLASP backbone in eval mode: `checkpoint` is an exported .safetensors file or a
    training checkpoint (`weights`: its "student" or EMA "teacher"), "random"
    (`clasp.RANDOM_WEIGHTS`) for the randomly initialised baseline built from `config` (a
    model or training YAML, or a packaged config's name; initialised from `seed`, so every
    run builds the same weights), or "colour-histogram" for the HSV stripe-histogram
    baseline of re-ID (`clasp.eval.colour_histogram`)."""
    from .colour_histogram import NAME as COLOUR_HISTOGRAM

    if checkpoint == COLOUR_HISTOGRAM:
        from .colour_histogram import ColourHistogramEncoder

        return ColourHistogramEncoder().to(device).eval()
    if checkpoint == RANDOM_WEIGHTS:
        if config is None:
            raise ValueError(
                f"--checkpoint {RANDOM_WEIGHTS} needs --config FILE (the model to build)"
            )
        from clasp.config import resolve_config
        from clasp.model import build_backbone

        encoder = build_backbone(resolve_config(config), seed=seed)
        encoder.default_task = task
        return encoder.to(device).eval()
    from clasp import load_backbone

    if checkpoint.endswith(".safetensors"):
        return load_backbone(checkpoint, task, device=device).eval()
    return load_backbone(checkpoint, task, weights=weights, device=device).eval()


def parse_task(text: str | None) -> str | dict[str, float] | None:
    """'reid' -> 'reid'; 'reid=0.5,parsing=0.5' -> {'reid': 0.5, 'parsing': 0.5}; None."""
    if text is None or "=" not in text:
        return text
    mix = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(
                f"task mix {text!r}: {item!r} is not name=weight (e.g. reid=0.5,parsing=0.5)"
            ) from None
    return mix


def task_key(task) -> str:
    """A stable, printable name of a task spec (cache key and table label)."""
    if task is None:
        return "default"
    if isinstance(task, dict):
        return ",".join(f"{k}={v:g}" for k, v in sorted(task.items()))
    return str(task)


def encoder_input(encoder) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor]:
    """(H, W), mean (3,), std (3,) the encoder expects."""
    size = tuple(int(s) for s in getattr(encoder, "img_size", DEFAULT_SIZE))
    mean = getattr(encoder, "pixel_mean", None)
    std = getattr(encoder, "pixel_std", None)
    mean = torch.tensor(IMAGENET_MEAN) if mean is None else mean.detach().flatten().cpu()
    std = torch.tensor(IMAGENET_STD) if std is None else std.detach().flatten().cpu()
    return size, mean.float(), std.float()


@dataclass
class PreparedSet:
    """The images of a labelled set at the encoder's input size, with their labels.

    pixels (N, 3, H, W) uint8; paths: N source files; pids, cameras (N,) int64; sizes
    (N, 2) original (H0, W0); attributes (N, A) float (NaN unknown) or None; parts: list of
    N (H0, W0) int8 masks (-1 ignore) or None; keypoints (N, K, 3) in original pixels or
    None."""

    name: str
    pixels: torch.Tensor
    paths: list[str]
    pids: torch.Tensor
    cameras: torch.Tensor
    sizes: torch.Tensor
    attributes: torch.Tensor | None = None
    parts: list[torch.Tensor] | None = None
    keypoints: torch.Tensor | None = None
    attribute_names: list[str] | None = None
    part_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def subset(self, index: torch.Tensor, name: str) -> PreparedSet:
        index = torch.as_tensor(index, dtype=torch.long)
        pick = index.tolist()
        return PreparedSet(
            name=name,
            pixels=self.pixels[index],
            paths=[self.paths[i] for i in pick],
            pids=self.pids[index],
            cameras=self.cameras[index],
            sizes=self.sizes[index],
            attributes=None if self.attributes is None else self.attributes[index],
            parts=None if self.parts is None else [self.parts[i] for i in pick],
            keypoints=None if self.keypoints is None else self.keypoints[index],
            attribute_names=self.attribute_names,
            part_names=self.part_names,
        )


class _Resize:
    """Sample dict -> the compact record PreparedSet keeps (runs in loader workers)."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, sample: dict) -> dict:
        image = sample["image"]
        x = image.float()[None]
        x = F.interpolate(x, self.size, mode="bilinear", antialias=True, align_corners=False)
        out = {
            "pixels": x[0].round_().clamp_(0, 255).to(torch.uint8),
            "pid": int(sample.get("pid", -1)),
            "camera": int(sample.get("camera", -1)),
            "size": tuple(image.shape[-2:]),
            "path": sample.get("path", ""),
        }
        for key in ("attributes", "keypoints"):
            if sample.get(key) is not None:
                out[key] = sample[key]
        if sample.get("parts") is not None:
            out["parts"] = sample["parts"].to(torch.int8)
        return out


class _Resized(torch.utils.data.Dataset):
    def __init__(self, dataset: PersonDataset, indices: list[int], resize: _Resize):
        self.dataset, self.indices, self.resize = dataset, indices, resize

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        sample = self.dataset[self.indices[i]]
        return sample if isinstance(sample, FailedSample) else self.resize(sample)


def prepare(
    dataset: PersonDataset,
    size: tuple[int, int],
    *,
    name: str | None = None,
    max_images: int | None = None,
    workers: int = 0,
) -> PreparedSet:
    """Decode `dataset` once into a PreparedSet at `size` (H, W). max_images keeps an evenly
    spaced subset (deterministic). Unreadable samples are dropped and listed in `skipped`."""
    indices = list(range(len(dataset)))
    if max_images is not None and len(indices) > max_images:
        step = len(indices) / max_images
        indices = [int(i * step) for i in range(max_images)]
    loader = torch.utils.data.DataLoader(
        _Resized(dataset, indices, _Resize(tuple(size))),
        batch_size=32,
        num_workers=workers,
        collate_fn=list,
    )
    records, skipped = [], []
    for batch in loader:
        for record in batch:
            if isinstance(record, FailedSample):
                skipped.append(record.path)
            else:
                records.append(record)
    if not records:
        raise ValueError(f"no readable images in {dataset!r}")
    has = {k: all(k in r for r in records) for k in ("attributes", "parts", "keypoints")}
    return PreparedSet(
        name=name or f"{dataset.format}:{dataset.split}",
        pixels=torch.stack([r["pixels"] for r in records]),
        paths=[r["path"] for r in records],
        pids=torch.tensor([r["pid"] for r in records], dtype=torch.long),
        cameras=torch.tensor([r["camera"] for r in records], dtype=torch.long),
        sizes=torch.tensor([r["size"] for r in records], dtype=torch.long),
        attributes=torch.stack([r["attributes"] for r in records]).float()
        if has["attributes"]
        else None,
        parts=[r["parts"] for r in records] if has["parts"] else None,
        keypoints=torch.stack([r["keypoints"] for r in records]).float()
        if has["keypoints"]
        else None,
        attribute_names=list(dataset.attribute_names) if dataset.attribute_names else None,
        part_names=list(dataset.part_names) if dataset.part_names else None,
        skipped=skipped,
    )


@dataclass
class Features:
    pooled: torch.Tensor  # (N, D) fp32
    patches: torch.Tensor | None  # (N, gh, gw, D) fp32


class FeatureBank:
    """Extracts frozen features of prepared sets under task prompts, caching each
    (set, task) within a run so that protocols and prompts share one pass."""

    def __init__(self, encoder, *, batch_size: int = 64, device: str | torch.device = "cpu"):
        self.encoder = encoder.eval()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.size, self.mean, self.std = encoder_input(encoder)
        self._cache: dict[tuple[int, str], tuple[PreparedSet, Features]] = {}

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(getattr(self.encoder, "tasks", ()) or ())

    def __call__(self, prepared: PreparedSet, task=None, *, patches: bool = True) -> Features:
        key = (id(prepared), task_key(task))
        # The entry keeps the set alive, so its id cannot be reused by another set.
        _, cached = self._cache.get(key, (None, None))
        if cached is not None and (cached.patches is not None or not patches):
            return cached
        pooled, grids = [], []
        mean = (self.mean * 255).view(1, 3, 1, 1).to(self.device)
        std = (self.std * 255).view(1, 3, 1, 1).to(self.device)
        with torch.inference_mode():
            for start in range(0, len(prepared), self.batch_size):
                batch = prepared.pixels[start : start + self.batch_size].to(self.device)
                images = (batch.float() - mean) / std
                out_pooled, out_patches = self.encoder.extract(images, task=task)
                pooled.append(out_pooled.float().cpu())
                if patches:
                    grids.append(out_patches.float().cpu())
        features = Features(torch.cat(pooled), torch.cat(grids) if patches else None)
        self._cache[key] = (prepared, features)
        return features


def query_gallery_split(pids: torch.Tensor, cameras: torch.Tensor) -> tuple[list, list]:
    """For sets without a query/gallery split: the first image (in set order) of each
    (identity, camera) is a query, every other image is gallery. Images without an identity
    (pid < 0) go to the gallery as junk. Returns (query indices, gallery indices)."""
    seen, query, gallery = set(), [], []
    for i, (pid, cam) in enumerate(zip(pids.tolist(), cameras.tolist(), strict=True)):
        if pid >= 0 and (pid, cam) not in seen:
            seen.add((pid, cam))
            query.append(i)
        else:
            gallery.append(i)
    return query, gallery


def split_by_group(groups: list[str], test_every: int = 5) -> tuple[list, list]:
    """Deterministic train/test division keeping each group (identity, photo) on one side:
    a group is test when crc32(group) % test_every == 0. Returns (train, test) indices."""
    train, test = [], []
    for i, group in enumerate(groups):
        (test if zlib.crc32(group.encode()) % test_every == 0 else train).append(i)
    return train, test
