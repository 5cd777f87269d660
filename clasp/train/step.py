"""One pre-training step: the student and its EMA teacher, the losses, the optimiser.

Multi-crop self-distillation from the EMA teacher, plus the part and attribute pseudo-label
losses weighted per sample by the sample's task, plus image-text alignment (with
`loss.image_text`: every sample, whatever its task), plus the MoE auxiliaries. Used by the
training loop (`Trainer`) and, on synthetic batches, by the training-step benchmark.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from clasp.losses import (
    AttributeLoss,
    DINOLoss,
    JointLoss,
    PartLoss,
    image_text_loss,
    load_balance_loss,
    router_z_loss,
)
from clasp.model import build_model

from . import distributed
from .loop import clip_and_check
from .pretrain_data import PretrainBatch
from .schedules import Schedules

log = logging.getLogger("clasp.train")

LOSS_TERMS = ("dino", "part", "attribute", "image_text", "joint", "load_balance", "z_loss")
# The losses `loss.shared_task_grad` scales.
TASK_TERMS = ("part", "attribute", "image_text", "joint")
WEIGHTED_TERMS = ("dino", *TASK_TERMS)  # the columns of tasks.loss_weights
NO_DECAY_SUFFIXES = (".bias", ".b1", ".b2")


def check_loss_config(config: dict, world: distributed.World | None = None) -> None:
    """Raise ValueError naming the loss setting that cannot work (with `world`: in it)."""
    share = config["loss"]["shared_task_grad"]
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"loss.shared_task_grad must be in [0, 1], got {share}")
    if share < 1.0 and world is not None and world.distributed:
        raise ValueError(
            "loss.shared_task_grad below 1 runs a second, partial backward pass, which DDP "
            "and FSDP do not support; train in one process or leave it at 1"
        )


class PretrainStep:
    """Builds the student (wrapped for DDP/FSDP), the EMA teacher, losses and optimiser, and
    runs one optimiser step on a `PretrainBatch`; the step object of `TrainingLoop`.

    text_embeddings (U, E): the caption table of image-text alignment (`loss.image_text`),
    indexed by the batch's "caption_id"; None without it."""

    def __init__(
        self,
        config: dict,
        world: distributed.World,
        num_parts: int | None = None,
        num_attributes: int | None = None,
        text_embeddings: torch.Tensor | None = None,
        joint_pairs: list[tuple[int, int]] | None = None,
    ):
        self.config = config
        self.world = world
        self.device = world.device
        torch.manual_seed(int(config["seed"]))  # the same initial weights on every rank
        text_dim = text_embeddings.shape[1] if text_embeddings is not None else None
        model = build_model(
            config,
            num_parts=num_parts,
            num_attributes=num_attributes,
            text_dim=text_dim,
            num_joints=len(joint_pairs) if joint_pairs is not None else None,
        )
        self._init_prompts(model)
        model.to(self.device)
        strategy = config["distributed"]["strategy"]
        if config["train"]["compile"]:
            model.compile()
        teacher = copy.deepcopy(model).requires_grad_(False)
        self.student = distributed.wrap(model, strategy, world)
        self.teacher = distributed.shard(teacher, world) if strategy == "fsdp" else teacher
        self.model = distributed.unwrap(self.student)
        self.optimizer = self._optimizer()
        self.ema_pairs = self._ema_pairs()

        loss = config["loss"]
        self.dino_loss = DINOLoss(
            config["heads"]["dino"]["out_dim"], loss["student_temp"], loss["center_momentum"]
        ).to(self.device)
        self.part_loss = PartLoss(loss["part_ignore_index"])
        self.attribute_loss = AttributeLoss()
        self.joint_loss = JointLoss(joint_pairs) if joint_pairs is not None else None
        self.text_embeddings = (
            text_embeddings.to(self.device) if text_embeddings is not None else None
        )
        self.loss_table = self._loss_table().to(self.device)
        check_loss_config(config, world)
        self.shared_task_grad = float(loss["shared_task_grad"])
        self.task_params = self._task_params()
        self.schedules = Schedules(config["optim"], loss)
        amp = config["train"]["amp"]
        self.amp_dtype = (
            torch.bfloat16 if amp == "bf16" or (amp == "auto" and self.device.type == "cuda")
            else None
        )  # fmt: skip

    def _init_prompts(self, model) -> None:
        source = self.config["prompt_init"]
        if not source["teacher"]:
            return
        from clasp.teacher.loading import load_teacher

        teacher = load_teacher(source["teacher"], source["pretrained"])
        model.backbone.prompts.init_from_text(teacher.encode_text)
        model.backbone.init_routing_priors()
        log.info("task prompts initialised from %s text embeddings", teacher.description)

    def _optimizer(self) -> torch.optim.Optimizer:
        no_decay_names = {f"backbone.{n}" for n in self.model.backbone.no_weight_decay()}
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            skip = param.ndim <= 1 or name in no_decay_names or name.endswith(NO_DECAY_SUFFIXES)
            (no_decay if skip else decay).append(param)
        optim = self.config["optim"]
        return torch.optim.AdamW(
            [{"params": decay, "apply_decay": True}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim["lr"],
            betas=tuple(optim["betas"]),
            weight_decay=optim["weight_decay"],
        )

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        teacher = dict(self.teacher.named_parameters())
        student = dict(self.model.named_parameters())
        if teacher.keys() != student.keys():
            raise RuntimeError("student and EMA teacher have different parameters")
        names = list(student)
        return [teacher[n] for n in names], [student[n] for n in names]

    def _loss_table(self) -> torch.Tensor:
        """(n_tasks, 5) per-task weights of WEIGHTED_TERMS."""
        table = self.config["tasks"]["loss_weights"]
        tasks = self.model.backbone.tasks
        missing = [t for t in tasks if t not in table]
        if missing:
            raise ValueError(f"tasks.loss_weights has no row for tasks {missing}")
        rows = [[float(table[t].get(k, 0.0)) for k in WEIGHTED_TERMS] for t in tasks]
        return torch.tensor(rows)

    def _task_params(self) -> list[torch.Tensor]:
        """What the prompt selects (PC-MoE experts and routers, prompts, modulation) and the
        task heads: the weights the task losses train in full (see loss.shared_task_grad)."""
        model, backbone = self.model, self.model.backbone
        modules = [*backbone.moe_layers, backbone.prompts, backbone.modulation]
        modules += [model.part_head, model.attribute_head, model.image_text_head, model.joint_head]
        return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]

    # -- the loop's interface -----------------------------------------------------------------
    def train(self) -> None:
        self.student.train()

    def state_dict(self) -> dict:
        """model, teacher, optimizer and dino_loss states (full, on CPU); a collective."""
        return {
            "model": distributed.full_model_state(self.student),
            "teacher": distributed.full_model_state(self.teacher),
            "optimizer": distributed.full_optimizer_state(self.student, self.optimizer),
            "dino_loss": {k: v.cpu() for k, v in self.dino_loss.state_dict().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        distributed.load_model_state(self.student, state["model"])
        distributed.load_model_state(self.teacher, state["teacher"])
        distributed.load_optimizer_state(self.student, self.optimizer, state["optimizer"])
        self.dino_loss.load_state_dict(state["dino_loss"])

    # -- one step -----------------------------------------------------------------------------
    def compute_losses(
        self, batch: PretrainBatch, values: dict
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(loss terms, the EMA teacher's DINO logits of the global crops, for the center)."""
        G = self.config["crops"]["n_global"]
        crops = [c.to(self.device, non_blocking=True) for c in batch["crops"]]
        global_crops = torch.cat(crops[:G])
        local_crops = torch.cat(crops[G:]) if len(crops) > G else None
        task = batch["task"].to(self.device)
        task_weights = F.one_hot(task, len(self.model.backbone.tasks)).float()
        with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            with torch.no_grad():
                teacher_out = self.teacher(global_crops, task_weights, None, label_heads=False)
            out = self.student(global_crops, task_weights, local_crops)
        # Each sample's weight of each loss, by its task: {term: (B,)}.
        weights = dict(zip(WEIGHTED_TERMS, self.loss_table[task].unbind(1), strict=True))
        targets = self.dino_loss.teacher_targets(teacher_out["dino_global"], values["teacher_temp"])
        dino = self.dino_loss(out["dino_global"], out["dino_local"], targets, G)
        terms = {"dino": (weights["dino"] * dino).mean()}
        B = task.shape[0]
        if out["part_logits"] is not None or out["joint_logits"] is not None:
            labels = torch.cat(batch["pseudo_parts"][:G]).to(self.device, non_blocking=True)
        if out["part_logits"] is not None:
            per_crop, _ = self.part_loss(out["part_logits"], labels)
            terms["part"] = (weights["part"] * per_crop.view(G, B).mean(0)).mean()
        if out["joint_logits"] is not None:
            per_crop, _ = self.joint_loss(out["joint_logits"], labels)
            terms["joint"] = (weights["joint"] * per_crop.view(G, B).mean(0)).mean()
        if out["attribute_logits"] is not None:
            soft = batch["pseudo_attributes"].to(self.device, non_blocking=True).repeat(G, 1)
            per_crop, _ = self.attribute_loss(out["attribute_logits"], soft)
            terms["attribute"] = (weights["attribute"] * per_crop.view(G, B).mean(0)).mean()
        if out["image_text"] is not None:
            ids = batch["caption_id"].to(self.device, non_blocking=True)
            texts = self.text_embeddings[ids.clamp(min=0)]
            per_crop = [
                image_text_loss(image, texts, out["image_text_scale"], ids, weights["image_text"])
                for image in out["image_text"].chunk(G)
            ]
            terms["image_text"] = torch.stack(per_crop).mean()
        if out["probs_mean"] is not None:
            terms["load_balance"] = load_balance_loss(out["probs_mean"], out["counts"])
            terms["z_loss"] = router_z_loss(out["z_loss"])
        return terms, teacher_out["dino_global"]

    def _backward(self, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Gradients of `total` (the weighted sum of `terms`), of which the task losses' part
        reaches the shared weights scaled by loss.shared_task_grad and the task parameters
        in full."""
        scale = self.shared_task_grad
        weights = self.config["loss"]
        task = sum(weights[n] * terms[n] for n in TASK_TERMS if n in terms) if scale < 1.0 else 0.0
        if not torch.is_tensor(task):  # plain multi-task training, or no task loss this run
            total.backward()
            return
        torch.autograd.backward((1.0 - scale) * task, inputs=self.task_params, retain_graph=True)
        (total - (1.0 - scale) * task).backward()

    def __call__(
        self, batch: PretrainBatch, step: int, stop: int = 0
    ) -> tuple[dict[str, float], bool, int]:
        """Optimiser step number `step` (0-based). `stop`: a signal number this rank was sent
        (0: none). Returns (metrics, ok, stop of any rank); ok is False when a loss term or
        the gradient norm is not finite on any rank, in which case nothing was updated."""
        values = self.schedules(step)
        for group in self.optimizer.param_groups:
            group["lr"] = values["lr"]
            if group.get("apply_decay"):
                group["weight_decay"] = values["weight_decay"]
        terms, teacher_dino = self.compute_losses(batch, values)
        weights = self.config["loss"]
        total = sum(weights[name] * value for name, value in terms.items())
        self._backward(total, terms)
        if step < self.config["optim"]["freeze_last_layer_steps"]:
            for p in self.model.dino_head.last_layer_parameters():
                p.grad = None
        metrics, finite, stop_any = clip_and_check(
            self.optimizer, total, terms, self.config["optim"]["clip_grad"], stop
        )
        metrics.update(values)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return metrics, False, stop_any
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher, student = self.ema_pairs
            torch._foreach_mul_(teacher, values["momentum"])
            torch._foreach_add_(teacher, student, alpha=1.0 - values["momentum"])
        self.dino_loss.update_center(teacher_dino)
        return metrics, True, stop_any
