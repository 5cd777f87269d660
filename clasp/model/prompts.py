"""Task prompts: one learnable embedding per downstream task, mixed per sample.

A sample's prompt is `weights @ embeddings`, with weights (n_tasks,): one-hot during
pre-training (each sample draws a task), any mix at inference (like SOLIDER's lambda, which
trades semantics against appearance). With `normalize`, the mixed prompt goes through a
LayerNorm: every prompt then has the per-channel scale of a LayerNormed token (norm about
sqrt(dim)), so its share of the router logits and of the token modulation is of the same
order as the tokens' own, whatever the embeddings' norm; the norm's gain is learnt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

TASKS = ("reid", "attributes", "parsing", "pose", "generic")

# What each task asks of the backbone, in words a CLIP text encoder understands; used to
# initialise the prompts so that related tasks start with related prompts.
TASK_DESCRIPTIONS = {
    "reid": "a photo for recognising the identity of a person across cameras",
    "attributes": "a photo for recognising the clothes, gender, age and belongings of a person",
    "parsing": "a photo for segmenting the head, torso, arms, legs and feet of a person",
    "pose": "a photo for locating the joints and keypoints of a person's body",
    "generic": "a photo of a person",
}

TaskSpec = str | Mapping[str, float] | Sequence[str] | torch.Tensor | None


class TaskPrompts(nn.Module):
    """embedding: (n_tasks, dim). forward(weights (B, n_tasks)) -> prompts (B, dim)."""

    def __init__(self, tasks: Sequence[str] = TASKS, dim: int = 192, normalize: bool = True):
        super().__init__()
        if len(set(tasks)) != len(tasks) or not tasks:
            raise ValueError(f"tasks must be distinct names, got {list(tasks)}")
        self.tasks = tuple(tasks)
        self.embedding = nn.Parameter(torch.empty(len(tasks), dim))
        nn.init.trunc_normal_(self.embedding, std=0.02)
        self.norm = nn.LayerNorm(dim) if normalize else nn.Identity()

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return self.norm(weights.to(self.embedding.dtype) @ self.embedding)

    def index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ValueError(
                f"unknown task {task!r}; this model knows {list(self.tasks)}"
            ) from None

    def weights(self, task: TaskSpec, batch_size: int, device: torch.device) -> torch.Tensor:
        """Per-sample task weights (B, n_tasks) from any of:
        a task name (every sample), a {task: weight} mix (every sample), a list of B task
        names (one per sample), a (n_tasks,) or (B, n_tasks) weight tensor. None = "generic"
        if the model has it, else the first task."""
        n = len(self.tasks)
        if task is None:
            task = "generic" if "generic" in self.tasks else self.tasks[0]
        if isinstance(task, str):
            out = torch.zeros(batch_size, n, device=device)
            out[:, self.index(task)] = 1.0
            return out
        if isinstance(task, Mapping):
            row = torch.zeros(n, device=device)
            for name, weight in task.items():
                row[self.index(name)] = float(weight)
            return row.expand(batch_size, n).clone()
        if isinstance(task, torch.Tensor):
            if task.dim() == 1:
                task = task.expand(batch_size, -1)
            if task.shape != (batch_size, n):
                raise ValueError(
                    f"task weights must be ({n},) or ({batch_size}, {n}) for tasks "
                    f"{list(self.tasks)}, got {tuple(task.shape)}"
                )
            if not torch.isfinite(task).all():
                raise ValueError("task weights contain NaN or Inf")
            return task.to(device=device, dtype=torch.float32)
        names = list(task)
        if len(names) != batch_size or not all(isinstance(t, str) for t in names):
            raise TypeError(
                "task must be a name, a {name: weight} dict, a list of one name per sample "
                f"({batch_size}), or a weight tensor; got {type(task).__name__}"
            )
        out = torch.zeros(batch_size, n, device=device)
        out[torch.arange(batch_size), [self.index(t) for t in names]] = 1.0
        return out

    @torch.no_grad()
    def init_from_text(
        self,
        encode_text: Callable[[list[str]], torch.Tensor],
        descriptions: Mapping[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        """Set the prompts from text embeddings of task descriptions.

        encode_text: list of n strings -> (n, E) embeddings (e.g. `ClipTeacher.encode_text`).
        When E differs from the prompt dim, a fixed random Gaussian projection maps them (it
        keeps the angles between tasks, which is what the router can use). Each prompt is
        rescaled to the norm of the random initialisation so training starts at the same scale.
        """
        descriptions = {**TASK_DESCRIPTIONS, **(descriptions or {})}
        missing = [t for t in self.tasks if t not in descriptions]
        if missing:
            raise ValueError(f"no text description for tasks {missing}")
        text = encode_text([descriptions[t] for t in self.tasks]).float().cpu()
        if text.shape[0] != len(self.tasks):
            raise ValueError(f"encode_text returned {text.shape[0]} rows for {len(self.tasks)}")
        if len(self.tasks) > 1:  # CLIP texts share a large common component; keep what differs
            text = text - text.mean(0, keepdim=True)
        dim = self.embedding.shape[1]
        if text.shape[1] != dim:
            generator = torch.Generator().manual_seed(seed)
            projection = torch.randn(text.shape[1], dim, generator=generator)
            text = text @ projection / math.sqrt(dim)
        scale = 0.02 * math.sqrt(dim)
        text = text / text.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale
        self.embedding.copy_(text.to(self.embedding))
