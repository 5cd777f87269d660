"""A tiny synthetic set, a label cache made from its ground truth, a tiny random CLIP (for its
text tower), and a tiny training config."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from clasp.data.synthetic import SyntheticDataset, generate
from clasp.teacher.cache import LabelCacheWriter, file_sha256
from clasp.train.config import build_config

IMAGE_SIZE = (64, 32)
LABEL_GRID = (8, 4)
# A CLIP that builds in milliseconds; pre-training reads only its text tower.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_synth(root: str, ids: int = 12, images_per_id: int = 4) -> str:
    if not os.path.exists(os.path.join(root, "meta.json")):
        generate(root, ids, images_per_id, 2, IMAGE_SIZE, seed=0, train_fraction=1.0)
    return root


def make_label_cache(synth_root: str, root: str) -> str:
    """A label cache in the teacher's format whose labels are the synthetic ground truth:
    the part mask's majority class per grid cell, the attribute vector as soft labels."""
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
    writer = LabelCacheWriter(root, meta)
    writer.write_shard(keys, parts, torch.ones(parts.shape), torch.stack(attributes), failed={})
    return root


def make_text_teacher(root: str) -> str:
    """A randomly initialised tiny CLIP in the teacher folder format."""
    import open_clip

    from clasp.teacher.loading import save_teacher

    if not os.path.exists(os.path.join(root, "open_clip_config.json")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save_teacher(open_clip.CLIP(**TINY_CLIP), TINY_CLIP, root)
    return root


def tiny_config(synth_root: str, output_dir: str, labels: str | None = None, **sections) -> dict:
    """A 2-block ViT (dim 32) at 32x16 with a PC-MoE last block, 4 experts top-2."""
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
