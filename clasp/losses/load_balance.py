"""Switch-Transformer load-balancing loss for the PC-MoE routers."""

from __future__ import annotations

import torch


def load_balance_loss(probs_mean: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """E * sum_e fraction_e * probs_mean_e, averaged over routers.

    probs_mean (R, E): mean router probability per expert (differentiable); counts (R, E):
    slots routed to each expert (fraction_e = counts_e / sum counts). Equals 1 when routing is
    uniform and grows to E as the load concentrates on one expert; only probs_mean carries a
    gradient, pushing probability away from overloaded experts.
    """
    if probs_mean.shape != counts.shape:
        raise ValueError(f"probs_mean {tuple(probs_mean.shape)} != counts {tuple(counts.shape)}")
    E = probs_mean.shape[-1]
    fraction = counts.float() / counts.float().sum(-1, keepdim=True).clamp_min(1)
    return (E * (fraction * probs_mean.float()).sum(-1)).mean()
