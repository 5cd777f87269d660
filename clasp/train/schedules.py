"""Per-step schedules, pure functions of the step so a resumed run needs only the step number."""

from __future__ import annotations

from clasp.schedules import cosine, linear_warmup


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
