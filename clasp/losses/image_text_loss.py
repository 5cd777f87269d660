"""Image-text contrastive loss (CLIP's InfoNCE, as VAL-PAT pre-trains with): each image
embedding against the text embeddings of its batch, in both directions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def image_text_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    text_ids: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of N (image, text) pairs.

    Args:
        image: (N, E) image embeddings; text: (N, E) text embeddings (both normalised here).
        logit_scale: scalar, the inverse temperature (already exponentiated and clamped).
        text_ids: (N,) int64 identity of each text, -1 where a sample has none. Samples whose
            texts are equal are positives of each other (the target spreads evenly over
            them), not negatives: a batch may hold several images of one caption. Samples
            with id -1 take no part. None: every text is distinct.
        weights: (N,) per-sample weights (a task's share of the loss); a sample of weight 0
            takes no part in the contrast. None: all 1.
    Returns: the mean over the samples that have a text (id >= 0) of weight x the mean of
    the image-to-text and text-to-image cross-entropies, 0 for a sample that takes no part
    (a zero that keeps the graph when fewer than two take part).
    """
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(
            f"image and text embeddings must both be (N, E), got {tuple(image.shape)} and "
            f"{tuple(text.shape)}"
        )
    if text_ids is None:
        text_ids = torch.arange(image.shape[0], device=image.device)
    has_text = text_ids >= 0
    if weights is None:
        weights = torch.ones(image.shape[0], device=image.device)
    keep = has_text & (weights > 0)
    if int(keep.sum()) < 2:
        return image.sum() * 0.0 + logit_scale * 0.0
    dtype = torch.promote_types(image.dtype, torch.float32)
    image = F.normalize(image[keep].to(dtype), dim=-1)
    text = F.normalize(text[keep].to(dtype), dim=-1)
    ids = text_ids[keep]
    logits = logit_scale.to(dtype) * image @ text.T  # (n, n): image i against text j
    same = (ids[:, None] == ids[None, :]).to(dtype)
    targets = same / same.sum(1, keepdim=True)  # symmetric: the same targets both ways
    image_to_text = -(targets * logits.log_softmax(1)).sum(1)
    text_to_image = -(targets * logits.T.log_softmax(1)).sum(1)
    per_sample = 0.5 * (image_to_text + text_to_image) * weights[keep].to(dtype)
    return per_sample.sum() / has_text.sum()
