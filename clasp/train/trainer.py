"""The pre-training loop: data order, checkpoints and resume, logging, signals, NaN stops."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml
from tqdm import tqdm

from clasp.atomic import atomic_open

from . import distributed as D
from .checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .data import build_pretrain_data, make_loader
from .metrics import MetricsLog, plot_losses
from .step import LOSS_TERMS, PretrainStep

log = logging.getLogger("clasp.train")
CONFIG_NAME = "config.yaml"


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
        self.output_dir = config["output_dir"]
        self.checkpoint_path = os.path.join(self.output_dir, CHECKPOINT_NAME)
        if self.world.is_main:  # the merged config beside the run's outputs
            os.makedirs(self.output_dir, exist_ok=True)
            with atomic_open(os.path.join(self.output_dir, CONFIG_NAME)) as f:
                yaml.safe_dump(config, f, sort_keys=False)
        if config["train"]["deterministic"]:
            torch.use_deterministic_algorithms(True)
        if self.world.device.type == "cpu" and config["train"]["cpu_threads"]:
            torch.set_num_threads(int(config["train"]["cpu_threads"]))
        self.dataset, self.sampler, cache = build_pretrain_data(
            config, self.world.rank, self.world.size, config["model"]["patch_size"]
        )
        self.step_fn = PretrainStep(
            config,
            self.world,
            num_parts=len(cache.part_names) if cache is not None else None,
            num_attributes=len(cache.attribute_names) if cache is not None else None,
        )
        self.total_steps = int(config["optim"]["steps"])
        self.step = self.epoch = self.batch_in_epoch = 0
        self.stop_signal: int | None = None
        resume = resolve_resume(config["train"]["resume"], self.output_dir)
        if resume is not None:
            self._restore(resume)
        else:  # dropout and drop-path streams differ between ranks
            seed_everything(int(config["seed"]) + self.world.rank)
        self.metrics = None
        if self.world.is_main:
            metrics_path = os.path.join(self.output_dir, "metrics.jsonl")
            self.metrics = MetricsLog(metrics_path, self.step if resume else None)

    # -- checkpoints --------------------------------------------------------------------------
    def state(self, rng: dict | None = None) -> dict | None:
        """The checkpoint dict on rank 0 (None elsewhere); a collective: call on every rank."""
        step = self.step_fn
        model = D.full_model_state(step.student)
        teacher = D.full_model_state(step.teacher)
        optimizer = D.full_optimizer_state(step.student, step.optimizer)
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
            "dino_loss": {k: v.cpu() for k, v in step.dino_loss.state_dict().items()},
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
        step = self.step_fn
        D.load_model_state(step.student, checkpoint["model"])
        D.load_model_state(step.teacher, checkpoint["teacher"])
        D.load_optimizer_state(step.student, step.optimizer, checkpoint["optimizer"])
        step.dino_loss.load_state_dict(checkpoint["dino_loss"])
        self.step = checkpoint["step"]
        self.epoch, self.batch_in_epoch = checkpoint["epoch"], checkpoint["batch_in_epoch"]
        rngs = checkpoint["rng"]
        if len(rngs) == self.world.size:
            set_rng_state(rngs[self.world.rank])
        else:
            log.warning(
                "checkpoint from %d process(es) resumed on %d: random streams are reseeded and "
                "the data order differs from an uninterrupted run",
                len(rngs), self.world.size,
            )  # fmt: skip
            seed_everything(self.config["seed"] + self.step + self.world.rank)
        if self.world.is_main:
            log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

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
            mininterval=0.1 if sys.stderr.isatty() else 30.0,  # in a log file: a line per 30 s
        )
        images_per_step = self.sampler.batch_size * self.world.size
        last_checkpoint = None
        window_start, window_images = time.perf_counter(), 0
        self.step_fn.student.train()
        try:
            while self.step < self.total_steps and self.stop_signal is None:
                self.sampler.set_position(self.epoch, self.batch_in_epoch)
                loader = make_loader(self.dataset, self.sampler, self.config, self.epoch)
                for batch in loader:
                    rng_before = rng_state()
                    metrics, ok, stop = self.step_fn(batch, self.step, self.stop_signal or 0)
                    if stop and self.stop_signal is None:
                        self.stop_signal = stop  # another rank was asked to stop
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
