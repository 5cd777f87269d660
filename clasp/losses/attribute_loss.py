"""Attribute binary cross-entropy against the teacher's soft pseudo-labels."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AttributeLoss(nn.Module):
    """Per-sample mean BCE-with-logits over attributes with soft targets in [0, 1]; NaN
    targets (attribute unknown) do not count."""

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (N, A), targets (N, A) float -> (loss (N,), labelled (N,) bool)."""
        if logits.shape != targets.shape:
            raise ValueError(
                f"attribute targets {tuple(targets.shape)} do not match logits "
                f"{tuple(logits.shape)}"
            )
        known = ~torch.isnan(targets)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        per_attribute = F.binary_cross_entropy_with_logits(
            logits.to(dtype), torch.where(known, targets, 0.0).to(dtype), reduction="none"
        )
        counts = known.sum(1)
        loss = (per_attribute * known).sum(1) / counts.clamp_min(1)
        return loss, counts > 0
