"""Part-label cross-entropy on patch tokens against the teacher's per-patch pseudo-labels."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PartLoss(nn.Module):
    """Per-sample mean cross-entropy over the labelled patches; patches labelled
    `ignore_index` (the teacher was not confident) do not count."""

    def __init__(self, ignore_index: int = -1, label_smoothing: float = 0.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (N, gh, gw, C), labels (N, gh, gw) int64 ->
        (loss (N,), labelled (N,) bool: whether the sample had a labelled patch; else loss 0)."""
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"part labels {tuple(labels.shape)} do not match the logits grid "
                f"{tuple(logits.shape[:-1])}"
            )
        N, C = logits.shape[0], logits.shape[-1]
        per_patch = F.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, C),
            labels.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="none",
            label_smoothing=self.label_smoothing,
        ).reshape(N, -1)
        valid = (labels != self.ignore_index).reshape(N, -1)
        counts = valid.sum(1)
        loss = (per_patch * valid).sum(1) / counts.clamp_min(1)
        return loss, counts > 0
