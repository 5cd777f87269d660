"""Pre-training: the CLASP data and pre-training step run by the shared training loop."""

from __future__ import annotations

import torch

from clasp.data.collate import collate_samples
from clasp.losses import part_pairs
from clasp.model.vit import check_model_config, model_config

from . import distributed
from .captions import caption_table
from .loop import NonFiniteLossError, TrainingLoop, TrainResult, check_loop_config
from .pretrain_data import build_pretrain_data, check_data_config
from .step import LOSS_TERMS, PretrainStep, check_loss_config

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "train"]


def joint_pairs(config: dict, cache) -> list[tuple[int, int]] | None:
    """The part pairs of the joint loss (`loss.joint`) from the label cache's part names."""
    if cache is None or not config["loss"]["joint"]:
        return None
    pairs = part_pairs(cache.part_names)
    if not pairs:
        raise ValueError(
            f"loss.joint needs two or more body parts besides background in the label cache, "
            f"which has {cache.part_names}; set loss.joint=0 or label with more parts"
        )
    return pairs


class Trainer(TrainingLoop):
    """Pre-training: the CLASP data and `PretrainStep` in the shared `TrainingLoop`."""

    def __init__(self, config: dict, world: distributed.World | None = None):
        # Settings that cannot run fail here, before the data is hashed or a model built.
        check_loop_config(config)
        check_data_config(config)
        check_model_config(model_config(config["model"]))
        check_loss_config(config)
        world = world or distributed.setup(config["distributed"]["backend"])
        if config["train"]["deterministic"]:
            torch.use_deterministic_algorithms(True)
        if world.device.type == "cpu" and config["train"]["cpu_threads"]:
            torch.set_num_threads(int(config["train"]["cpu_threads"]))
        dataset, sampler, cache = build_pretrain_data(
            config, world.rank, world.size, config["model"]["patch_size"]
        )
        texts = None
        if config["loss"]["image_text"]:
            texts = caption_table(config, dataset.dataset, cache, dataset.keys)
            dataset.caption_ids = texts.ids
        pretrain_step = PretrainStep(
            config,
            world,
            num_parts=len(cache.part_names) if cache is not None else None,
            num_attributes=len(cache.attribute_names) if cache is not None else None,
            joint_pairs=joint_pairs(config, cache),
            text_embeddings=texts.embeddings if texts is not None else None,
        )
        super().__init__(
            config,
            pretrain_step,
            dataset,
            sampler,
            world,
            collate=collate_samples,
            loss_keys=("loss", *LOSS_TERMS),
        )


def train(config: dict) -> TrainResult:
    """Run pre-training from a full config (see `clasp.train.config.DEFAULTS`)."""
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        distributed.teardown()
