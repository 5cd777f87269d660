"""Router z-loss (ST-MoE): keeps router logits small so the softmax stays well conditioned."""

from __future__ import annotations

import torch


def router_z_loss(z_loss: torch.Tensor) -> torch.Tensor:
    """z_loss (R,): each router's mean over tokens of logsumexp(logits)^2 (from `route`);
    returns their mean."""
    return z_loss.float().mean()
