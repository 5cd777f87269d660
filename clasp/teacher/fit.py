"""`clasp teacher fit`: train a small open_clip model to stand in for CLIP where no
pre-trained weights can be downloaded.

    clasp teacher fit --data DIR --out DIR [--epochs N] [--config FILE] [key=value ...]

DIR holds a synthetic set (`clasp synth`) or PETA. The model is an open_clip `CLIP`: a tiny
ViT image tower at person aspect ratio (128 x 64, patch 8) and a tiny text transformer with
open_clip's tokenizer, saved with `save_teacher`, so `clasp label --teacher OUT` and
`load_teacher(OUT)` use it like any open_clip model.

What it learns from, per training image (one image per identity in a batch, so no caption
is repeated and `ClipLoss` sees no false negatives):
- its caption (synthetic sets write one from the drawn appearance; for PETA it is built from
  the person's attribute names), through open_clip's `ClipLoss`;
- its attributes: for each attribute group of the prompts file, the pooled image embedding
  classified among the group's value prompts (embedded through a template, as `clasp label`
  does), cross-entropy at the model's own temperature;
- its part mask (synthetic sets only), reduced to the patch grid by majority vote: every
  patch's dense feature classified among the part prompts, both MaskCLIP-style (the last
  block's value path, what `clasp label` uses by default) and plain (the final tokens).
A caption-only contrastive model learns what distinguishes whole images, almost nothing
about where the head or the feet are; the part and attribute terms train exactly what the
labeler reads: prompt embeddings against dense and pooled image features.

The fit is deterministic for a given config on one machine. It prints the pseudo-label
quality on held-out identities (the synthetic test split) when the set has one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clasp.config import load_config
from clasp.data.build import build_dataset
from clasp.data.images import read_rgb

from .prompts import Prompts, load_prompts

SEPARATION_TEMPERATURE = 0.1

FIT_DEFAULTS = {
    "seed": 0,
    "format": None,  # synth | peta; None: synth when DIR/meta.json exists, else peta
    "split": "train",
    "eval_split": "test",  # held-out split for the quality report (None: none)
    "epochs": 20,  # passes over the training images
    "steps": None,  # set: overrides epochs
    "batch_size": 64,
    "lr": 2.0e-3,
    "min_lr": 1.0e-5,
    "warmup_steps": 10,
    "weight_decay": 0.05,
    "max_images": None,  # evenly spaced subset of the training split
    "max_seconds": None,  # stop early once this much training time has passed
    "threads": None,  # torch threads (None: torch's default)
    "workers": 2,  # processes decoding the training images
    "log_every": 10,
    # Part classes weigh frequency^-balance in the part losses (0: plain cross-entropy);
    # background covers most pixels and would otherwise drown the small parts.
    "part_balance": 0.5,
    "loss": {"clip": 1.0, "attributes": 1.0, "parts": 1.0, "plain_parts": 0.5, "prompts": 1.0},
    # Patch 8 gives a 16 x 8 part grid on 128 x 64 crops: small parts (arms, feet) survive
    # a majority vote there but not on an 8 x 4 grid, which caps part mIoU near a third.
    "model": {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": [128, 64],
            "patch_size": 8,
            "width": 64,
            "layers": 3,
            "head_width": 32,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {"context_length": 32, "width": 64, "heads": 2, "layers": 2},
    },
}


# ---------------------------------------------------------------------------------------------
# Training data: images at the teacher's input size, captions, attribute and part targets


def group_targets(vector, groups: dict[str, list[str]]) -> list[int]:
    """Flat 0/1 attribute vector (NaN unknown) -> value index per group (-1: unknown or not
    exactly one value set)."""
    out, start = [], 0
    for values in groups.values():
        chunk = vector[start : start + len(values)]
        start += len(values)
        known = [v for v in chunk if not (isinstance(v, float) and math.isnan(v))]
        ones = [i for i, v in enumerate(chunk) if v == 1]
        out.append(ones[0] if len(ones) == 1 and len(known) == len(values) else -1)
    return out


# PETA attribute -> (group, value) of the packaged prompts; colours are read per body part.
PETA_TO_GROUP = {
    "personalMale": ("gender", "male"), "personalFemale": ("gender", "female"),
    "personalLess15": ("age", "child"), "personalLess30": ("age", "adult"),
    "personalLess45": ("age", "adult"), "personalLess60": ("age", "adult"),
    "personalLarger60": ("age", "elderly"), "hairLong": ("hair", "long"),
    "hairShort": ("hair", "short"), "upperBodyShortSleeve": ("upper_type", "short_sleeve"),
    "upperBodyLongSleeve": ("upper_type", "long_sleeve"),
    "lowerBodyTrousers": ("lower_type", "trousers"), "lowerBodyJeans": ("lower_type", "trousers"),
    "lowerBodyShorts": ("lower_type", "shorts"), "lowerBodyShortSkirt": ("lower_type", "skirt"),
    "lowerBodyLongSkirt": ("lower_type", "skirt"), "carryingBackpack": ("bag", "backpack"),
    "carryingNothing": ("bag", "none"), "accessoryHat": ("hat", "hat"),
    **{f"upperBody{c}": ("upper_color", c.lower().replace("grey", "gray"))
       for c in ("Black", "White", "Red", "Blue", "Green", "Yellow", "Grey")},
    **{f"lowerBody{c}": ("lower_color", c.lower().replace("grey", "gray"))
       for c in ("Black", "White", "Red", "Blue", "Green", "Yellow", "Grey")},
}  # fmt: skip


def peta_targets(names: list[str], groups: dict[str, list[str]]) -> list[int]:
    """PETA attribute names of one person -> value index per prompt group (-1 unknown: no
    mapped attribute, or several values of one group). PETA lists what is present, so a
    person without accessoryHat has no hat."""
    found: dict[str, set[str]] = {g: set() for g in groups}
    for name in names:
        if name in PETA_TO_GROUP:
            group, value = PETA_TO_GROUP[name]
            if group in found:
                found[group].add(value)
    if "hat" in found and not found["hat"] and "none" in groups["hat"]:
        found["hat"].add("none")
    return [
        groups[g].index(next(iter(v))) if len(v) == 1 and next(iter(v)) in groups[g] else -1
        for g, v in found.items()
    ]


def words(name: str) -> str:
    """'upperBodyShortSleeve' -> 'upper body short sleeve'."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).lower()


