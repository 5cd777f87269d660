"""The public return types of `clasp.kernels`: `Routing` (from `route`) and `PatchLabels`
(from `patch_text_labels`). The Triton ops and their references return the same types."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """Routing of T = B*N tokens to E experts, k experts per token.

    A token's k choices are its slots: slot s = t * k + j is choice j of token t. The fp32
    fields are fp64 when `route` ran the reference on fp64 inputs.
    """

    expert_idx: torch.Tensor  # (T, k) int32, expert of each slot, by descending probability
    weights: torch.Tensor  # (T, k) fp32, gate weight of each slot
    counts: torch.Tensor  # (E,) int32, slots per expert
    offsets: torch.Tensor  # (E+1,) int32, exclusive cumulative sum of counts
    sorted_slots: torch.Tensor  # (T*k,) int32, slots grouped by expert, ascending within one
    probs_mean: torch.Tensor  # (E,) fp32, mean router probability per expert
    z_loss: torch.Tensor  # () fp32, mean over tokens of logsumexp(logits)^2


class PatchLabels(NamedTuple):
    labels: torch.Tensor  # (B, N) int64, argmax class, or -1 under the threshold
    confidence: torch.Tensor  # (B, N) fp32, max class probability
    probs: torch.Tensor | None  # (B, N, C) fp32 when asked for
