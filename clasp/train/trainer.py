"""The pre-training loop: multi-crop self-distillation from an EMA teacher, plus the part and
attribute pseudo-label losses weighted per sample by its task, plus the MoE auxiliaries."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clasp.losses import AttributeLoss, DINOLoss, PartLoss, load_balance_loss, router_z_loss
from clasp.model import build_model

from . import distributed as D
from .checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .data import PARTS_KEY, build_pretrain_data, make_loader
from .metrics import MetricsLog, plot_losses
from .schedules import Schedules

log = logging.getLogger("clasp.train")

LOSS_TERMS = ("dino", "part", "attribute", "load_balance", "z_loss")
NO_DECAY_SUFFIXES = (".bias", ".b1", ".b2")


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN or Inf; the last good state was saved."""


@dataclass
class TrainResult:
    step: int  # optimiser steps done
    stopped_by: str | None  # None when all steps ran, else the signal's name
    checkpoint: str | None  # the last checkpoint written
    records: list[dict] = field(default_factory=list)  # the metrics log


class Trainer:
    def __init__(self, config: dict, world: D.World | None = None):
        self.config = config
        self.world = world or D.setup(config["distributed"]["backend"])
        self.device = self.world.device
        self.output_dir = config["output_dir"]
        self.checkpoint_path = os.path.join(self.output_dir, CHECKPOINT_NAME)
        seed = int(config["seed"])
        torch.manual_seed(seed)  # the same initial weights on every rank
        if config["train"]["deterministic"]:
            torch.use_deterministic_algorithms(True)

        model_cfg = config["model"]
        self.dataset, self.sampler, cache = build_pretrain_data(
            config, self.world.rank, self.world.size, model_cfg["patch_size"]
        )
        self.has_labels = cache is not None
        model = build_model(
            config,
            num_parts=len(cache.part_names) if cache is not None else None,
            num_attributes=len(cache.attribute_names) if cache is not None else None,
        )
        self._init_prompts(model)
        model.to(self.device)
        strategy = config["distributed"]["strategy"]
        if config["train"]["compile"]:
            model.compile()
        teacher = copy.deepcopy(model).requires_grad_(False)
        self.student = D.wrap(model, strategy, self.world)
        self.teacher = D.shard(teacher, self.world) if strategy == "fsdp" else teacher
        self.model = D.unwrap(self.student)
        self.optimizer = self._optimizer()
        self.ema_pairs = self._ema_pairs()

        loss = config["loss"]
        self.dino_loss = DINOLoss(
            config["heads"]["dino"]["out_dim"], loss["student_temp"], loss["center_momentum"]
        ).to(self.device)
        self.part_loss = PartLoss(loss["part_ignore_index"])
        self.attribute_loss = AttributeLoss()
        self.loss_table = self._loss_table().to(self.device)
        self.schedules = Schedules(config["optim"], loss)
        self.total_steps = int(config["optim"]["steps"])
        amp = config["train"]["amp"]
        self.amp_dtype = (
            torch.bfloat16 if amp == "bf16" or (amp == "auto" and self.device.type == "cuda")
            else None
        )  # fmt: skip
        self.step = self.epoch = self.batch_in_epoch = 0
        self.stop_signal: int | None = None
        self._rng_at_step_start: dict | None = None

        resume = resolve_resume(config["train"]["resume"], self.output_dir)
        if resume is not None:
            self._restore(resume)
        else:  # dropout and drop-path streams differ between ranks
            seed_everything(seed + self.world.rank)
        self.metrics = None
        if self.world.is_main:
            metrics_path = os.path.join(self.output_dir, "metrics.jsonl")
            self.metrics = MetricsLog(metrics_path, self.step if resume else None)

    # -- setup --------------------------------------------------------------------------------
    def _init_prompts(self, model) -> None:
        source = self.config["prompt_init"]
        if not source["teacher"]:
            return
        from clasp.teacher.clip import load_teacher

        teacher = load_teacher(source["teacher"], source["pretrained"])
        model.backbone.prompts.init_from_text(teacher.encode_text)
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
        """(n_tasks, 3) per-task weights of the dino, part and attribute losses."""
        table = self.config["tasks"]["loss_weights"]
        tasks = self.model.backbone.tasks
        missing = [t for t in tasks if t not in table]
        if missing:
            raise ValueError(f"tasks.loss_weights has no row for tasks {missing}")
        rows = [[float(table[t].get(k, 0.0)) for k in ("dino", "part", "attribute")] for t in tasks]
        return torch.tensor(rows)

    # -- checkpoints --------------------------------------------------------------------------
    def state(self, rng: dict | None = None) -> dict | None:
        """The checkpoint dict on rank 0 (None elsewhere); a collective: call on every rank."""
        model = D.full_model_state(self.student)
        teacher = D.full_model_state(self.teacher)
        optimizer = D.full_optimizer_state(self.student, self.optimizer)
        rngs = D.gather_objects(rng or rng_state())
        if not self.world.is_main:
            return None
        return {
            "config": self.config,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "model": model,
            "teacher": teacher,
            "optimizer": optimizer,
            "dino_loss": {k: v.cpu() for k, v in self.dino_loss.state_dict().items()},
            "rng": rngs,
            "metrics": self.metrics.records[-1] if self.metrics and self.metrics.records else {},
        }

    def save(self, rng: dict | None = None) -> str:
        checkpoint = self.state(rng)
        if checkpoint is not None:
            save_checkpoint(self.checkpoint_path, checkpoint)
        D.barrier()
        return self.checkpoint_path

    def _restore(self, path: str) -> None:
        checkpoint = load_checkpoint(path)
        D.load_model_state(self.student, checkpoint["model"])
        D.load_model_state(self.teacher, checkpoint["teacher"])
        D.load_optimizer_state(self.student, self.optimizer, checkpoint["optimizer"])
        self.dino_loss.load_state_dict(checkpoint["dino_loss"])
        self.step = checkpoint["step"]
        self.epoch, self.batch_in_epoch = checkpoint["epoch"], checkpoint["batch_in_epoch"]
        rngs = checkpoint["rng"]
        if len(rngs) == self.world.size:
            set_rng_state(rngs[self.world.rank])
        else:
            log.warning(
                "checkpoint from %d process(es) resumed on %d: random streams are reseeded",
                len(rngs), self.world.size,
            )  # fmt: skip
            seed_everything(self.config["seed"] + self.step + self.world.rank)
        if self.world.is_main:
            log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

    # -- one step -----------------------------------------------------------------------------
    def compute_losses(self, batch: dict, values: dict) -> dict[str, torch.Tensor]:
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
        weights = self.loss_table[task]  # (B, 3)
        self._teacher_dino = teacher_out["dino_global"]
        targets = self.dino_loss.teacher_targets(teacher_out["dino_global"], values["teacher_temp"])
        dino = self.dino_loss(out["dino_global"], out["dino_local"], targets, G)
        terms = {"dino": (weights[:, 0] * dino).mean()}
        B = task.shape[0]
        if out["part_logits"] is not None:
            labels = torch.cat(batch[PARTS_KEY][:G]).to(self.device, non_blocking=True)
            per_crop, _ = self.part_loss(out["part_logits"], labels)
            terms["part"] = (weights[:, 1] * per_crop.view(G, B).mean(0)).mean()
        if out["attribute_logits"] is not None:
            soft = batch["pseudo_attributes"].to(self.device, non_blocking=True).repeat(G, 1)
            per_crop, _ = self.attribute_loss(out["attribute_logits"], soft)
            terms["attribute"] = (weights[:, 2] * per_crop.view(G, B).mean(0)).mean()
        if out["probs_mean"] is not None:
            terms["load_balance"] = load_balance_loss(out["probs_mean"], out["counts"])
            terms["z_loss"] = router_z_loss(out["z_loss"])
        return terms

    def train_step(self, batch: dict) -> tuple[dict[str, float], bool]:
        """One optimiser step. Returns (metrics, ok); ok is False when a loss term or the
        gradient norm is not finite on any rank, in which case nothing was updated."""
        values = self.schedules(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = values["lr"]
            if group.get("apply_decay"):
                group["weight_decay"] = values["weight_decay"]
        terms = self.compute_losses(batch, values)
        weights = self.config["loss"]
        total = sum(weights[name] * value for name, value in terms.items())
        total.backward()
        if self.step < self.config["optim"]["freeze_last_layer_steps"]:
            for p in self.model.dino_head.last_layer_parameters():
                p.grad = None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.config["optim"]["clip_grad"]
        if clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        # One sync per step: finite check of every term, and any rank's stop request.
        checked = torch.stack(
            [total.detach(), *(t.detach() for t in terms.values()), grad_norm.to(self.device)]
        ).float()
        flags = torch.stack(
            [(~torch.isfinite(checked)).any().float(), checked.new_tensor(self.stop_signal or 0)]
        )
        flags = D.all_reduce_max(flags).tolist()
        numbers = checked.tolist()
        metrics = {"loss": numbers[0], **dict(zip(terms, numbers[1:-1], strict=True))}
        metrics["grad_norm"] = numbers[-1]
        metrics.update(values)
        if flags[1] and self.stop_signal is None:
            self.stop_signal = int(flags[1])  # another rank was asked to stop
        if flags[0]:
            self.optimizer.zero_grad(set_to_none=True)
            return metrics, False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher, student = self.ema_pairs
            torch._foreach_mul_(teacher, values["momentum"])
            torch._foreach_add_(teacher, student, alpha=1.0 - values["momentum"])
        self.dino_loss.update_center(self._teacher_dino)
        self._teacher_dino = None
        return metrics, True

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to optim.steps; stop early (with a checkpoint) on SIGINT / SIGTERM."""
        train = self.config["train"]
        main = self.world.is_main
        previous = self._install_signal_handlers()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (main and train["progress"]),
            unit="step",
            dynamic_ncols=True,
        )
        images_per_step = self.sampler.batch_size * self.world.size
        last_checkpoint = None
        window_start, window_images = time.perf_counter(), 0
        self.student.train()
        try:
            while self.step < self.total_steps and self.stop_signal is None:
                self.sampler.set_position(self.epoch, self.batch_in_epoch)
                loader = make_loader(self.dataset, self.sampler, self.config, self.epoch)
                for batch in loader:
                    rng_before = rng_state()
                    metrics, ok = self.train_step(batch)
                    if not ok:
                        self._stop_non_finite(metrics, rng_before)
                    self.step += 1
                    self.batch_in_epoch += 1
                    window_images += images_per_step
                    if main and (self.step % train["log_every"] == 0 or self.step == 1):
                        now = time.perf_counter()
                        rate = window_images / max(now - window_start, 1e-9)
                        window_start, window_images = now, 0
                        self.metrics.write(
                            {"step": self.step, "epoch": self.epoch, **metrics,
                             "images_per_s": rate}
                        )  # fmt: skip
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{rate:.1f}")
                        if self.step % train["plot_every"] == 0:
                            self.plot()
                    bar.update(1)
                    done = self.step >= self.total_steps
                    if done or self.stop_signal or self.step % train["checkpoint_every"] == 0:
                        last_checkpoint = self.save()
                    if done or self.stop_signal is not None:
                        break
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
        finally:
            bar.close()
            self._restore_signal_handlers(previous)
            if main:
                self.plot()
        stopped = signal.Signals(self.stop_signal).name if self.stop_signal else None
        if main and stopped:
            log.warning(
                "stopped by %s after step %d; checkpoint saved to %s; continue with "
                "train.resume=auto (or --resume)", stopped, self.step, last_checkpoint,
            )  # fmt: skip
        records = self.metrics.records if self.metrics else []
        return TrainResult(self.step, stopped, last_checkpoint, records)

    def plot(self) -> None:
        plot_losses(self.metrics.records, os.path.join(self.output_dir, "losses.png"))

    def _stop_non_finite(self, metrics: dict, rng_before: dict) -> None:
        # Nothing was updated in this step: the model, optimiser, EMA and center are the state
        # after the previous step; with the RNG as it was then, it is the last good state.
        path = self.save(rng_before)
        terms = ", ".join(
            f"{k}={metrics[k]:.6g}" for k in ("loss", *LOSS_TERMS, "grad_norm") if k in metrics
        )
        bad = [
            k
            for k in ("loss", *LOSS_TERMS, "grad_norm")
            if k in metrics and not math.isfinite(metrics[k])
        ]
        raise NonFiniteLossError(
            f"non-finite values at step {self.step + 1} (on this or another rank): {terms}. "
            f"Not finite: {', '.join(bad) or 'on another rank'}. The last good state (after "
            f"step {self.step}) is saved in {path}; lower optim.lr, raise optim.clip_grad or "
            "check the data, then resume with train.resume=auto"
        )

    def _install_signal_handlers(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            if self.stop_signal is not None:  # a second signal: stop now, without saving
                raise KeyboardInterrupt
            self.stop_signal = signum
            if self.world.is_main:
                log.warning(
                    "%s received: saving a checkpoint after this step (again to abort)",
                    signal.Signals(signum).name,
                )

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
        return previous

    def _restore_signal_handlers(self, previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def train(config: dict) -> TrainResult:
    """Run pre-training from a full config (see `clasp.train.config.DEFAULTS`)."""
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        D.teardown()
