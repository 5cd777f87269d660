"""Zero-shot attribute recognition with the CLIP teacher: no training, only its prompts.

Each attribute group of the vocabulary (`clasp.vocabulary`, the teacher's prompts file) is
a choice among its values: an image takes the value whose text embedding (its prompts
averaged over the templates, as the labeler embeds them) is the most similar to the image
embedding. The predicted values, one-hot, are scored against the set's ground truth mapped
into the same groups (`clasp.eval.attribute_mapping`) with `attribute_metrics`: mA over the
values that have both positive and negative examples, and instance F1.

Image embeddings compared side by side:
- "plain": the teacher's pooled embedding of the whole crop (what CLIP zero-shot uses);
- subject-guided (FocusCLIP's vision-side guidance, here without any training): the pooled
  embedding of a last block in which the class token pools the patches' values with its
  attention multiplied by a person heatmap raised to `focus` (`ClipTeacher.encode_image`'s
  patch_weights): it reads the person through the path CLIP was trained on. The heatmap
  comes
  - "parts": from the teacher's own part labels, each patch's probability of not being
    background (every set);
  - "keypoints": from the set's keypoints (synth, COCO): the COCO skeleton's limbs drawn
    as Gaussian tubes of `sigma` cells, the maximum over limbs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clasp.kernels import patch_text_labels
from clasp.vocabulary import Prompts

from .attribute_mapping import vocabulary_targets
from .features import PreparedSet
from .metrics import attribute_metrics

DEFAULT_FOCUS = 1.0  # the heatmap as it is; 0 = plain, larger = sharper
# COCO's 19 limbs between its 17 keypoints (0-based, in COCO order).
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip


def part_heatmap(part_probs: torch.Tensor, background: int) -> torch.Tensor:
    """(N, P, C) per-patch part probabilities -> (N, P) probability of a person part."""
    return 1.0 - part_probs[..., background]


def keypoint_heatmap(
    keypoints: torch.Tensor, sizes: torch.Tensor, grid: tuple[int, int], sigma: float = 1.0
) -> torch.Tensor:
    """(N, K, 3) keypoints (x, y in pixels of images of sizes (N, 2) = (H, W); visibility 0 =
    not labelled) -> (N, gh * gw) in [0, 1]: at each cell centre, exp(-d^2 / 2 sigma^2) of
    its distance d in cells to the nearest limb between two labelled keypoints (the COCO
    skeleton when K = 17; the labelled keypoints themselves otherwise). All zeros for a
    person with no labelled keypoint."""
    gh, gw = grid
    n, k, _ = keypoints.shape
    scale = torch.stack([gw / sizes[:, 1], gh / sizes[:, 0]], dim=1).float()  # px -> cells
    points = keypoints[..., :2].float() * scale[:, None, :]  # (N, K, 2) x, y in cells
    labelled = keypoints[..., 2] > 0
    rows = torch.arange(gh, dtype=torch.float32) + 0.5
    cols = torch.arange(gw, dtype=torch.float32) + 0.5
    centres = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1).reshape(-1, 2)
    limbs = COCO_SKELETON if k == 17 else tuple((j, j) for j in range(k))
    a = points[:, [i for i, _ in limbs]]  # (N, L, 2)
    b = points[:, [j for _, j in limbs]]
    usable = labelled[:, [i for i, _ in limbs]] & labelled[:, [j for _, j in limbs]]
    ab = b - a
    # Distance from each cell centre to each segment: project, clamp to the segment.
    rel = centres[None, :, None, :] - a[:, None]  # (N, cells, L, 2)
    length2 = ab.square().sum(-1).clamp(min=1e-9)[:, None]  # (N, 1, L)
    t = ((rel * ab[:, None]).sum(-1) / length2).clamp(0.0, 1.0)
    d2 = (rel - t[..., None] * ab[:, None]).square().sum(-1)  # (N, cells, L)
    heat = torch.exp(-d2 / (2 * sigma**2)) * usable[:, None]
    return heat.amax(-1) if heat.shape[-1] else heat.new_zeros(n, gh * gw)


def group_predictions(
    embeddings: torch.Tensor, values: torch.Tensor, group_sizes: list[int]
) -> torch.Tensor:
    """(N, E) image embeddings, (A, E) value text embeddings -> (N, A) bool: the most
    similar value of each group."""
    similarity = F.normalize(embeddings.float(), dim=-1) @ F.normalize(values.float(), dim=-1).T
    out = torch.zeros_like(similarity, dtype=torch.bool)
    start = 0
    for size in group_sizes:
        pick = similarity[:, start : start + size].argmax(1)
        out[torch.arange(out.shape[0]), start + pick] = True
        start += size
    return out


def group_accuracy(predicted: torch.Tensor, target: torch.Tensor, prompts: Prompts) -> dict:
    """{group: fraction of the images whose group value is known that got it right}, for the
    groups with a known value somewhere."""
    out, start = {}, 0
    for group, size in zip(prompts.attributes, prompts.group_sizes, strict=True):
        truth = target[:, start : start + size]
        known = ~torch.isnan(truth).any(1)
        if known.any():
            right = predicted[known, start : start + size].float().argmax(1) == truth[known].argmax(
                1
            )
            out[group] = float(right.float().mean())
        start += size
    return out


@torch.no_grad()
def teacher_embeddings(
    teacher,
    prepared: PreparedSet,
    prompts: Prompts,
    *,
    focus: float = DEFAULT_FOCUS,
    sigma: float = 1.0,
    batch_size: int = 64,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """{variant: (N, E) image embeddings} of a set prepared at the teacher's input size:
    "plain", "parts" and, where the set has keypoints, "keypoints"."""
    if tuple(prepared.pixels.shape[-2:]) != tuple(teacher.image_size):
        raise ValueError(
            f"{prepared.name} is prepared at {tuple(prepared.pixels.shape[-2:])}, the teacher "
            f"reads {tuple(teacher.image_size)}"
        )
    if focus < 0:
        raise ValueError(f"focus must be >= 0, got {focus}")
    text = teacher.text_embeddings(prompts)
    background = prompts.part_names.index("background")
    out: dict[str, list[torch.Tensor]] = {"plain": [], "parts": []}
    if prepared.keypoints is not None:
        out["keypoints"] = []
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=teacher.device.type == "cuda")
    for start in range(0, len(prepared), batch_size):
        stop = start + batch_size
        pixels = teacher.normalize(prepared.pixels[start:stop])
        with autocast:
            pooled, dense = teacher.encode_image(pixels)
        probs = patch_text_labels(
            dense.float(), text.parts, teacher.default_temperature, return_probs=True,
            backend=backend,
        ).probs  # fmt: skip
        heats = {"parts": part_heatmap(probs, background)}
        if prepared.keypoints is not None:
            heats["keypoints"] = keypoint_heatmap(
                prepared.keypoints[start:stop], prepared.sizes[start:stop], teacher.grid_size,
                sigma,
            ).to(pixels.device)  # fmt: skip
        out["plain"].append(pooled.float().cpu())
        for name, heat in heats.items():
            with autocast:
                guided, _ = teacher.encode_image(pixels, patch_weights=heat.pow(focus))
            out[name].append(guided.float().cpu())
    return {name: F.normalize(torch.cat(parts), dim=-1) for name, parts in out.items()}


def evaluate_zero_shot(
    teacher,
    prepared: PreparedSet,
    format: str,
    prompts: Prompts,
    *,
    focus: float = DEFAULT_FOCUS,
    sigma: float = 1.0,
    batch_size: int = 64,
    backend: str = "auto",
) -> dict:
    """Zero-shot attribute scores of every variant on a prepared set (see the module doc).

    Returns {"metric": "mA", "value", "metrics"} of the plain variant, the same triple per
    variant under "variants", "guidance_gain" {variant: its mA - plain mA}, "scored_groups",
    and "sets"."""
    if prepared.attributes is None:
        raise ValueError(f"{prepared.name} has no attribute labels")
    target = vocabulary_targets(format, prepared.attribute_names, prepared.attributes, prompts)
    if torch.isnan(target).all():
        raise ValueError(
            f"none of the attributes of {prepared.name} maps onto the vocabulary's groups "
            f"({', '.join(prompts.attributes)})"
        )
    embeddings = teacher_embeddings(
        teacher, prepared, prompts, focus=focus, sigma=sigma, batch_size=batch_size,
        backend=backend,
    )  # fmt: skip
    values = teacher.text_embeddings(prompts).attributes.cpu()
    variants = {}
    for name, embedded in embeddings.items():
        predicted = group_predictions(embedded, values, prompts.group_sizes)
        metrics = attribute_metrics(predicted, target, prompts.attribute_names)
        metrics["group_accuracy"] = group_accuracy(predicted, target, prompts)
        variants[name] = {"metric": "mA", "value": metrics["mA"], "metrics": metrics}
    plain = variants["plain"]["value"]
    return {
        "metric": "mA",
        "value": plain,
        "metrics": variants["plain"]["metrics"],
        "variants": variants,
        "guidance_gain": {
            name: v["value"] - plain if not math.isnan(v["value"]) else math.nan
            for name, v in variants.items()
            if name != "plain"
        },
        "scored_groups": list(variants["plain"]["metrics"]["group_accuracy"]),
        "focus": focus,
        "sets": {"test": len(prepared)},
    }
