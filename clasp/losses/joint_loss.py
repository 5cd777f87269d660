"""Joint pseudo-labels from the part pseudo-labels, and their loss.

A joint of the body is where two of its parts meet: the neck where the head meets the torso,
the hips where the torso meets the legs, the ankles where the legs meet the feet. So the
patches at which the teacher's labels of two body parts touch mark where the joint between
them is. For each pair of body parts, a spatial softmax over the patches is trained towards
the distribution of those junction patches: the features must localise landmarks, which is
what pose estimation asks of them, rather than classify every patch as the part loss does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKGROUND = "background"


def part_pairs(part_names: Sequence[str]) -> list[tuple[int, int]]:
    """(a, b) class indexes, a < b, of every pair of body parts (classes other than
    "background"): the joints a `JointLoss` head predicts, in this order."""
    body = [i for i, name in enumerate(part_names) if name != BACKGROUND]
    return [(a, b) for i, a in enumerate(body) for b in body[i + 1 :]]


def junctions(labels: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """labels (N, gh, gw) int64 part classes (negative: unlabelled) -> (N, gh, gw, P) bool:
    a patch of part a with a 4-neighbour of part b, or of b with a neighbour of a, for each
    pair (a, b)."""
    num_classes = max(max(pair) for pair in pairs) + 1
    onehot = F.one_hot(labels.clamp(min=0), num_classes).bool() & (labels >= 0)[..., None]
    padded = F.pad(onehot.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    neighbour = (
        padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    )
    a = torch.tensor([p[0] for p in pairs], device=labels.device)
    b = torch.tensor([p[1] for p in pairs], device=labels.device)
    return (onehot[..., a] & neighbour[..., b]) | (onehot[..., b] & neighbour[..., a])


class JointLoss(nn.Module):
    """Per pair of body parts, the cross-entropy between a softmax of its logits over the
    patches and the uniform distribution over its junction patches; per sample, the mean
    over the pairs that meet in its labels. `pairs`: from `part_pairs`."""

    def __init__(self, pairs: Sequence[tuple[int, int]]):
        super().__init__()
        if not pairs:
            raise ValueError("joints need at least two body-part classes besides background")
        self.pairs = list(pairs)

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (N, gh, gw, P), labels (N, gh, gw) int64 -> (loss (N,), has_joint (N,)
        bool: whether any pair meets in the sample's labels; else its loss is 0)."""
        if logits.shape[:-1] != labels.shape or logits.shape[-1] != len(self.pairs):
            raise ValueError(
                f"joint logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} "
                f"and {len(self.pairs)} part pairs"
            )
        N, P = logits.shape[0], logits.shape[-1]
        target = junctions(labels, self.pairs).reshape(N, -1, P).float()
        count = target.sum(1)  # (N, P) junction patches of each pair
        present = count > 0
        log_p = logits.to(torch.promote_types(logits.dtype, torch.float32))
        log_p = log_p.reshape(N, -1, P).log_softmax(1)
        per_pair = -(target * log_p).sum(1) / count.clamp_min(1)  # (N, P)
        pairs_present = present.sum(1)
        loss = (per_pair * present).sum(1) / pairs_present.clamp_min(1)
        return loss, pairs_present > 0
