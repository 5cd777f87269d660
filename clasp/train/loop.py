"""The training loop shared by pre-training and fine-tuning: data order, checkpoints and
resume, logging, signals and NaN stops, around a step object that knows its model.

A step object provides
    train()                          put its modules in training mode
    __call__(batch, step, stop)      one optimiser step -> (metrics, ok, stop of any rank):
                                     ok False when a value was not finite, nothing updated
    state_dict() / load_state_dict() its model, optimiser and loss state (a collective under
                                     FSDP: called on every rank)
and the loop writes output_dir/config.yaml, and adds the data position, the random streams
and the last metrics to the checkpoint (see `clasp.train.checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml
from tqdm import tqdm

from clasp.atomic import atomic_open, remove_stale_temporaries
from clasp.data.images import read_error

from . import distributed
from .checkpoint import (
    CHECKPOINT_NAME,
    check_training_checkpoint,
    load_checkpoint,
    resolve_resume,
    resume_mismatch,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .data import ResumableSampler, make_loader
from .metrics import MetricsLog, plot_losses

log = logging.getLogger("clasp.train")


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN or Inf; the last good state was saved."""


class RunExistsError(ValueError):
    """A new run was asked for in an output folder that holds an earlier run."""


@dataclass
class TrainResult:
    step: int  # optimiser steps done
    stopped_by: str | None  # None when all steps ran, else the signal's name
    checkpoint: str | None  # the last checkpoint written
    records: list[dict] = field(default_factory=list)  # the metrics log
    # unreadable files replaced by other samples in this run (all ranks): {path: times}
    skipped: dict[str, int] = field(default_factory=dict)


def refuse_earlier_run(output_dir: str) -> None:
    """Raise RunExistsError when output_dir holds a checkpoint or metrics of an earlier run."""
    checkpoint = os.path.join(output_dir, CHECKPOINT_NAME)
    metrics = os.path.join(output_dir, "metrics.jsonl")
    found = [p for p in (checkpoint, metrics) if os.path.isfile(p) and os.path.getsize(p) > 0]
    if found:
        raise RunExistsError(
            f"{output_dir} holds an earlier run ({', '.join(map(os.path.basename, found))}); "
            "continue it with --resume, replace it with --overwrite, or choose another "
            "output_dir"
        )


