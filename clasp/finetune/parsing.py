"""Human parsing fine-tuning: a light decoder on the patch tokens, cross-entropy per pixel.

- Head: progressive upsampling of the patch-token grid: per entry of head.channels a 3x3
  convolution, BatchNorm, ReLU and a 2x bilinear upsampling, then a 1x1 convolution to the
  classes; the logits are upsampled bilinearly to the label's resolution.
- Loss: cross-entropy over the pixels of the training view; ignored pixels (-1) and pixels
  outside the source image are left out.
- Views: resize, flip (left/right classes swapped where the set has them, e.g. LIP's arms,
  legs and shoes), random zoom and rotation.
- Test: logits upsampled to each test image's own resolution (flip averaged with
  eval.flip); mIoU and pixel accuracy over a dataset-level confusion matrix
  (`clasp.eval.metrics`).

Formats: ccp (train / test photos, the 6 coarse part classes), lip (train / val, 20 classes),
synth (train / test identities, 6 part classes).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clasp.eval.metrics import confusion_matrix, segmentation_metrics

from .augment import draw_view, normalize, swap_labels, view_matrix, warp_image, warp_mask
from .run import Recipe, eval_batches


class ParsingHead(nn.Module):
    """patches (B, gh, gw, D) -> logits (B, C, gh * 2^n, gw * 2^n), n = len(channels)."""

    def __init__(self, dim: int, num_classes: int, channels=(128, 64)):
        super().__init__()
        layers, width = [], dim
        for c in channels:
            layers += [
                nn.Conv2d(width, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ]
            width = c
        self.decoder = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, pooled: torch.Tensor | None, patches: torch.Tensor) -> torch.Tensor:
        x = patches.permute(0, 3, 1, 2).float()
        return self.classifier(self.decoder(x))


def flip_logits(logits: torch.Tensor, pairs) -> torch.Tensor:
    """Mirror (B, C, H, W) logits back and exchange the channels of each left/right pair."""
    out = logits.flip(-1)
    if pairs:
        order = list(range(out.shape[1]))
        for a, b in pairs:
            order[a], order[b] = b, a
        out = out[:, order]
    return out


class ParsingRecipe(Recipe):
    name = "parsing"
    task = "parsing"
    metric = "mIoU"
    splits = {"ccp": ("train", "test"), "lip": ("train", "val"), "synth": ("train", "test")}
    loss_terms = ("ce",)

    def head_config(self, train_set) -> dict:
        if not train_set.part_names:
            raise ValueError(f"{train_set!r} has no part masks")
        pairs = [list(p) for p in getattr(train_set, "flip_pairs", ()) or ()]
        return {"names": list(train_set.part_names), "flip_pairs": pairs}

    def build_head(self, backbone, head_config: dict) -> nn.Module:
        self.names = list(head_config["names"])
        self.pairs = [tuple(p) for p in head_config["flip_pairs"]]
        channels = tuple(self.config["head"]["channels"])
        return ParsingHead(backbone.embed_dim, len(self.names), channels)

    def train_sample(self, sample: dict, size) -> dict:
        flip, scale, angle, shift = draw_view(self.config["augment"])
        source = tuple(sample["image"].shape[-2:])
        matrix = view_matrix(source, size, flip=flip, scale=scale, angle=angle, shift=shift)
        image = normalize(warp_image(sample["image"], matrix, size))
        mask = warp_mask(sample["parts"], matrix, size)
        if flip:
            mask = swap_labels(mask, self.pairs)
        return {"image": image, "parts": mask, "index": sample["index"]}

    def losses(self, out: torch.Tensor, batch: dict, device) -> dict[str, torch.Tensor]:
        masks = batch["parts"].to(device)
        logits = F.interpolate(out.float(), masks.shape[-2:], mode="bilinear", align_corners=False)
        if not (masks >= 0).any():
            return {"ce": logits.sum() * 0.0}
        return {"ce": F.cross_entropy(logits, masks, ignore_index=-1)}

    def evaluate(self, model, test, size, device) -> dict:
        data, num_classes = self.config["data"], len(self.names)
        if list(test.part_names or []) != self.names:
            raise ValueError(
                f"the head predicts the classes {self.names}, the test set {test!r} has "
                f"{test.part_names}; evaluate on the format it was trained on"
            )
        confusion = torch.zeros(num_classes, num_classes + 1, dtype=torch.long)
        count = 0
        for batch in eval_batches(
            test, size, data["eval_batch_size"], data["num_workers"], data["max_eval_images"]
        ):
            images = batch["image"].to(device)
            weights = model.backbone.prompts.weights(self.task, images.shape[0], device)
            logits = model(images, weights)[0].float()
            logits = F.interpolate(logits, size, mode="bilinear", align_corners=False)
            if self.config["eval"]["flip"]:
                mirrored = model(images.flip(-1), weights)[0].float()
                mirrored = F.interpolate(mirrored, size, mode="bilinear", align_corners=False)
                logits = 0.5 * (logits + flip_logits(mirrored, self.pairs))
            for i, mask in enumerate(batch["parts"]):
                full = F.interpolate(
                    logits[i : i + 1], tuple(mask.shape), mode="bilinear", align_corners=False
                )
                confusion += confusion_matrix(full[0].argmax(0).cpu(), mask, num_classes)
            count += len(batch["parts"])
        metrics = segmentation_metrics(confusion, self.names)
        return {"metrics": metrics, "sets": {"test": count}}
