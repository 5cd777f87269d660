"""Schedules as pure functions of the step, so a resumed run needs only the step number;
used by pre-training, fine-tuning and the teacher fit."""

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