class _Example:
    """Dataset index -> (pixels, caption, pid, group targets, part grid or None); runs in
    DataLoader workers."""

    def __init__(self, dataset, format, prompts: Prompts, image_size, grid_size):
        self.dataset, self.format = dataset, format
        self.groups = {g: list(v) for g, v in prompts.attributes.items()}
        self.num_parts = len(prompts.part_names)
        self.image_size, self.grid_size = tuple(image_size), tuple(grid_size)

    def __call__(self, index: int):
        from clasp.eval.probes import grid_labels

        sample = self.dataset.load(index)
        height, width = self.image_size
        image = Image.fromarray(sample["image"].permute(1, 2, 0).numpy())
        resized = image.resize((width, height), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)
        if self.format == "synth":
            targets = group_targets(sample["attributes"].tolist(), self.groups)
            grid = grid_labels(sample["parts"], self.grid_size, self.num_parts)
            return pixels, sample["caption"], int(sample["pid"]), targets, grid
        flags = sample["attributes"].tolist()
        names = self.dataset.attribute_names
        present = [n for n, v in zip(names, flags, strict=True) if v == 1]
        caption = "a photo of a person: " + ", ".join(words(n) for n in present)
        return pixels, caption, int(sample["pid"]), peta_targets(present, self.groups), None


class _Examples(torch.utils.data.Dataset):
    def __init__(self, indices: list[int], example: _Example):
        self.indices, self.example = indices, example

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.example(self.indices[i])


