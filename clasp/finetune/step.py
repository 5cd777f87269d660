"""The fine-tuned model (backbone + a recipe's head), its optimiser with layer-wise lr decay,
and one optimiser step: the step object of the shared `TrainingLoop`."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from clasp.losses import load_balance_loss, router_z_loss
from clasp.model.vit import ClaspViT
from clasp.train import distributed
from clasp.train.loop import clip_and_check
from clasp.train.schedules import cosine

NO_DECAY_SUFFIXES = (".bias", ".b1", ".b2")


class FinetuneModel(nn.Module):
    """backbone + head. forward(images (B, 3, H, W) normalised, task_weights (B, n_tasks))
    -> (the head's output on (pooled (B, D), patches (B, gh, gw, D)), routing statistics
    {probs_mean (R, E), counts (R, E), z_loss (R,)} or None without PC-MoE blocks)."""

    def __init__(self, backbone: ClaspViT, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        if not backbone.moe_blocks:  # nothing reads the prompt: DDP must not wait for its grad
            backbone.prompts.embedding.requires_grad_(False)

    def features(self, images: torch.Tensor, task_weights: torch.Tensor):
        B, _, H, W = images.shape
        gh, gw = self.backbone.grid_size(H, W)
        tokens, routings = self.backbone.forward_tokens(images, task_weights)
        prefix = self.backbone.vit.num_prefix_tokens
        patches = tokens[:, prefix:].reshape(B, gh, gw, -1)
        stats = None
        if routings:
            stats = {
                "probs_mean": torch.stack([r.probs_mean for r in routings]),
                "counts": torch.stack([r.counts for r in routings]),
                "z_loss": torch.stack([r.z_loss for r in routings]),
            }
        return tokens[:, 0], patches, stats

    def forward(self, images: torch.Tensor, task_weights: torch.Tensor):
        pooled, patches, stats = self.features(images, task_weights)
        return self.head(pooled, patches), stats


def layer_id(name: str, depth: int, first_moe: int | None) -> int:
    """The LLRD layer of a FinetuneModel parameter: 0 for the patch embedding and the tokens
    added to it, i + 1 for block i, depth + 1 for the final norm and the head. The prompts
    act only inside the PC-MoE blocks: they take the first MoE block's layer."""
    if name.startswith("head."):
        return depth + 1
    name = name.removeprefix("backbone.")
    if name.startswith("prompts."):
        return first_moe + 1 if first_moe is not None else 0
    match = re.match(r"vit\.blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith(("vit.norm.", "vit.fc_norm.", "vit.head.")):
        return depth + 1
    return 0  # patch_embed, cls_token, pos_embed, reg_token, norm_pre


def parameter_groups(model: FinetuneModel, optim: dict) -> list[dict]:
    """AdamW groups, one per (layer, weight decay or not), each with its "lr_scale"."""
    backbone = model.backbone
    depth = len(backbone.vit.blocks)
    first_moe = backbone.moe_blocks[0] if backbone.moe_blocks else None
    no_decay = {f"backbone.{n}" for n in backbone.no_weight_decay()}
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth, first_moe)
        decay = not (param.ndim <= 1 or name in no_decay or name.endswith(NO_DECAY_SUFFIXES))
        scale = optim["layer_decay"] ** (depth + 1 - layer)
        if name.startswith("head."):
            scale *= optim["head_lr_scale"]
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "lr_scale": scale,
                "weight_decay": optim["weight_decay"] if decay else 0.0,
                "layer": layer,
            },
        )
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


class FinetuneStep:
    """Runs one optimiser step of a recipe: forward under autocast, the recipe's loss terms
    plus the MoE auxiliaries, backward, clipping, a finite check shared by all ranks."""

    def __init__(self, config: dict, world: distributed.World, model: FinetuneModel, recipe):
        self.config, self.world, self.recipe = config, world, recipe
        self.device = world.device
        self.model = model.to(self.device)
        if config["train"]["compile"]:
            self.model.compile()
        self.wrapped = distributed.wrap(self.model, config["distributed"]["strategy"], world)
        optim = config["optim"]
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, optim), lr=optim["lr"], betas=tuple(optim["betas"])
        )
        self.total = int(optim["steps"])
        self.warmup = int(optim["warmup_steps"])
        self.task = recipe.task
        amp = config["train"]["amp"]
        self.amp_dtype = (
            torch.bfloat16 if amp == "bf16" or (amp == "auto" and self.device.type == "cuda")
            else None
        )  # fmt: skip
        self.extra_state: dict = {}  # saved beside the model (the backbone and head configs)

    # -- the loop's interface -----------------------------------------------------------------
    def train(self) -> None:
        self.wrapped.train()

    def state_dict(self) -> dict:
        return {
            "model": distributed.full_model_state(self.wrapped),
            "optimizer": distributed.full_optimizer_state(self.wrapped, self.optimizer),
            **self.extra_state,
        }

    def load_state_dict(self, state: dict) -> None:
        distributed.load_model_state(self.wrapped, state["model"])
        distributed.load_optimizer_state(self.wrapped, self.optimizer, state["optimizer"])

    def lr(self, step: int) -> float:
        o = self.config["optim"]
        return cosine(step, self.total, o["lr"], o["min_lr"], self.warmup)

    def task_weights(self, batch_size: int) -> torch.Tensor:
        return self.model.backbone.prompts.weights(self.task, batch_size, self.device)

    def __call__(self, batch: dict, step: int, stop: int = 0) -> tuple[dict, bool, int]:
        """Optimiser step `step` (0-based); see `clasp.train.loop` for the contract."""
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        images = batch["image"].to(self.device, non_blocking=True)
        weights = self.task_weights(images.shape[0])
        with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            out, stats = self.wrapped(images, weights)
        terms = self.recipe.losses(out, batch, self.device)
        if stats is not None:
            terms["load_balance"] = load_balance_loss(stats["probs_mean"], stats["counts"])
            terms["z_loss"] = router_z_loss(stats["z_loss"])
        weights_of = self.config["loss"]
        total = sum(float(weights_of.get(name, 1.0)) * value for name, value in terms.items())
        total.backward()
        metrics, finite, stop_any = clip_and_check(
            self.optimizer, total, terms, self.config["optim"]["clip_grad"], stop
        )
        metrics["lr"] = lr
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return metrics, False, stop_any
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics, True, stop_any
