"""Metrics of the frozen-feature protocols, on plain tensors.

- Re-identification (`reid_metrics`): query-to-gallery retrieval with L2-normalised features
  and cosine distance. For each query the gallery entries of the same identity seen by the
  same camera are removed (Market-1501's protocol: they are too easy), as are junk entries
  (pid -1). A query left with no true match in the gallery is skipped and counted. CMC
  rank-k is the fraction of valid queries whose first true match is among the k nearest;
  AP is the mean, over the query's true matches, of the precision at each match's rank;
  mAP averages AP over valid queries. Equal distances keep gallery order (stable sort).
- Attributes (`attribute_metrics`): label-based mean accuracy mA, the mean over attributes
  of (TPR + TNR) / 2, counting only attributes that have both positive and negative known
  examples (the others are listed, not scored); and instance-based accuracy, precision,
  recall and F1 as in the PETA / PA-100K evaluations: per sample |pred & gt| / |pred | gt|,
  |pred & gt| / |pred| and |pred & gt| / |gt| (0 where the denominator is empty), averaged
  over samples, and F1 = 2 P R / (P + R) of the averages. Unknown labels (NaN) are ignored.
- Parsing (`confusion_matrix`, `segmentation_metrics`): a dataset-level confusion matrix
  accumulated over images; IoU per class = TP / (TP + FP + FN); mIoU averages the classes
  present in the ground truth or the prediction (absent from both: excluded). Pixels whose
  ground truth is the ignore index are not counted; a predicted ignore index (-1, "no label")
  counts as a miss of the true class.
- Pose (`pck`): a keypoint is correct when its predicted position lies within
  alpha * normaliser pixels of the truth; only keypoints with visibility >= min_visibility
  count. `keypoint_box_size` gives the normaliser used by the pose protocol: the longer side
  of the box around the person's labelled keypoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reid_metrics(
    query: torch.Tensor,
    query_pids: torch.Tensor,
    query_cameras: torch.Tensor,
    gallery: torch.Tensor,
    gallery_pids: torch.Tensor,
    gallery_cameras: torch.Tensor,
    ranks: tuple[int, ...] = (1, 5, 10),
) -> dict:
    """Retrieval metrics (see the module doc).

    Args:
        query: (Q, D) features; gallery: (G, D) features (normalised here).
        query_pids, query_cameras: (Q,) int; gallery_pids, gallery_cameras: (G,) int.
            A camera of -1 means unknown: then only the same image's identity is used, and
            no same-camera match is removed.
    Returns: {"mAP", "rank1", "rank5", ..., "num_queries", "num_valid_queries",
    "num_skipped_queries"}; metrics are fractions in [0, 1] over valid queries (NaN if none).
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query (Q, D) and gallery (G, D) must share D, got {tuple(query.shape)} and "
            f"{tuple(gallery.shape)}"
        )
    q = F.normalize(query.double(), dim=1)
    g = F.normalize(gallery.double(), dim=1)
    distance = 1.0 - q @ g.T  # (Q, G) cosine distance
    return retrieval_metrics(
        distance, query_pids, query_cameras, gallery_pids, gallery_cameras, ranks
    )


