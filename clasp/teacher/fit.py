"""Fitting a small open_clip model to stand in for CLIP where no pre-trained weights can be
downloaded (the command is `clasp teacher fit`, in `clasp.teacher.cli`).

It trains on a synthetic set (`clasp synth`) or PETA (see `clasp.teacher.fit_data`). The
model is an open_clip `CLIP`: a tiny ViT image tower at person aspect ratio (128 x 64,
patch 8) and a tiny text transformer with open_clip's tokenizer, saved with `save_teacher`,
so `clasp label --teacher OUT` and `load_teacher(OUT)` use it like any open_clip model.

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

The fit is deterministic for a given config on one machine. Given a `quality` function
(the command passes `clasp.eval.pseudo_labels.teacher_quality`), it reports the pseudo-label
quality of the saved teacher on held-out identities (the synthetic test split).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from clasp.atomic import atomic_open, write_json
from clasp.schedules import cosine
from clasp.vocabulary import load_prompts

from .fit_data import CaptionedImages, detect_format, identity_batches

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


def learning_rate(step: int, steps: int, cfg: dict) -> float:
    """The fit's learning rate at `step` of `steps`: `clasp.train.schedules.cosine` with the
    warmup counted from the step being taken (the first step trains at lr / warmup_steps, not
    at 0; step warmup_steps - 1 reaches lr), then a half cosine from lr at step warmup_steps
    towards min_lr, which it would reach one step after the last."""
    warmup = cfg["warmup_steps"]
    return cosine(step + 1 if step < warmup else step, steps + 1, cfg["lr"], cfg["min_lr"], warmup)


def fit(
    root: str,
    out: str,
    config: dict,
    *,
    log: Callable[[str], None] = print,
    quality: Callable[[str, str, str], dict] | None = None,
) -> dict:
    """Train the teacher on the set at root (config: FIT_DEFAULTS merged with the user's) and
    save it to out with its fit_history.jsonl and fit.json; returns the fit summary.

    quality(teacher_dir, root, split) -> dict scores the saved teacher's pseudo-labels on the
    held-out split config["eval_split"] of a synthetic set; its result is the summary's
    "quality" (`clasp.eval.pseudo_labels.teacher_quality` is the one the command uses).
    """
    import open_clip

    from .loading import save_teacher

    cfg = config
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    prompts = load_prompts()
    format = cfg["format"] or detect_format(root)
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
    batches = identity_batches(data.pids, batch_size, generator)
    history = []
    model.train()
    log(
        f"teacher fit: {len(data)} {format} images ({int(data.pids.unique().numel())} "
        f"identities, loaded in {load_seconds:.1f} s), {steps} steps of {batch_size}"
    )
    start = time.perf_counter()
    for step in range(steps):
        lr = learning_rate(step, steps, cfg)
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
    if quality is not None and format == "synth" and cfg["eval_split"]:
        summary["quality"] = q = quality(out, root, cfg["eval_split"])
        log(
            f"  held-out ({cfg['eval_split']}) pseudo-labels: part pixel accuracy "
            f"{100 * q['part_pixel_accuracy']:.1f}% (all-background baseline "
            f"{100 * q['majority_baseline']:.1f}%), part mIoU {100 * q['part_mIoU']:.1f}%, "
            f"attribute mA {100 * q['attribute_mA']:.1f}%"
        )
    with atomic_open(os.path.join(out, "fit_history.jsonl")) as f:
        for record in history:
            f.write(json.dumps(record) + "\n")
    write_json(os.path.join(out, "fit.json"), summary)
    return summary
