"""Pedestrian attribute fine-tuning, the strong baseline of Jia et al. ("Rethinking of
pedestrian attribute recognition", 2021).

- Head: a linear classifier on the class token followed by a BatchNorm1d over the logits.
- Loss: binary cross-entropy weighted per attribute by its positive ratio r_j in the training
  set: exp(1 - r_j) on positives, exp(r_j) on negatives, so rare positives weigh more.
  Unknown labels (NaN) are left out.
- Views: resize, flip, pad-and-crop.
- Test: probability > 0.5 per attribute; label-based mA, instance accuracy, precision,
  recall and F1 (`clasp.eval.metrics.attribute_metrics`).

Formats: peta (train / test identities), pa100k (trainval / test), market (the
market_attribute.mat of Market-1501: train / gallery identities), synth (train / test).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from clasp.eval.metrics import attribute_metrics

from .augment import draw_view, normalize, view_matrix, warp_image
from .run import Recipe, eval_batches


class AttributeHead(nn.Module):
    """pooled (B, D) -> logits (B, A): Linear then BatchNorm1d over the attributes."""

    def __init__(self, dim: int, num_attributes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_attributes)
        self.norm = nn.BatchNorm1d(num_attributes)

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(self.linear(pooled.float()))


def positive_ratio_weights(ratio: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, A) BCE weights: exp(1 - r) where the target is 1, exp(r) where it is 0, 0 where it
    is unknown (NaN); ratio (A,) the positive fraction of each attribute."""
    known = ~torch.isnan(targets)
    positive = torch.nan_to_num(targets, nan=0.0) > 0.5
    weights = torch.where(positive, torch.exp(1 - ratio), torch.exp(ratio))
    return weights * known


class AttributeRecipe(Recipe):
    name = "attributes"
    task = "attributes"
    metric = "mA"
    splits = {
        "peta": ("train", "test"),
        "pa100k": ("trainval", "test"),
        "market": ("train", "gallery"),
        "synth": ("train", "test"),
    }
    loss_terms = ("bce",)

    def head_config(self, train_set) -> dict:
        names = train_set.attribute_names
        if not names:
            raise ValueError(f"{train_set!r} has no attribute labels")
        ratio = positive_ratio(train_set)
        return {"names": list(names), "positive_ratio": [round(float(r), 6) for r in ratio]}

    def build_head(self, backbone, head_config: dict) -> nn.Module:
        self.ratio = torch.tensor(head_config["positive_ratio"], dtype=torch.float32)
        self.names = list(head_config["names"])
        return AttributeHead(backbone.embed_dim, len(head_config["names"]))

    def train_sample(self, sample: dict, size) -> dict:
        flip, scale, angle, shift = draw_view(self.config["augment"])
        source = tuple(sample["image"].shape[-2:])
        matrix = view_matrix(source, size, flip=flip, scale=scale, angle=angle, shift=shift)
        image = normalize(warp_image(sample["image"], matrix, size))
        return {"image": image, "attributes": sample["attributes"], "index": sample["index"]}

    def losses(self, out, batch: dict, device) -> dict[str, torch.Tensor]:
        targets = batch["attributes"].to(device).float()
        weights = positive_ratio_weights(self.ratio.to(device), targets)
        bce = F.binary_cross_entropy_with_logits(
            out.float(), torch.nan_to_num(targets, nan=0.0), weight=weights, reduction="sum"
        )
        return {"bce": bce / weights.new_tensor(targets.shape[0])}

    def evaluate(self, model, test, size, device) -> dict:
        data = self.config["data"]
        if list(test.attribute_names or []) != self.names:
            raise ValueError(
                f"the head predicts {len(self.names)} attributes ({', '.join(self.names[:3])}, "
                f"...), the test set {test!r} has others; evaluate on the format it was "
                "trained on"
            )
        predicted, truth = [], []
        for batch in eval_batches(
            test, size, data["eval_batch_size"], data["num_workers"], data["max_eval_images"]
        ):
            images = batch["image"].to(device)
            weights = model.backbone.prompts.weights(self.task, images.shape[0], device)
            logits = model(images, weights)[0].float()
            if self.config["eval"]["flip"]:
                logits = 0.5 * (logits + model(images.flip(-1), weights)[0].float())
            predicted.append((logits > 0).cpu())
            truth.append(batch["attributes"].float())
        metrics = attribute_metrics(torch.cat(predicted), torch.cat(truth), self.names)
        return {"metrics": metrics, "sets": {"test": int(sum(len(p) for p in predicted))}}


def positive_ratio(dataset) -> torch.Tensor:
    """(A,) fraction of known labels that are positive, per attribute, over a dataset."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, dict) and hasattr(dataset, "persons"):  # PETA: one row per person
        rows = [labels.get(dataset.persons[p]) for p in dataset.pids]
    elif hasattr(dataset, "attribute_matrix"):  # synth
        rows = list(dataset.attribute_matrix)
    elif hasattr(dataset, "labels") and not isinstance(labels, dict):  # PA-100K
        rows = list(labels)
    elif isinstance(getattr(dataset, "attributes", None), dict):  # Market: one row per id
        rows = [dataset.attributes.get(p) for p in dataset.pids]
    else:  # any other dataset: read every sample once
        rows = [dataset[i]["attributes"].numpy() for i in range(len(dataset))]
    size = len(dataset.attribute_names)
    unknown = np.full(size, np.nan)
    matrix = torch.from_numpy(
        np.stack([unknown if r is None else np.asarray(r, np.float64) for r in rows])
    ).reshape(-1, size)
    known = ~torch.isnan(matrix)
    positives = torch.nan_to_num(matrix, nan=0.0).sum(0)
    return (positives / known.sum(0).clamp(min=1)).float()