def check_loop_config(config: dict) -> None:
    """Raise ValueError naming the key when the loop's settings cannot run: optim.steps and
    train.{log,checkpoint}_every must be positive whole numbers, train.plot_every a whole
    number (0: no loss plot)."""
    keys = {
        "optim.steps": 1, "train.log_every": 1, "train.plot_every": 0, "train.checkpoint_every": 1,
    }  # fmt: skip
    for name, least in keys.items():
        section, key = name.split(".")
        value = config[section][key]
        whole = isinstance(value, int | float) and not isinstance(value, bool) and value % 1 == 0
        if not whole or value < least:
            what = "optimiser steps to run" if key == "steps" else "steps between them"
            kind = "positive whole number" if least else "whole number (0: none)"
            raise ValueError(f"{section}.{key} must be a {kind} ({what}), got {value!r}")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def clip_and_check(
    optimizer: torch.optim.Optimizer,
    total: torch.Tensor,
    terms: dict[str, torch.Tensor],
    clip_grad: float | None,
    stop: bool,
) -> tuple[dict[str, float], bool, int]:
    """After backward: clip the gradients to `clip_grad` (None or 0: no clipping, but the
    norm is still computed for the log and the finite check), then one sync across ranks for
    both a finite check of every term and the norm and any rank's stop request. Returns
    (metrics {"loss", each term, "grad_norm"}, finite, stop requested by any rank)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    checked = torch.stack(
        [total.detach(), *(t.detach() for t in terms.values()), grad_norm.to(total.device)]
    ).float()
    flags = torch.stack([(~torch.isfinite(checked)).any().float(), checked.new_tensor(stop)])
    flags = distributed.all_reduce_max(flags).tolist()
    numbers = checked.tolist()
    metrics = {"loss": numbers[0], **dict(zip(terms, numbers[1:-1], strict=True))}
    metrics["grad_norm"] = numbers[-1]
    return metrics, not flags[0], int(flags[1])


class TrainingLoop:
    """Runs `train_step` over `dataset` in `sampler`'s order until config optim.steps.

    Reads from the config: seed, output_dir, optim.steps and train.{log_every, plot_every
    (0: no loss plot), checkpoint_every, resume, overwrite, progress, tensorboard (optional:
    the metrics also as TensorBoard events in output_dir/tensorboard)}. `collate` batches the
    dataset's samples.
    A new run never replaces an earlier run's checkpoint or metrics unless train.overwrite.
    """

    def __init__(
        self,
        config: dict,
        train_step,
        dataset,
        sampler: ResumableSampler,
        world: distributed.World,
        *,
        collate: Callable | None = None,
        loss_keys: tuple[str, ...] = ("loss",),
    ):
        check_loop_config(config)
        self.config, self.train_step, self.world = config, train_step, world
        self.dataset, self.sampler, self.collate = dataset, sampler, collate
        self.loss_keys = loss_keys
        self.output_dir = config["output_dir"]
        self.checkpoint_path = os.path.join(self.output_dir, CHECKPOINT_NAME)
        self.total_steps = int(config["optim"]["steps"])
        self.step = self.epoch = self.batch_in_epoch = 0
        self.stop_signal: int | None = None
        stale = remove_stale_temporaries(self.checkpoint_path) if world.is_main else []
        for path in stale:
            log.warning("removed %s, the partial checkpoint of a write that was killed", path)
        resume = resolve_resume(config["train"]["resume"], self.output_dir)
        if resume is None and not config["train"]["overwrite"]:
            refuse_earlier_run(self.output_dir)
        if resume is not None:
            self._restore(resume)
        else:  # dropout and drop-path streams differ between ranks
            seed_everything(int(config["seed"]) + world.rank)
        self.metrics = None
        if world.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            with atomic_open(os.path.join(self.output_dir, "config.yaml")) as f:
                yaml.safe_dump(config, f, sort_keys=False)
            metrics_path = os.path.join(self.output_dir, "metrics.jsonl")
            tensorboard = (
                os.path.join(self.output_dir, "tensorboard")
                if config["train"].get("tensorboard") else None
            )  # fmt: skip
            self.metrics = MetricsLog(metrics_path, self.step if resume else None, tensorboard)

    # -- checkpoints --------------------------------------------------------------------------
    def state(self, rng: dict | None = None) -> dict | None:
        """The checkpoint dict on rank 0 (None elsewhere); a collective: call on every rank."""
        parts = self.train_step.state_dict()
        rngs = distributed.gather_objects(rng or rng_state())
        if not self.world.is_main:
            return None
        last = self.metrics.records[-1] if self.metrics and self.metrics.records else {}
        return {
            "config": self.config,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            **parts,
            "rng": rngs,
            "metrics": last,
        }

    def save(self, rng: dict | None = None) -> str:
        checkpoint = self.state(rng)
        if checkpoint is not None:
            save_checkpoint(self.checkpoint_path, checkpoint)
        distributed.barrier()
        return self.checkpoint_path

    def _restore(self, path: str) -> None:
        checkpoint = load_checkpoint(path)
        check_training_checkpoint(checkpoint, path)
        try:
            self.train_step.load_state_dict(checkpoint)
        except (RuntimeError, KeyError, ValueError) as error:  # missing / unexpected / shapes
            raise resume_mismatch(path, checkpoint["config"], self.config, error) from error
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
            log.info(
                "resuming from %s: step %d of %d (epoch %d, batch %d)",
                path, self.step, self.total_steps, self.epoch, self.batch_in_epoch,
            )  # fmt: skip

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
        skipped: Counter[str] = Counter()  # unreadable files other samples replaced
        last_checkpoint = None
        window_start, window_images = time.perf_counter(), 0
        self.train_step.train()
        try:
            while self.step < self.total_steps and self.stop_signal is None:
                self.sampler.set_position(self.epoch, self.batch_in_epoch)
                loader = make_loader(
                    self.dataset, self.sampler, self.config, self.epoch, self.collate
                )
                for batch in loader:
                    skipped.update(batch.get("skipped", ()))
                    rng_before = rng_state()
                    metrics, ok, stop = self.train_step(batch, self.step, self.stop_signal or 0)
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
                        if train["plot_every"] and self.step % train["plot_every"] == 0:
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
                if train["plot_every"]:
                    self.plot()
                self.metrics.close()
        stopped = signal.Signals(self.stop_signal).name if self.stop_signal else None
        if main and stopped:
            log.warning(
                "stopped by %s after step %d; checkpoint saved to %s; continue with "
                "train.resume=auto (or --resume)", stopped, self.step, last_checkpoint,
            )  # fmt: skip
        skipped = sum(distributed.gather_objects(skipped), Counter())
        if main and skipped:
            self._report_skipped(skipped)
        records = self.metrics.records if self.metrics else []
        return TrainResult(self.step, stopped, last_checkpoint, records, dict(skipped))

    def _report_skipped(self, skipped: Counter, shown: int = 10) -> None:
        """One warning at the end of a run: which files could not be read, and why."""
        items = [
            f"{path} ({read_error(path) or 'unreadable when it came round'}, {n}x)"
            for path, n in skipped.most_common(shown)
        ]
        more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
        log.warning(
            "%d unreadable file(s) were replaced by other samples %d time(s) in this run: "
            "%s%s; fix or remove them", len(skipped), sum(skipped.values()), "; ".join(items),
            more,
        )  # fmt: skip

    def plot(self) -> None:
        path = os.path.join(self.output_dir, "losses.png")
        plot_losses(self.metrics.records, path, self.loss_keys)

    def _stop_non_finite(self, metrics: dict, rng_before: dict) -> None:
        # Nothing was updated in this step: the model, optimiser, EMA and center are the state
        # after the previous step; with the RNG as it was then, it is the last good state.
        path = self.save(rng_before)
        shown = [k for k in (*self.loss_keys, "grad_norm") if k in metrics]
        terms = ", ".join(f"{k}={metrics[k]:.6g}" for k in shown)
        bad = [k for k in shown if not math.isfinite(metrics[k])]
        raise NonFiniteLossError(
            f"non-finite values at step {self.step + 1} (on this or another rank): {terms}. "
            f"Not finite: {', '.join(bad) or 'on another rank'}. The last good state (after "
            f"step {self.step}) is saved in {path}; lower optim.lr, raise optim.clip_grad or "
            "check the data, then resume with train.resume=auto"
        )

    def _install_signal_handlers(self) -> dict:
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
