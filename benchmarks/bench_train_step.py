"""Throughput of one whole pre-training step (images/s): student forward and backward over all
crops, EMA-teacher forward, losses, AdamW, EMA update. Same model, three ways to run the
PC-MoE blocks: the Triton route + grouped MoE kernels, the eager references, and the eager
references under torch.compile (the whole student and teacher compiled)."""

import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from clasp.train.config import build_config
from clasp.train.distributed import World
from clasp.train.step import PretrainStep

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NUM_PARTS, NUM_ATTRIBUTES = 6, 31
# (config, batch per step): ViT-S/16 at 256x128 with 2 global + 6 local crops on a GPU;
# the demo ViT at 128x64 with 2 + 4 crops on the CPU.
CASES = {"cuda": [("vit-s", 64), ("vit-b", 32)], "cpu": [("demo", 32)]}
KERNELS = {"triton": "auto", "eager": "reference", "compile": "reference"}
_flops: dict = {}


def make_step(name: str, backend: str, device: torch.device) -> PretrainStep:
    config = build_config(
        os.path.join(CONFIGS, f"{name}.yaml"),
        [f"model.kernels={KERNELS[backend]}", f"train.compile={backend == 'compile'}"],
    )
    return PretrainStep(config, World(device=device), NUM_PARTS, NUM_ATTRIBUTES)


def make_batch(step: PretrainStep, batch: int, device: torch.device) -> dict:
    config, patch = step.config, step.config["model"]["patch_size"]
    crops = config["crops"]
    sizes = [config["model"]["img_size"]] * crops["n_global"]
    sizes += [crops["local_size"]] * crops["n_local"]
    return {
        "crops": [torch.randn(batch, 3, h, w, device=device) for h, w in sizes],
        "task": torch.randint(0, len(step.model.backbone.tasks), (batch,), device=device),
        "pseudo_parts": [
            torch.randint(-1, NUM_PARTS, (batch, h // patch, w // patch), device=device)
            for h, w in sizes
        ],
        "pseudo_attributes": torch.rand(batch, NUM_ATTRIBUTES, device=device),
    }


def step_flops(name: str, batch: int, device: torch.device) -> float:
    """FLOPs of one step, counted once on the eager model (Triton launches are opaque to the
    counter, and every backend runs the same arithmetic)."""
    if name not in _flops:
        step = make_step(name, "eager", device)
        data = make_batch(step, batch, device)
        with FlopCounterMode(display=False) as counter:
            step(data, 0)
        _flops[name] = counter.get_total_flops()
    return _flops[name]


def cases():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, batch in CASES[device]:
        for backend in KERNELS:
            yield pytest.param(name, batch, backend, id=f"{name}-B{batch}-{backend}")


@pytest.mark.parametrize("name,batch,backend", list(cases()))
def test_train_step(name, batch, backend, device, measure):
    if backend == "triton" and device.type != "cuda":
        pytest.skip("Triton kernels are timed on CUDA only (the interpreter is no speed target)")
    step = make_step(name, backend, device)
    data = make_batch(step, batch, device)
    counter = iter(range(10**9))
    flops = step_flops(name, batch, device)
    model = step.config["model"]
    entry = measure(
        lambda: step(data, next(counter)),
        op="train_step",
        mode="fwd+bwd",
        backend=backend,
        shape={
            "config": name,
            "B": batch,
            "img": "x".join(map(str, model["img_size"])),
            "crops": step.config["crops"]["n_global"] + step.config["crops"]["n_local"],
            "E": model["moe"]["num_experts"],
            "moe_blocks": len(model["moe"]["blocks"]),
        },
        dtype=step.amp_dtype or torch.float32,
        flops=flops,
    )
    entry["images_per_s"] = batch / (entry["median_ms"] / 1e3)
    measure.update(entry)
