"""The one home of the helpers shared by the tests: tolerances per dtype, poisoned outputs,
random inputs, a check that an op never entered its Triton path, the one-thread fixture of
the model-sized tests; tiny CLIP teachers and folders built once per session; a tiny synthetic
set, a label cache made from its ground truth, and a tiny training config."""

from __future__ import annotations

import importlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clasp.kernels import poison_outputs
from clasp.kernels.utils import poison_value
from filelock import FileLock
from PIL import Image

# (atol, rtol) of a low-precision result against a reference run in fp64.
# fp32 on CUDA is looser: tl.dot uses tf32 there, the interpreter computes in full fp32.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
CUDA_FP32_TOLERANCE = (5e-4, 5e-4)

DTYPE_IDS = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}


def tolerance(
    dtype: torch.dtype, device: torch.device | str = "cpu", scale: float = 1.0
) -> tuple[float, float]:
    atol, rtol = (
        CUDA_FP32_TOLERANCE
        if dtype == torch.float32 and torch.device(device).type == "cuda"
        else TOLERANCES[dtype]
    )
    return atol * scale, rtol * scale


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    scale: float = 1.0,
    msg: str = "",
) -> None:
    """Compare in fp64 with the tolerance of `dtype` (default: actual's dtype)."""
    dtype = dtype or actual.dtype
    atol, rtol = tolerance(dtype, actual.device, scale)
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected.detach().double().cpu(),
        atol=atol,
        rtol=rtol,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def assert_close_normalised(actual, expected, dtype, msg=""):
    """Compare relative to the largest reference magnitude: sums over many rows grow, and
    their rounding error grows with them. fp32 on CUDA runs tf32 tensor cores (10-bit
    mantissa), and the MLP chains two GEMMs: three times the per-dtype tolerance there."""
    norm = max(1.0, float(expected.detach().abs().max()))
    scale = 3.0 if dtype == torch.float32 and actual.is_cuda else 1.0
    assert_close(
        actual.detach().double() / norm, expected.detach() / norm, dtype, scale=scale, msg=msg
    )


class _Forbidden:
    """Stands in for an op's way into its kernels (a function or an autograd Function)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"{self.name} ran: the call took the Triton path")

    apply = __call__


def forbid_triton_path(monkeypatch, module: str, entry: str) -> None:
    """Make `clasp.kernels.<module>.<entry>`, the op's way into its kernels, fail when called
    (or applied), so a test can tell that a call ran the eager reference."""
    name = f"clasp.kernels.{module}.{entry}"
    monkeypatch.setattr(importlib.import_module(f"clasp.kernels.{module}"), entry, _Forbidden(name))


def assert_all_written(*tensors: torch.Tensor) -> None:
    """Fail if any element still holds the poison of `poison_outputs()`."""
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if t.dtype.is_floating_point:
            unwritten = torch.isnan(t)
        else:
            unwritten = t == poison_value(t.dtype)
        n = int(unwritten.sum())
        assert n == 0, (
            f"output {i} (shape {tuple(t.shape)}): {n} of {t.numel()} elements never written"
        )


def run_poisoned(fn, *args, **kwargs):
    """Call `fn` with every kernel output poisoned, and check each element was written."""
    with poison_outputs():
        out = fn(*args, **kwargs)
    flat = out if isinstance(out, (tuple, list)) else (out,)
    assert_all_written(*[t for t in flat if isinstance(t, torch.Tensor)])
    return out


def randn(
    *shape,
    dtype=torch.float32,
    device="cpu",
    scale: float = 1.0,
    requires_grad: bool = False,
    non_contiguous: bool = False,
) -> torch.Tensor:
    """Fresh normal input; `non_contiguous` returns a strided view of a wider buffer."""
    if non_contiguous:
        wide = (torch.randn(*shape[:-1], 2 * shape[-1], device=device) * scale).to(dtype)
        t = wide[..., ::2].detach()  # a leaf that keeps the strides
        assert not t.is_contiguous() or t.numel() <= 1
    else:
        t = (torch.randn(*shape, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def as_reference_input(t: torch.Tensor) -> torch.Tensor:
    """An fp64 leaf copy of t for the reference run (gradients kept separately)."""
    return t.detach().double().requires_grad_(t.requires_grad)


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared 2-core machine run fastest (and steadiest) on one thread:
    each test worker owns about one core. Autouse where a conftest imports it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- tiny CLIP teachers and shared folders ---------------------------------------------------

# A CLIP small enough to build in milliseconds: 64x64 input, 8x8 patch grid, 32-d embeddings.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 64,
        "patch_size": 8,
        "width": 64,
        "layers": 2,
        "head_width": 32,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_once(tmp_path_factory, name: str, build) -> str:
    """A folder built by the first xdist worker that asks and shared by all of them (it is
    read-only for tests): `build(path)` runs once per session under a file lock."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above the per-worker ones
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(str(path))
            done.touch()
    return str(path)