class CaptionedImages:
    """A training set in memory: pixels (N, 3, H, W) uint8 at the teacher's input size,
    captions, pids, attribute targets (N, G) per prompt group (-1 unknown) and part grids
    (N, gh, gw) (-1 unknown) or None."""

    def __init__(
        self, root, format, split, prompts: Prompts, image_size, grid_size, *,
        max_images: int | None = None, workers: int = 0,
    ):  # fmt: skip
        self.dataset = build_dataset(format, root, split)
        indices = list(range(len(self.dataset)))
        if max_images is not None and len(indices) > max_images:
            indices = [int(i * len(indices) / max_images) for i in range(max_images)]
        example = _Example(self.dataset, format, prompts, image_size, grid_size)
        loader = torch.utils.data.DataLoader(
            _Examples(indices, example), batch_size=64, num_workers=workers, collate_fn=list
        )
        items = [item for batch in loader for item in batch]
        self.pixels = torch.stack([item[0] for item in items])
        self.captions = [item[1] for item in items]
        self.pids = torch.tensor([item[2] for item in items])
        self.targets = torch.tensor([item[3] for item in items], dtype=torch.long)
        self.grids = torch.stack([item[4] for item in items]) if format == "synth" else None

    def __len__(self) -> int:
        return len(self.captions)


# ---------------------------------------------------------------------------------------------
# The model's features, with gradients (the labeler's `ClipTeacher.encode_image` runs the
# same computation without them)


