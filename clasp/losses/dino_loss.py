"""DINO self-distillation across crops, with a centred, sharpened EMA-teacher target.

The teacher's output on each global crop is centred (a running mean of teacher outputs is
subtracted, which prevents collapse to one prototype) and sharpened with a low temperature;
the student matches it with cross-entropy from every other crop, global and local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DINOLoss(nn.Module):
    """center: (1, K) buffer, the EMA of the teacher's batch-mean output over all ranks."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_targets(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(G*B, K) teacher logits -> (G*B, K) centred, sharpened probabilities (fp32)."""
        return F.softmax((_at_least_fp32(teacher_output) - self.center) / teacher_temp, dim=-1)

    def forward(
        self,
        student_global: torch.Tensor,
        student_local: torch.Tensor | None,
        teacher_targets: torch.Tensor,
        n_global: int,
    ) -> torch.Tensor:
        """Per-sample loss (B,): cross-entropy averaged over every (teacher crop, student crop)
        pair of different crops.

        student_global (G*B, K), student_local (L*B, K) or None, teacher_targets (G*B, K);
        crops crop-major (rows c*B .. c*B+B-1 are crop c of the B samples)."""
        targets = teacher_targets.chunk(n_global)
        students = list(_at_least_fp32(student_global).chunk(n_global))
        if student_local is not None:
            B = targets[0].shape[0]
            students += list(_at_least_fp32(student_local).split(B))
        log_probs = [F.log_softmax(s / self.student_temp, dim=-1) for s in students]
        total = torch.zeros_like(targets[0][:, 0])
        pairs = 0
        for t_index, target in enumerate(targets):
            for s_index, log_p in enumerate(log_probs):
                if s_index == t_index:  # a crop never teaches itself
                    continue
                total = total - (target * log_p).sum(-1)
                pairs += 1
        if pairs == 0:
            raise ValueError("DINO needs at least two crops (two globals, or a global and a local)")
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Move the center towards the batch mean of the teacher output (mean over all ranks)."""
        batch_sum = teacher_output.float().sum(0, keepdim=True)
        count = torch.tensor(float(teacher_output.shape[0]), device=batch_sum.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_mean = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