def retrieval_metrics(
    distance: torch.Tensor,
    query_pids: torch.Tensor,
    query_cameras: torch.Tensor,
    gallery_pids: torch.Tensor,
    gallery_cameras: torch.Tensor,
    ranks: tuple[int, ...] = (1, 5, 10),
) -> dict:
    """`reid_metrics` from a (Q, G) distance matrix (smaller is nearer), e.g. a re-ranked one."""
    if distance.shape != (len(query_pids), len(gallery_pids)):
        raise ValueError(
            f"distance {tuple(distance.shape)} must be (queries {len(query_pids)}, gallery "
            f"{len(gallery_pids)})"
        )
    order = torch.argsort(distance, dim=1, stable=True)
    g_pids, g_cams = gallery_pids.long()[order], gallery_cameras.long()[order]
    q_pids, q_cams = query_pids.long()[:, None], query_cameras.long()[:, None]
    same_view = (g_pids == q_pids) & (g_cams == q_cams) & (q_cams >= 0)
    keep = ~same_view & (g_pids != -1)
    matches = (g_pids == q_pids) & keep

    cmc = torch.zeros(len(ranks), dtype=torch.float64)
    ap_sum, valid = 0.0, 0
    for i in range(distance.shape[0]):
        hits = matches[i][keep[i]].double()  # relevance in rank order, removed entries dropped
        n_hits = hits.sum()
        if n_hits == 0 or query_pids[i] < 0:
            continue
        valid += 1
        first = int(torch.nonzero(hits)[0])
        cmc += torch.tensor([float(first < k) for k in ranks], dtype=torch.float64)
        positions = torch.arange(1, hits.numel() + 1, dtype=torch.float64)
        precision_at_hits = torch.cumsum(hits, 0)[hits > 0] / positions[hits > 0]
        ap_sum += float(precision_at_hits.sum() / n_hits)
    nan = float("nan")
    out = {"mAP": ap_sum / valid if valid else nan}
    for k, value in zip(ranks, cmc.tolist(), strict=True):
        out[f"rank{k}"] = value / valid if valid else nan
    out.update(
        num_queries=int(distance.shape[0]),
        num_valid_queries=valid,
        num_skipped_queries=int(distance.shape[0]) - valid,
    )
    return out


def attribute_metrics(
    predicted: torch.Tensor, target: torch.Tensor, names: list[str] | None = None
) -> dict:
    """Label-based mA and instance-based metrics (see the module doc).

    Args:
        predicted: (N, A) bool or 0/1 predictions.
        target: (N, A) float 0/1, NaN where unknown.
        names: optional attribute names for the per-attribute report.
    Returns: {"mA", "instance_accuracy", "instance_precision", "instance_recall",
    "instance_f1", "num_scored_attributes", "unscored_attributes", "per_attribute_accuracy"}.
    """
    if predicted.shape != target.shape or predicted.ndim != 2:
        raise ValueError(
            f"predicted and target must both be (N, A), got {tuple(predicted.shape)} and "
            f"{tuple(target.shape)}"
        )
    known = ~torch.isnan(target)
    gt = (target == 1) & known
    pred = predicted.bool() & known
    positives, negatives = gt.sum(0), (known & ~gt).sum(0)
    true_pos = (pred & gt).sum(0)
    true_neg = (~pred & known & ~gt).sum(0)
    scored = (positives > 0) & (negatives > 0)
    balanced = 0.5 * (
        true_pos.double() / positives.clamp(min=1) + true_neg.double() / negatives.clamp(min=1)
    )
    names = names or [str(i) for i in range(target.shape[1])]
    mean_accuracy = float(balanced[scored].mean()) if scored.any() else float("nan")

    intersection = (pred & gt).sum(1).double()
    union = (pred | gt).sum(1).double()
    n_pred, n_gt = pred.sum(1).double(), gt.sum(1).double()

    def ratio(num, den):
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    accuracy = float(ratio(intersection, union).mean())
    precision = float(ratio(intersection, n_pred).mean())
    recall = float(ratio(intersection, n_gt).mean())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "mA": mean_accuracy,
        "instance_accuracy": accuracy,
        "instance_precision": precision,
        "instance_recall": recall,
        "instance_f1": f1,
        "num_scored_attributes": int(scored.sum()),
        "unscored_attributes": [n for n, s in zip(names, scored.tolist(), strict=True) if not s],
        "per_attribute_accuracy": {
            n: float(b) for n, b, s in zip(names, balanced, scored.tolist(), strict=True) if s
        },
    }


def confusion_matrix(
    predicted: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = -1
) -> torch.Tensor:
    """(C, C + 1) int64 counts: rows the true class, columns the predicted class, the last
    column predictions outside 0..C-1 (no label). Pixels whose target is `ignore_index` are
    skipped. predicted and target: integer tensors of one shape."""
    if predicted.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(predicted.shape)} and target {tuple(target.shape)} differ"
        )
    target = target.reshape(-1).long()
    predicted = predicted.reshape(-1).long()
    valid = target != ignore_index
    if ((target[valid] < 0) | (target[valid] >= num_classes)).any():
        raise ValueError(f"target labels outside 0..{num_classes - 1} and not {ignore_index}")
    target, predicted = target[valid], predicted[valid]
    predicted = torch.where(
        (predicted >= 0) & (predicted < num_classes), predicted, torch.full_like(predicted, -1)
    )
    predicted = torch.where(predicted < 0, torch.full_like(predicted, num_classes), predicted)
    flat = target * (num_classes + 1) + predicted
    counts = torch.bincount(flat, minlength=num_classes * (num_classes + 1))
    return counts.view(num_classes, num_classes + 1)


