"""Per-step schedules, pure functions of the step so a resumed run needs only the step number."""

from __future__ import annotations

import math


def cosine(
    step: int, total: int, start: float, end: float, warmup: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warmup from warmup_start to start over `warmup` steps, then a half cosine from
    start to end, reached at step total - 1 (and held after)."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    span = max(total - 1 - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """start -> end linearly over `warmup` steps, then end."""
    if step >= warmup:
        return end
    return start + (end - start) * step / warmup


class Schedules:
    """Learning rate, weight decay, EMA momentum and DINO teacher temperature at a step."""

    def __init__(self, optim: dict, loss: dict):
        self.optim, self.loss = optim, loss
        self.total = int(optim["steps"])

    def __call__(self, step: int) -> dict[str, float]:
        o, l = self.optim, self.loss
        return {
            "lr": cosine(step, self.total, o["lr"], o["min_lr"], o["warmup_steps"]),
            "weight_decay": cosine(step, self.total, o["weight_decay"], o["weight_decay_end"]),
            "momentum": cosine(step, self.total, o["momentum_teacher"], 1.0),
            "teacher_temp": linear_warmup(
                step, l["warmup_teacher_temp_steps"], l["warmup_teacher_temp"], l["teacher_temp"]
            ),
        }
