"""How good the teacher's pseudo-labels are, against ground truth: those of a saved teacher
(`teacher_quality`) or those stored in a label cache (`cache_quality`), on a synthetic set.

Part labels are a grid (gh, gw) over the whole image (see `clasp.teacher.model`): each cell's
label covers its rectangle of the image, so they are upsampled to the mask's resolution
with nearest neighbour. Reported over the pixels whose ground truth is labelled:
- part_pixel_accuracy: the fraction whose pseudo-label is the true part; a cell the teacher
  left unlabelled (-1, under its confidence threshold) counts as wrong;
- part_coverage: the fraction the teacher labelled at all, and part_accuracy_labelled the
  accuracy among those;
- part_mIoU and per-class IoU;
- majority_baseline: the accuracy of calling every pixel the most frequent true class
  (background, mostly), the number a part accuracy must beat to mean anything.
Attributes: the teacher's soft labels become a one-hot argmax per group, scored by mA
against the ground truth (chance: 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clasp.data.build import build_dataset

from .metrics import attribute_metrics, confusion_matrix, segmentation_metrics


def upsample_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(gh, gw) labels -> (H, W): each cell's label over its rectangle (nearest)."""
    return F.interpolate(grid[None, None].float(), size, mode="nearest")[0, 0].long()


def part_label_quality(
    grids: list[torch.Tensor], masks: list[torch.Tensor], part_names: list[str]
) -> dict:
    """grids: N (gh, gw) pseudo-labels (-1 unlabelled); masks: N (H, W) truths (-1 ignore)."""
    confusion = torch.zeros(len(part_names), len(part_names) + 1, dtype=torch.long)
    for grid, mask in zip(grids, masks, strict=True):
        confusion += confusion_matrix(upsample_grid(grid, tuple(mask.shape)), mask, len(part_names))
    seg = segmentation_metrics(confusion, part_names)
    total = confusion.sum()
    labelled = confusion[:, : len(part_names)].sum()
    correct = confusion[:, : len(part_names)].diagonal().sum()
    return {
        "part_pixel_accuracy": float(correct / total) if total else float("nan"),
        "part_coverage": float(labelled / total) if total else float("nan"),
        "part_accuracy_labelled": float(correct / labelled) if labelled else float("nan"),
        "part_mIoU": seg["mIoU"],
        "part_iou": seg["per_class_iou"],
        "majority_baseline": float(confusion.sum(1).max() / total) if total else float("nan"),
        "pixels": int(total),
    }


def attribute_label_quality(
    soft: torch.Tensor, target: torch.Tensor, group_sizes: list[int], names: list[str]
) -> dict:
    """soft: (N, A) per-group distributions; target: (N, A) 0/1 (NaN unknown)."""
    hard = torch.zeros_like(soft, dtype=torch.bool)
    start = 0
    for size in group_sizes:
        pick = soft[:, start : start + size].argmax(1)
        hard[torch.arange(soft.shape[0]), start + pick] = True
        start += size
    metrics = attribute_metrics(hard, target, names)
    return {
        "attribute_mA": metrics["mA"],
        "attribute_instance_f1": metrics["instance_f1"],
        "attribute_accuracy": metrics["per_attribute_accuracy"],
    }


def label_quality(
    grids: list[torch.Tensor],
    masks: list[torch.Tensor],
    soft: torch.Tensor,
    target: torch.Tensor,
    vocabulary,
) -> dict:
    """Part and attribute quality of N images' pseudo-labels in one dict, plus "images".
    vocabulary: anything with part_names, group_sizes and attribute_names (the teacher's
    prompts, a label cache)."""
    quality = part_label_quality(grids, masks, vocabulary.part_names)
    quality.update(
        attribute_label_quality(soft, target, vocabulary.group_sizes, vocabulary.attribute_names)
    )
    quality["images"] = len(grids)
    return quality


@torch.no_grad()
def teacher_quality(
    teacher_dir: str,
    root: str,
    split: str,
    *,
    max_images: int | None = 256,
    threshold: float | None = 0.4,
) -> dict:
    """Pseudo-labels of the saved teacher on a synthetic split (through the labeler's own
    `ClipTeacher.label`) against its ground truth (`label_quality`)."""
    from clasp.data.images import read_rgb
    from clasp.teacher.loading import load_teacher
    from clasp.vocabulary import load_prompts

    teacher = load_teacher(teacher_dir)
    prompts = load_prompts()
    dataset = build_dataset("synth", root, split)
    indices = list(range(len(dataset)))
    if max_images is not None and len(indices) > max_images:
        indices = [int(i * len(indices) / max_images) for i in range(max_images)]
    text = teacher.text_embeddings(prompts)
    grids, masks, soft, target = [], [], [], []
    for start in range(0, len(indices), 64):
        samples = [dataset.load(i) for i in indices[start : start + 64]]
        images = torch.stack([teacher.resize(read_rgb(s["path"])) for s in samples])
        labels = teacher.label(images, text, threshold=threshold, backend="reference")
        grids += list(labels["parts"])
        masks += [s["parts"] for s in samples]
        soft.append(labels["attributes"])
        target += [s["attributes"] for s in samples]
    return label_quality(grids, masks, torch.cat(soft), torch.stack(target), prompts)


def cache_quality(cache_dir: str, root: str, split: str = "train") -> dict:
    """The pseudo-labels in the label cache at `cache_dir` of a synthetic split's images against
    their ground truth (`label_quality`); images the cache lacks are left out."""
    from clasp.teacher.cache import LabelCache, file_sha256

    cache = LabelCache(cache_dir)
    dataset = build_dataset("synth", root, split)
    grids, masks, soft, target = [], [], [], []
    for index in range(len(dataset)):
        cached = cache.get(file_sha256(dataset.paths[index]))
        if cached is None:
            continue
        sample = dataset.load(index)
        grids.append(cached["parts"].long())
        masks.append(sample["parts"])
        soft.append(cached["attributes"].float())
        target.append(sample["attributes"])
    if not grids:
        raise ValueError(f"none of the {split} images of {root} is in the label cache {cache_dir}")
    return label_quality(grids, masks, torch.stack(soft), torch.stack(target), cache)