def segmentation_metrics(confusion: torch.Tensor, names: list[str] | None = None) -> dict:
    """mIoU, pixel accuracy and per-class IoU from a `confusion_matrix` (summed over images).

    Returns {"mIoU", "pixel_accuracy", "per_class_iou" {name: IoU, absent classes left out},
    "absent_classes"}."""
    num_classes = confusion.shape[0]
    confusion = confusion.double()
    true_pos = confusion[:, :num_classes].diagonal()
    gt_total = confusion.sum(1)
    pred_total = confusion[:, :num_classes].sum(0)
    union = gt_total + pred_total - true_pos
    present = union > 0
    iou = torch.where(present, true_pos / union.clamp(min=1), torch.full_like(union, float("nan")))
    names = names or [str(i) for i in range(num_classes)]
    total = float(gt_total.sum())
    return {
        "mIoU": float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_accuracy": float(true_pos.sum()) / total if total else float("nan"),
        "per_class_iou": {
            n: float(v) for n, v, p in zip(names, iou, present.tolist(), strict=True) if p
        },
        "absent_classes": [n for n, p in zip(names, present.tolist(), strict=True) if not p],
    }


def keypoint_box_size(keypoints: torch.Tensor, min_visibility: float = 1) -> torch.Tensor:
    """(N,) longer side of the box around each person's keypoints with visibility >=
    min_visibility; 0 where fewer than two count. keypoints: (N, K, 3) x, y, visibility."""
    counted = keypoints[..., 2] >= min_visibility
    big = torch.finfo(keypoints.dtype).max
    xy = keypoints[..., :2]
    low = torch.where(counted[..., None], xy, torch.full_like(xy, big)).amin(1)
    high = torch.where(counted[..., None], xy, torch.full_like(xy, -big)).amax(1)
    size = (high - low).amax(1)
    return torch.where(counted.sum(1) >= 2, size, torch.zeros_like(size))


def pck(
    predicted: torch.Tensor,
    target: torch.Tensor,
    normaliser: torch.Tensor,
    alpha: float = 0.2,
    min_visibility: float = 1,
) -> dict:
    """Percentage of correct keypoints.

    Args:
        predicted: (N, K, 2) x, y. target: (N, K, 3) x, y, visibility.
        normaliser: (N,) length per person (see `keypoint_box_size`); people with a
            normaliser of 0 are skipped and counted.
    Returns {"PCK": fraction in [0, 1] (NaN if nothing counts), "per_keypoint" (K,) list
    (NaN where none counts), "num_keypoints", "num_skipped_people"}.
    """
    if predicted.shape[:2] != target.shape[:2] or predicted.shape[-1] != 2:
        raise ValueError(
            f"predicted (N, K, 2) and target (N, K, 3) disagree: {tuple(predicted.shape)}, "
            f"{tuple(target.shape)}"
        )
    predicted, target, normaliser = predicted.double(), target.double(), normaliser.double()
    usable = normaliser > 0
    counted = (target[..., 2] >= min_visibility) & usable[:, None]
    distance = (predicted - target[..., :2]).norm(dim=-1)
    correct = (distance <= alpha * normaliser[:, None]) & counted
    per_keypoint = correct.sum(0).double() / counted.sum(0).clamp(min=1)
    per_keypoint[counted.sum(0) == 0] = float("nan")
    n = int(counted.sum())
    return {
        "PCK": float(correct.sum()) / n if n else float("nan"),
        "per_keypoint": per_keypoint.tolist(),
        "num_keypoints": n,
        "num_skipped_people": int((~usable).sum()),
    }
