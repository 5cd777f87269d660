"""Process groups and model wrapping for `torchrun` launches (DDP, or FSDP on CUDA).

A plain `clasp pretrain` is a world of one and wraps nothing. Under torchrun (RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR set), each process joins the group (NCCL on CUDA,
gloo on CPU), trains on its shard of every epoch, and rank 0 alone logs and checkpoints.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1 or dist.is_initialized()


def setup(backend: str = "auto") -> World:
    """Join the process group when launched by torchrun; pick this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if backend == "nccl" else None,
        )
    return World(rank, size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, world: World) -> nn.Module:
    """DDP or FSDP (fully_shard on every transformer block, then the root) for a world > 1."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "fsdp":
        return shard(model, world)
    if world.size == 1:
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard(model: nn.Module, world: World) -> nn.Module:
    """FSDP2: parameters, gradients and optimiser state sharded over the ranks."""
    if world.device.type != "cuda":
        raise RuntimeError(
            "distributed.strategy=fsdp is for CUDA runs; on CPU use distributed.strategy=ddp"
        )
    if not dist.is_initialized():
        return model  # one process: nothing to shard over
    from torch.distributed.fsdp import fully_shard

    for block in model.backbone.vit.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict on CPU (a collective under FSDP: call on every rank)."""
    return get_model_state_dict(unwrap(model), options=_FULL)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(unwrap(model), state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(
        unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks (identity in a world of one)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
