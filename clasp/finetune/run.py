"""A fine-tuning run: the recipe's data, the starting weights, the shared training loop, then
evaluation on the test split and the outputs.

A recipe (one file per task) subclasses `Recipe` and provides the head, the training view of a
sample, the loss terms and the evaluation. Everything else (checkpoints and --resume,
metrics.jsonl, loss plots, TensorBoard, SIGTERM, NaN stops, DDP) is the pre-training loop's.

Outputs in output_dir: config.yaml, checkpoint.pt, metrics.jsonl, losses.png (the loop's),
model.safetensors (backbone + head, `clasp.finetune.weights`), backbone.safetensors (a plain
export for `clasp eval` and `clasp.load_backbone`) and result.json.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.nn.functional as F

from clasp.atomic import write_json
from clasp.data.build import build_dataset
from clasp.data.collate import collate_samples
from clasp.eval.report import json_ready
from clasp.model.io import save_backbone
from clasp.train import distributed
from clasp.train.data import EpochSeededDataset, ResumableSampler
from clasp.train.loop import TrainingLoop

from .step import FinetuneModel, FinetuneStep
from .weights import Initial, load_initial, save_finetuned

log = logging.getLogger("clasp.finetune")


class Recipe:
    """One downstream task. Subclasses set the class attributes and the hooks below."""

    name = ""
    task = ""  # the prompt (config task overrides it)
    metric = ""  # the primary metric of result.json
    # format -> (train split, test split or None: divide the train split by `divide`)
    splits: dict[str, tuple[str, str | None]] = {}
    loss_terms: tuple[str, ...] = ()

    def __init__(self, config: dict):
        self.config = config
        if config["task"] is not None:
            self.task = config["task"]

    # -- data ---------------------------------------------------------------------------------
    def dataset_options(self, format: str) -> dict:
        """Keyword arguments of build_dataset for this recipe (e.g. a crop aspect)."""
        return {}

    def datasets(self) -> tuple:
        """(train, test) person datasets; for re-ID test is (query, gallery)."""
        data = self.config["data"]
        fmt, root = data["format"], data["root"]
        if fmt not in self.splits:
            raise ValueError(
                f"{self.name} fine-tuning reads formats {', '.join(self.splits)}, not {fmt!r}"
            )
        train_split, test_split = self.splits[fmt]
        options = self.dataset_options(fmt)
        train = build_dataset(fmt, root, train_split, on_error="replace", **options)
        test = build_dataset(fmt, root, test_split, on_error="drop", **options)
        return train, test

    def head_config(self, train_set) -> dict:
        """What builds the head (class counts, names), from the training set."""
        raise NotImplementedError

    def build_head(self, backbone, head_config: dict) -> torch.nn.Module:
        raise NotImplementedError

    def train_sample(self, sample: dict, size: tuple[int, int]) -> dict:
        """A sample dict -> the training view: "image" float (3, *size) normalised + targets."""
        raise NotImplementedError

    def sampler(self, dataset, world: distributed.World):
        return ResumableSampler(
            dataset, self.config["data"]["batch_size"], world.size, world.rank, self.config["seed"]
        )

    # -- training and evaluation --------------------------------------------------------------
    def losses(self, out, batch: dict, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model: FinetuneModel, test, size, device) -> dict:
        """{"metrics": {...}, "sets": {name: count}} on the test set(s)."""
        raise NotImplementedError


class TrainSet(EpochSeededDataset):
    """The recipe's training views of a dataset, each drawn from its (seed, epoch, index)."""

    def __init__(self, dataset, recipe: Recipe, size: tuple[int, int], seed: int):
        super().__init__(seed)
        self.dataset, self.recipe, self.size = dataset, recipe, tuple(size)

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> dict:
        sample = self.dataset[index]
        return self.recipe.train_sample(sample, self.size)


class _EvalView(torch.utils.data.Dataset):
    """Samples resized to the model's input (stretched, as `clasp eval` does), labels kept at
    the original resolution; "size" holds the original (H, W)."""

    def __init__(self, dataset, size, indices):
        self.dataset, self.size, self.indices = dataset, tuple(size), indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        sample = self.dataset[self.indices[i]]
        if not isinstance(sample, dict):
            return sample  # a FailedSample: collate drops it
        image = sample["image"].float()[None] / 255.0
        x = F.interpolate(image, self.size, mode="bilinear", antialias=True, align_corners=False)
        out = {k: v for k, v in sample.items() if k not in ("image", "caption")}
        out["image"] = normalize_batch(x)[0]
        out["size"] = torch.tensor(sample["image"].shape[-2:])
        return out


def normalize_batch(x: torch.Tensor) -> torch.Tensor:
    from .augment import _MEAN, _STD

    return (x - _MEAN) / _STD


def eval_batches(dataset, size, batch_size: int, workers: int = 0, max_images=None):
    """Batches (collated sample dicts) of `dataset` at `size`; unreadable files are dropped."""
    indices = list(range(len(dataset)))
    if max_images is not None and len(indices) > max_images:
        step = len(indices) / max_images
        indices = [int(i * step) for i in range(max_images)]
    loader = torch.utils.data.DataLoader(
        _EvalView(dataset, size, indices),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_samples,
    )
    for batch in loader:
        if len(batch["index"]):
            yield batch


class Finetuner(TrainingLoop):
    """The shared training loop around a recipe's `FinetuneStep`."""

    def __init__(self, config, step: FinetuneStep, train_set, sampler, world):
        super().__init__(
            config, step, train_set, sampler, world, collate=collate_samples,
            loss_keys=("loss", *step.recipe.loss_terms, "load_balance", "z_loss"),
        )  # fmt: skip