def image_features(visual, pixels: torch.Tensor):
    """pooled (B, E), MaskCLIP dense (B, N, E), plain dense (B, N, E) of an open_clip
    VisionTransformer with standard residual attention blocks."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    final = last(x)
    attn = last.attn
    width = x.shape[-1]
    bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    value = last.ls_1(attn.out_proj(F.linear(last.ln_1(x), attn.in_proj_weight[2 * width :], bias)))
    pooled = visual.ln_post(final[:, 0]) @ visual.proj
    maskclip = visual.ln_post(value[:, 1:]) @ visual.proj
    plain = visual.ln_post(final[:, 1:]) @ visual.proj
    return pooled, maskclip, plain


class PromptTexts:
    """Tokens of every (template, class, prompt) text of part classes or attribute values.

    `embed` returns the class embeddings, averaged over a class's L2-normalised texts as the
    labeler does (given a template index, only that template's texts: a step costs a
    quarter as much, and each template's average is trained towards the same class), and a
    separation loss: each text classified among the classes of its group (all part classes;
    one attribute group's values) at temperature 0.1. A fresh text tower maps every prompt
    to nearly the same embedding (its pooled end-of-text token averages mostly shared words),
    and the image losses alone pull the prompts apart slowly; this term separates them within
    a few steps, so the image towers train against distinct targets from the start."""

    def __init__(self, classes: list[list[str]], templates: list[str], tokenizer, groups=None):
        self.owner = torch.tensor([c for c, prompts in enumerate(classes) for _ in prompts])
        self.tokens = torch.stack(
            [tokenizer([t.format(p) for prompts in classes for p in prompts]) for t in templates]
        )  # (templates, texts, context)
        self.num_classes = len(classes)
        self.group = torch.tensor(groups) if groups is not None else torch.zeros(len(classes))

    def embed(self, model, template: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens if template is None else self.tokens[template : template + 1]
        texts = F.normalize(model.encode_text(tokens.flatten(0, 1)), dim=-1)
        owner = self.owner.repeat(tokens.shape[0])
        sums = texts.new_zeros(self.num_classes, texts.shape[1]).index_add(0, owner, texts)
        classes = F.normalize(sums / torch.bincount(owner)[:, None], dim=-1)
        other_group = self.group[owner][:, None] != self.group[None, :]
        logits = (texts @ classes.T / SEPARATION_TEMPERATURE).masked_fill(other_group, -1e4)
        return classes, F.cross_entropy(logits, owner)


# ---------------------------------------------------------------------------------------------
# Fitting


def build_clip(model_cfg: dict):
    import open_clip

    model = open_clip.CLIP(**model_cfg)
    # Person crops are stretched to the input (no centre crop), as ClipTeacher.resize does.
    open_clip.set_model_preprocess_cfg(
        model,
        {
            "size": list(model.visual.image_size),
            "mode": "RGB",
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "squash",
            "fill_color": 0,
        },
    )
    return model


def _detect_format(root: str) -> str:
    return "synth" if os.path.isfile(os.path.join(root, "meta.json")) else "peta"


def _identity_batches(pids: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless batches of image indices, at most one image per identity in a batch."""
    by_pid: dict[int, list[int]] = {}
    for i, pid in enumerate(pids.tolist()):
        by_pid.setdefault(pid, []).append(i)
    groups = list(by_pid.values())
    batch_size = min(batch_size, len(groups))
    while True:
        order = torch.randperm(len(groups), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = [groups[g] for g in order[start : start + batch_size]]
            yield [g[int(torch.randint(len(g), (1,), generator=generator))] for g in chosen]


def fit(root: str, out: str, config: dict, *, log=print) -> dict:
    """Train the teacher on the set at root and save it to out; returns the fit summary."""
    import open_clip

    from .clip import save_teacher

    cfg = config
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    prompts = load_prompts()
    format = cfg["format"] or _detect_format(root)
    model = build_clip(cfg["model"])
    visual = model.visual
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["model"]["text_cfg"]["context_length"])
    start = time.perf_counter()
    data = CaptionedImages(
        root, format, cfg["split"], prompts, visual.image_size, visual.grid_size,
        max_images=cfg["max_images"], workers=cfg["workers"],
    )  # fmt: skip
    load_seconds = time.perf_counter() - start
    caption_tokens = tokenizer(data.captions)
    group_sizes = prompts.group_sizes
    part_texts = PromptTexts(list(prompts.parts.values()), prompts.templates, tokenizer)
    value_texts = PromptTexts(
        [p for group in prompts.attributes.values() for p in group.values()],
        prompts.templates,
        tokenizer,
        groups=[g for g, size in enumerate(group_sizes) for _ in range(size)],
    )
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255

    batch_size = min(cfg["batch_size"], int(data.pids.unique().numel()))
    steps = cfg["steps"] or max(1, math.ceil(cfg["epochs"] * len(data) / batch_size))
    # The token embedding (49408 x width, most of the weights) stays at its random
    # initialisation: distinct random vectors serve the small vocabulary of captions and
    # prompts as well as learned ones, at a fraction of the optimiser's cost.
    model.token_embedding.requires_grad_(False)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trained if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"],
    )  # fmt: skip
    clip_loss = open_clip.ClipLoss()
    part_weight = None
    if data.grids is not None:
        counts = torch.bincount(data.grids[data.grids >= 0], minlength=len(prompts.part_names))
        part_weight = counts.float().clamp(min=1).pow(-cfg["part_balance"])
        part_weight = part_weight / part_weight.mean()
    weights = cfg["loss"]
    generator = torch.Generator().manual_seed(cfg["seed"])
    batches = _identity_batches(data.pids, batch_size, generator)
    history = []
    model.train()
    log(
        f"teacher fit: {len(data)} {format} images ({int(data.pids.unique().numel())} "
        f"identities, loaded in {load_seconds:.1f} s), {steps} steps of {batch_size}"
    )
    start = time.perf_counter()
    for step in range(steps):
        lr = _cosine_lr(step, steps, cfg["lr"], cfg["min_lr"], cfg["warmup_steps"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.tensor(next(batches))
        template = int(torch.randint(len(prompts.templates), (1,), generator=generator))
        pixels = data.pixels[index].float()
        flip = torch.rand(len(index), generator=generator) < 0.5
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        pooled, maskclip, plain = image_features(visual, (pixels - mean) / std)
        scale = model.logit_scale.exp().clamp(max=100)
        image = F.normalize(pooled, dim=-1)
        text = F.normalize(model.encode_text(caption_tokens[index]), dim=-1)
        losses = {"clip": clip_loss(image, text, scale)}
        targets = data.targets[index]
        values, separation = value_texts.embed(model, template)
        losses["prompts"] = separation
        if (targets >= 0).any():
            logits = scale * image @ values.T
            per_group = [
                F.cross_entropy(g, t, ignore_index=-1)
                for g, t in zip(logits.split(group_sizes, dim=1), targets.T, strict=True)
                if (t >= 0).any()
            ]
            losses["attributes"] = torch.stack(per_group).mean()
        if data.grids is not None:
            grids = data.grids[index]
            grids = torch.where(flip.view(-1, 1, 1), grids.flip(-1), grids).reshape(-1)
            parts, separation = part_texts.embed(model, template)
            losses["prompts"] = losses["prompts"] + separation
            for name, dense in (("parts", maskclip), ("plain_parts", plain)):
                logits = scale * F.normalize(dense, dim=-1).reshape(-1, parts.shape[1]) @ parts.T
                losses[name] = F.cross_entropy(logits, grids, part_weight, ignore_index=-1)
        total = sum(weights[k] * v for k, v in losses.items() if weights.get(k))
        if not torch.isfinite(total):
            raise FloatingPointError(f"teacher fit: loss is {float(total)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        record = {"step": step + 1, "lr": lr, "loss": float(total.detach())}
        record.update({k: float(v.detach()) for k, v in losses.items()})
        history.append(record)
        elapsed = time.perf_counter() - start
        if (step + 1) % cfg["log_every"] == 0 or step + 1 == steps:
            shown = " ".join(f"{k} {v:.3f}" for k, v in record.items() if k not in ("step", "lr"))
            log(f"  step {step + 1}/{steps} {shown} ({elapsed:.0f} s)")
        if cfg["max_seconds"] and elapsed > cfg["max_seconds"]:
            log(f"  stopping at step {step + 1}: max_seconds={cfg['max_seconds']} reached")
            break
    train_seconds = time.perf_counter() - start
    model.eval()
    save_teacher(model, {"model_cfg": cfg["model"]}, out)
    summary = {
        "data": os.path.abspath(root),
        "format": format,
        "images": len(data),
        "steps": len(history),
        "train_seconds": round(train_seconds, 1),
        "config": cfg,
        "final_losses": {k: v for k, v in history[-1].items() if k not in ("step", "lr")},
    }
    if format == "synth" and cfg["eval_split"]:
        summary["quality"] = teacher_quality(out, root, cfg["eval_split"])
        q = summary["quality"]
        log(
            f"  held-out ({cfg['eval_split']}) pseudo-labels: part pixel accuracy "
            f"{100 * q['part_pixel_accuracy']:.1f}% (all-background baseline "
            f"{100 * q['majority_baseline']:.1f}%), part mIoU {100 * q['part_mIoU']:.1f}%, "
            f"attribute mA {100 * q['attribute_mA']:.1f}%"
        )
    with open(os.path.join(out, "fit_history.jsonl"), "w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _cosine_lr(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def teacher_quality(
    teacher_dir: str,
    root: str,
    split: str,
    *,
    max_images: int | None = 256,
    threshold: float | None = 0.4,
) -> dict:
    """Pseudo-labels of the saved teacher on a synthetic split (through the labeler's own
    `ClipTeacher.label`) against its ground truth; see `clasp.eval.pseudo_labels`."""
    from clasp.eval.pseudo_labels import label_quality

    from .clip import load_teacher

    teacher = load_teacher(teacher_dir)
    prompts = load_prompts()
    dataset = build_dataset("synth", root, split)
    indices = list(range(len(dataset)))
    if max_images is not None and len(indices) > max_images:
        indices = [int(i * len(indices) / max_images) for i in range(max_images)]
    text = teacher.text_embeddings(prompts)
    grids, masks, soft, target = [], [], [], []
    for start in range(0, len(indices), 64):
        samples = [dataset.load(i) for i in indices[start : start + 64]]
        images = torch.stack([teacher.resize(read_rgb(s["path"])) for s in samples])
        labels = teacher.label(images, text, threshold=threshold, backend="reference")
        grids += list(labels["parts"])
        masks += [s["parts"] for s in samples]
        soft.append(labels["attributes"])
        target += [s["attributes"] for s in samples]
    return label_quality(grids, masks, torch.cat(soft), torch.stack(target), prompts)


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="teacher_command", metavar="COMMAND", required=True)
    p = sub.add_parser("fit", help="train a small open_clip teacher on a synthetic set or PETA")
    p.add_argument("--data", required=True, help="synthetic set (clasp synth) or PETA folder")
    p.add_argument("--out", required=True, help="teacher folder to write")
    p.add_argument("--epochs", type=float, default=None, help="passes over the training images")
    p.add_argument("--config", default=None, help="YAML file over the defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(FIT_DEFAULTS, args.config, args.overrides)
    except (KeyError, ValueError, FileNotFoundError) as error:
        print(f"clasp teacher fit: {error}", file=sys.stderr)
        return 2
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    try:
        summary = fit(args.data, args.out, cfg)
    except (FileNotFoundError, ValueError) as error:
        print(f"clasp teacher fit: {error}", file=sys.stderr)
        return 2
    print(f"saved the teacher to {args.out} (use: clasp label --teacher {args.out} ...)")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0