# A tiny PC-MoE backbone at 64x32 as a config file's model section (the eager MoE path: no
# Triton interpreter), for the commands that take --config.
TINY_MODEL_YAML = """
model:
  img_size: [64, 32]
  patch_size: 16
  embed_dim: 32
  depth: 2
  num_heads: 2
  kernels: reference
  moe: {blocks: [-1], num_experts: 2, top_k: 1, mlp_ratio: 2.0}
"""

# -- a tiny synthetic set, its label cache, a tiny training config ------------------------------

IMAGE_SIZE = (64, 32)
LABEL_GRID = (8, 4)


def make_synth(root: str, ids: int = 12, images_per_id: int = 4) -> str:
    from clasp.data.synthetic import generate

    if not os.path.exists(os.path.join(root, "meta.json")):
        generate(root, ids, images_per_id, 2, IMAGE_SIZE, seed=0, train_fraction=1.0)
    return root


def make_label_cache(synth_root: str, root: str) -> str:
    """A label cache in the teacher's format whose labels are the synthetic ground truth:
    the part mask's majority class per grid cell, the attribute vector as soft labels."""
    from clasp.data.synthetic import SyntheticDataset
    from clasp.teacher.cache import LabelCacheWriter, file_sha256

    if os.path.exists(os.path.join(root, "manifest.json")):
        return root
    dataset = SyntheticDataset(synth_root, "all")
    keys, parts, attributes = [], [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        mask = sample["parts"]
        cells = mask.reshape(LABEL_GRID[0], mask.shape[0] // LABEL_GRID[0], LABEL_GRID[1], -1)
        cells = cells.permute(0, 2, 1, 3).reshape(*LABEL_GRID, -1)
        counts = F.one_hot(cells.clamp_min(0), len(dataset.part_names)).sum(2)
        parts.append(counts.argmax(-1))
        attributes.append(sample["attributes"])
        keys.append(file_sha256(dataset.paths[i]))
    meta = {
        "teacher": "synthetic ground truth",
        "part_names": dataset.part_names,
        "attribute_names": dataset.attribute_names,
        "group_sizes": [len(v) for v in dataset.meta["attribute_groups"].values()],
        "grid_size": list(LABEL_GRID),
        "image_size": list(IMAGE_SIZE),
    }
    parts = torch.stack(parts)
    with LabelCacheWriter(root, meta) as writer:
        writer.write_shard(keys, parts, torch.ones(parts.shape), torch.stack(attributes), {})
    return root


# The tiny CLIP whose text tower pre-training's image-text tests read: at seed 0 its random
# text tower tells the tiny synthetic set's captions apart well enough for the loss to fall.
TINY_TEXT_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_text_teacher(root: str, config: dict = TINY_TEXT_CLIP) -> str:
    """A randomly initialised open_clip CLIP of `config` (seed 0, the caller's random state
    left as it was) in the teacher folder format."""
    import open_clip

    from clasp.teacher.loading import save_teacher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_teacher(open_clip.CLIP(**config), config, root)
    return root


def tiny_config(synth_root: str, output_dir: str, labels: str | None = None, **sections) -> dict:
    """A 2-block ViT (dim 32) at 32x16 with a PC-MoE last block, 4 experts top-2."""
    from clasp.train.config import build_config

    overrides = [
        f"data.root={synth_root}",
        f"output_dir={output_dir}",
        "model.img_size=[32, 16]",
        "model.patch_size=8",
        "model.embed_dim=32",
        "model.depth=2",
        "model.num_heads=2",
        "model.kernels=reference",
        "model.moe.blocks=[-1]",
        "model.moe.mlp_ratio=2.0",
        "heads.dino.out_dim=64",
        "heads.dino.hidden_dim=64",
        "heads.dino.bottleneck_dim=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "crops.n_local=2",
        "crops.local_size=[16, 8]",
        "optim.steps=8",
        "optim.warmup_steps=2",
        "optim.lr=2e-3",
        "loss.warmup_teacher_temp_steps=2",
        "train.log_every=1",
        "train.plot_every=4",
        "train.checkpoint_every=4",
        "train.progress=false",
    ]
    if labels:
        overrides.append(f"data.labels={labels}")
    for section, values in sections.items():
        overrides += [f"{section}.{k}={v}" for k, v in values.items()]
    return build_config(None, overrides)


# -- `clasp finetune` in this process -----------------------------------------------------------

# Fast settings for every test run: few steps, no progress bar and no loss plot.
FAST = [
    "data.batch_size=8",
    "optim.warmup_steps=2",
    "train.progress=false",
    "train.plot_every=0",
    "train.log_every=1",
    "augment.pad=2",
]


def finetune_argv(recipe, data, fmt, out=None, *more, checkpoint="random", model=None) -> list:
    """The command line `clasp finetune RECIPE --checkpoint ... --data DATA --format FMT
    [--config MODEL] [--out OUT] MORE...`."""
    argv = ["finetune", recipe, "--checkpoint", checkpoint, "--data", data, "--format", fmt]
    argv += ["--config", model] if model else []
    argv += ["--out", str(out)] if out is not None else []
    return [*argv, *more]


def finetune(
    recipe,
    data,
    fmt,
    out=None,
    *overrides,
    checkpoint="random",
    model=None,
    eval_only=False,
    extra=(),
) -> dict:
    """`clasp finetune RECIPE ...` in this process; returns its result.json."""
    from clasp.cli import main as clasp_main

    argv = finetune_argv(recipe, data, fmt, out, checkpoint=checkpoint, model=model)
    argv += ["--eval-only"] if eval_only else []
    argv += [*extra, *FAST, *overrides]
    assert clasp_main(argv) == 0
    with open(os.path.join(str(out), "result.json")) as f:
        return json.load(f)


def records(out) -> list[dict]:
    with open(os.path.join(str(out), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# -- a tiny CUHK-PEDES-style set: each person's top and trousers are flat colours named in its
# captions, so what a caption says is what its images show ----------------------------------

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
# (split, top, trousers) per identity: each colour in each place among the train identities,
# and test identities wearing combinations no train identity wears.
PEOPLE = [
    ("train", "red", "red"), ("train", "green", "green"), ("train", "blue", "blue"),
    ("train", "red", "green"), ("train", "green", "blue"), ("train", "blue", "red"),
    ("val", "red", "red"),
    ("test", "red", "blue"), ("test", "green", "red"), ("test", "blue", "green"),
]  # fmt: skip
IMAGES_PER_PERSON = 2
SIZE = (64, 32)


def captions(top: str, trousers: str) -> list[str]:
    return [
        f"A person in a {top} top and {trousers} trousers.",
        f"Someone wearing {top} on top, {trousers} below.",
    ]


def make_cuhk_pedes(root: str) -> str:
    """reid_raw.json and imgs/<camera folder>/<pid>_<n>.png under root; ids start at 11."""
    records = []
    for index, (split, top, trousers) in enumerate(PEOPLE):
        for n in range(IMAGES_PER_PERSON):
            pixels = np.zeros((*SIZE, 3), np.uint8)
            pixels[: SIZE[0] // 2] = COLORS[top]
            pixels[SIZE[0] // 2 :] = COLORS[trousers]
            path = f"CUHK0{1 + n}/{index:04d}_{n}.png"
            os.makedirs(os.path.join(root, "imgs", os.path.dirname(path)), exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(root, "imgs", path))
            records.append(
                {"split": split, "captions": captions(top, trousers), "file_path": path,
                 "processed_tokens": [], "id": 11 + index}
            )  # fmt: skip
    with open(os.path.join(root, "reid_raw.json"), "w") as f:
        json.dump(records, f)
    return root