def resolve_steps(config: dict, batches_per_epoch: int) -> None:
    """optim.steps (when unset: epochs x batches per epoch) and optim.warmup_steps (from
    warmup_epochs when set), written into the config."""
    optim = config["optim"]
    if optim["steps"] is None:
        optim["steps"] = max(1, math.ceil(optim["epochs"] * batches_per_epoch))
    if optim["warmup_epochs"] is not None:
        optim["warmup_steps"] = int(round(optim["warmup_epochs"] * batches_per_epoch))
    optim["steps"] = int(optim["steps"])
    optim["warmup_steps"] = min(int(optim["warmup_steps"]), optim["steps"])


def input_size(config: dict, backbone) -> tuple[int, int]:
    size = tuple(int(s) for s in (config["model"]["img_size"] or backbone.img_size))
    backbone.grid_size(*size)  # multiples of the patch size, or a clear error
    return size


def run(
    recipe_cls: type[Recipe],
    config: dict,
    checkpoint: str,
    model_config: str | None = None,
    *,
    eval_only: bool = False,
) -> dict:
    """Fine-tune from `checkpoint` (or only evaluate it) and return the result dict."""
    start = time.perf_counter()
    world = distributed.setup(config["distributed"]["backend"])
    try:
        return _run(recipe_cls, config, checkpoint, model_config, eval_only, world, start)
    finally:
        distributed.teardown()


def _run(recipe_cls, config, checkpoint, model_config, eval_only, world, start) -> dict:
    if config["train"]["deterministic"]:
        torch.use_deterministic_algorithms(True)
    if world.device.type == "cpu" and config["train"]["cpu_threads"]:
        torch.set_num_threads(int(config["train"]["cpu_threads"]))
    recipe = recipe_cls(config)
    m = config["model"]
    overrides = {k: m[k] for k in ("img_size", "drop_path_rate", "kernels", "grad_checkpointing")}
    initial: Initial = load_initial(checkpoint, model_config, overrides, seed=config["seed"])
    backbone = initial.backbone
    size = input_size(config, backbone)
    train, test = recipe.datasets()
    fresh = recipe.head_config(train)
    # The file's head is reused when it is this recipe's and was trained on the same classes
    # (or, to evaluate it, whatever it was trained on).
    use_file_head = bool(initial.head_state) and initial.recipe == recipe.name
    if use_file_head and initial.head_config != fresh and not eval_only:
        log.info("the file's %s head was trained on other classes: a new head", recipe.name)
        use_file_head = False
    head_config = initial.head_config if use_file_head else fresh
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["seed"]))  # the same head on every rank and every run
        head = recipe.build_head(backbone, head_config)
    if use_file_head:
        head.load_state_dict(initial.head_state)
        log.info("the %s head comes from %s", recipe.name, checkpoint)
    elif eval_only:
        log.warning("evaluating with an untrained %s head: %s", recipe.name, initial.description)
    model = FinetuneModel(backbone, head)
    steps_done = 0
    if not eval_only:
        train_set = TrainSet(train, recipe, size, config["seed"])
        sampler = recipe.sampler(train_set, world)
        resolve_steps(config, sampler.batches_per_epoch)
        step = FinetuneStep(config, world, model, recipe)
        step.extra_state = {"backbone_config": backbone.config, "head_config": head_config}
        loop = Finetuner(config, step, train_set, sampler, world)
        if world.is_main:
            log.info(
                "%s fine-tuning from %s: %d steps of %d x %d images at %dx%d, prompt %s",
                recipe.name, initial.description, config["optim"]["steps"],
                sampler.batch_size, world.size, size[0], size[1], recipe.task,
            )  # fmt: skip
        outcome = loop.fit()
        steps_done = outcome.step
        if outcome.stopped_by is not None:
            return {"stopped_by": outcome.stopped_by, "step": outcome.step}
    model = model.to(world.device).eval()
    result = None
    if world.is_main:
        with torch.inference_mode():
            evaluation = recipe.evaluate(model, test, size, world.device)
        metrics = evaluation["metrics"]
        fmt = config["data"]["format"]
        result = {
            "protocol": recipe.name,
            "format": fmt,
            "data": config["data"]["root"],
            "task": recipe.task if isinstance(recipe.task, str) else dict(recipe.task),
            "metric": recipe.metric,
            "value": metrics[recipe.metric],
            "metrics": metrics,
            "sets": evaluation["sets"],
            "checkpoint": checkpoint,
            "initial": initial.description,
            "fine_tuned": not eval_only,
            "steps": steps_done,
            "image_size": list(size),
            "seconds": round(time.perf_counter() - start, 2),
        }
        out = config["output_dir"]
        if not eval_only:
            save_finetuned(
                os.path.join(out, "model.safetensors"), model.backbone.cpu(), model.head.cpu(),
                recipe=recipe.name, head_config=head_config, task=result["task"],
                metadata={"source": checkpoint, "steps": steps_done},
            )  # fmt: skip
            save_backbone(
                model.backbone, os.path.join(out, "backbone.safetensors"),
                default_task=recipe.task, metadata={"source": checkpoint, "recipe": recipe.name},
            )  # fmt: skip
        if out is not None:
            os.makedirs(out, exist_ok=True)
            write_json(os.path.join(out, "result.json"), json_ready(result))
    distributed.barrier()
    return result or {}
