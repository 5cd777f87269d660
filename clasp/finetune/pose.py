"""Top-down pose fine-tuning: heatmaps from the patch tokens, on ground-truth person boxes.

- Head: two 4x4 stride-2 transposed convolutions (BatchNorm, ReLU) and a 1x1 convolution to
  one heatmap per keypoint (the ViTPose head): heatmaps at a quarter of the patch stride.
- Targets: a Gaussian (head.sigma cells) around each labelled keypoint, in continuous
  coordinates (cell j's centre at j + 0.5). Loss: the squared error summed over each
  heatmap, averaged over the labelled keypoints (the heatmap MSE up to a constant).
- Views: flip (left and right keypoints swapped), random zoom and rotation.
- Test: flip test (the mirrored image's heatmaps mirrored back, left/right swapped,
  averaged), argmax with a quarter-cell shift towards the higher neighbour. Metrics: COCO
  keypoint AP/AR by object keypoint similarity through pycocotools (each person's area from
  its annotation; keypoints back in image coordinates), and PCK at eval.pck_alpha of the
  box around the labelled keypoints (`clasp.eval.metrics.pck`).

Formats: coco (person crops of the ground-truth boxes; the val2017 annotations when present,
else a fixed fifth of the train photos, by a hash of the file name, as `clasp eval`), synth
(train / test identities; each image is one person).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from clasp.data.build import build_dataset
from clasp.data.transforms import flip_permutation
from clasp.eval.metrics import keypoint_box_size, pck

from .augment import draw_view, normalize, view_matrix, warp_image, warp_keypoints
from .run import Recipe, eval_batches

log = logging.getLogger("clasp.finetune")

COCO_SIGMAS = np.array(
    [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87,
     0.89, 0.89]
) / 10.0  # fmt: skip


class HeatmapHead(nn.Module):
    """patches (B, gh, gw, D) -> heatmaps (B, K, 4 gh, 4 gw)."""

    def __init__(self, dim: int, num_keypoints: int, channels: int = 256):
        super().__init__()
        layers, width = [], dim
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            width = channels
        self.deconv = nn.Sequential(*layers)
        self.final = nn.Conv2d(channels, num_keypoints, 1)
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d | nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
        nn.init.zeros_(self.final.bias)

    def forward(self, pooled: torch.Tensor | None, patches: torch.Tensor) -> torch.Tensor:
        return self.final(self.deconv(patches.permute(0, 3, 1, 2).float()))


def gaussian_targets(
    keypoints: torch.Tensor, shape: tuple[int, int], stride: tuple[float, float], sigma: float
) -> torch.Tensor:
    """(B, K, h, w) Gaussians (peak 1) at keypoints (B, K, 3) given in input pixels; the
    heatmap cell (i, j) covers input pixels [i sy, (i + 1) sy) x [j sx, (j + 1) sx)."""
    h, w = shape
    sx, sy = stride
    cx = keypoints[..., 0, None, None] / sx
    cy = keypoints[..., 1, None, None] / sy
    rows = torch.arange(h, dtype=torch.float32, device=keypoints.device).view(h, 1) + 0.5
    cols = torch.arange(w, dtype=torch.float32, device=keypoints.device).view(1, w) + 0.5
    return torch.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / (2 * sigma**2))


def decode_heatmaps(
    heatmaps: torch.Tensor, stride: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """heatmaps (B, K, h, w) -> (positions (B, K, 2) x, y in input pixels, scores (B, K)):
    the maximum's cell centre, moved a quarter cell towards its higher neighbour."""
    B, K, h, w = heatmaps.shape
    score, flat = heatmaps.flatten(2).max(-1)
    y, x = flat // w, flat % w
    padded = F.pad(heatmaps, (1, 1, 1, 1), mode="replicate").flatten(2)

    def at(dy, dx):
        return padded.gather(-1, ((y + 1 + dy) * (w + 2) + x + 1 + dx)[..., None])[..., 0]

    fx = x.float() + 0.5 + 0.25 * torch.sign(at(0, 1) - at(0, -1))
    fy = y.float() + 0.5 + 0.25 * torch.sign(at(1, 0) - at(-1, 0))
    return torch.stack([fx * stride[0], fy * stride[1]], dim=-1), score


def coco_keypoint_ap(ground_truth: dict, detections: list[dict], sigmas=COCO_SIGMAS) -> dict:
    """COCO keypoint AP/AR (pycocotools, OKS) of detections against a COCO-format dict."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ("AP", "AP50", "AP75", "AP_M", "AP_L", "AR", "AR50", "AR75", "AR_M", "AR_L")
    if not detections:
        return {n: float("nan") for n in names}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, "keypoints")
        evaluator.params.kpt_oks_sigmas = np.asarray(sigmas)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # pycocotools writes -1 for an area range without people: not a score, so NaN here
    stats = [float(v) if v >= 0 else float("nan") for v in evaluator.stats]
    return dict(zip(names, stats, strict=True))


class PoseRecipe(Recipe):
    name = "pose"
    task = "pose"
    metric = "AP"
    splits = {"coco": ("train", None), "synth": ("train", "test")}
    loss_terms = ("mse",)

    def dataset_options(self, format: str) -> dict:
        if format != "coco":
            return {}
        size = self.config["model"]["img_size"]
        return {"aspect": size[0] / size[1]} if size else {}

    def datasets(self):
        data = self.config["data"]
        if data["format"] != "coco":
            return super().datasets()
        options = self.dataset_options("coco")
        root = data["root"]
        if os.path.isfile(os.path.join(root, "annotations", "person_keypoints_val2017.json")):
            train = build_dataset("coco", root, "train", on_error="replace", **options)
            return train, build_dataset("coco", root, "val", on_error="drop", **options)
        log.info("no val2017 keypoints in %s: a fifth of the train photos is the test split", root)
        train = build_dataset("coco", root, "train", on_error="replace", **options)
        test = build_dataset("coco", root, "train", on_error="drop", **options)
        is_test = [zlib.crc32(p.encode()) % 5 == 0 for p in train.paths]
        for dataset, keep in ((train, False), (test, True)):
            chosen = [i for i, t in enumerate(is_test) if t == keep]
            dataset.records = [dataset.records[i] for i in chosen]
            dataset.paths = [dataset.paths[i] for i in chosen]
            dataset.pids = [-1] * len(chosen)
            dataset.cameras = [-1] * len(chosen)
            dataset.check_not_empty("COCO people on this side of the train/test division")
        return train, test

    def head_config(self, train_set) -> dict:
        names = train_set.keypoint_names
        if not names:
            raise ValueError(f"{train_set!r} has no keypoints")
        return {"names": list(names)}

    def build_head(self, backbone, head_config: dict) -> nn.Module:
        self.names = list(head_config["names"])
        self.flip_perm = flip_permutation(len(self.names))
        channels = int(self.config["head"]["channels"])
        return HeatmapHead(backbone.embed_dim, len(self.names), channels)

    def train_sample(self, sample: dict, size) -> dict:
        flip, scale, angle, shift = draw_view(self.config["augment"])
        source = tuple(sample["image"].shape[-2:])
        matrix = view_matrix(source, size, flip=flip, scale=scale, angle=angle, shift=shift)
        image = normalize(warp_image(sample["image"], matrix, size))
        keypoints = warp_keypoints(
            sample["keypoints"], matrix, size, self.flip_perm if flip else None
        )
        return {"image": image, "keypoints": keypoints, "index": sample["index"]}

    def losses(self, out: torch.Tensor, batch: dict, device) -> dict[str, torch.Tensor]:
        keypoints = batch["keypoints"].to(device)
        images = batch["image"]
        stride = (images.shape[-1] / out.shape[-1], images.shape[-2] / out.shape[-2])
        target = gaussian_targets(keypoints, tuple(out.shape[-2:]), stride, self.sigma)
        weight = (keypoints[..., 2] > 0).float()
        error = (out.float() - target).square().sum((-2, -1))
        return {"mse": (error * weight).sum() / weight.sum().clamp(min=1)}

    @property
    def sigma(self) -> float:
        return float(self.config["head"]["sigma"])

    def predict(self, model, images: torch.Tensor):
        weights = model.backbone.prompts.weights(self.task, images.shape[0], images.device)
        heatmaps = model(images, weights)[0].float()
        if self.config["eval"]["flip"] and self.flip_perm is not None:
            mirrored = model(images.flip(-1), weights)[0].float().flip(-1)
            heatmaps = 0.5 * (heatmaps + mirrored[:, self.flip_perm])
        stride = (images.shape[-1] / heatmaps.shape[-1], images.shape[-2] / heatmaps.shape[-2])
        return decode_heatmaps(heatmaps, stride)

    def evaluate(self, model, test, size, device) -> dict:
        if list(test.keypoint_names or []) != self.names:
            raise ValueError(f"the head predicts {self.names}; {test!r} has other keypoints")
        data = self.config["data"]
        predicted, scores, truth, indices, offsets = [], [], [], [], []
        for batch in eval_batches(
            test, size, data["eval_batch_size"], data["num_workers"], data["max_eval_images"]
        ):
            positions, score = self.predict(model, batch["image"].to(device))
            sizes = batch["size"].float()  # (B, 2) original H, W
            scale = torch.stack([sizes[:, 1] / size[1], sizes[:, 0] / size[0]], dim=1)
            predicted.append(positions.cpu() * scale[:, None, :])
            scores.append(score.cpu())
            truth.append(batch["keypoints"].float())
            indices += batch["index"].tolist()
            boxes = batch.get("box")
            offsets.append(boxes[:, :2].float() if isinstance(boxes, torch.Tensor) else
                           torch.zeros(len(sizes), 2))  # fmt: skip
        predicted, scores = torch.cat(predicted), torch.cat(scores)
        truth, offsets = torch.cat(truth), torch.cat(offsets)
        metrics = pck(predicted, truth, keypoint_box_size(truth), self.config["eval"]["pck_alpha"])
        metrics = {"PCK": metrics["PCK"], "num_keypoints": metrics["num_keypoints"]}
        if len(self.names) == len(COCO_SIGMAS):
            in_image = predicted + offsets[:, None]
            gt, dt = coco_records(test, indices, in_image, scores, truth, offsets)
            metrics = {**coco_keypoint_ap(gt, dt), **metrics}
        else:
            metrics = {"AP": float("nan"), **metrics}
        return {"metrics": metrics, "sets": {"test": len(indices)}}


def coco_records(dataset, indices, predicted, scores, truth, offsets) -> tuple[dict, list]:
    """(ground truth in COCO format, detections) of the evaluated people. COCO sets keep
    their own images, annotations and areas; other sets get one image per sample, its area
    the person's box (the synthetic record's figure box, else the box around its labelled
    keypoints) in image coordinates."""
    images, annotations, detections = {}, [], []
    records = getattr(dataset, "records", None)
    for row, index in enumerate(indices):
        if records is not None and isinstance(records[index], tuple):  # COCO: (image, annotation)
            image, annotation = records[index]
            image_id = image["id"]
            images[image_id] = {k: image[k] for k in ("id", "width", "height") if k in image}
            annotations.append({**annotation, "iscrowd": 0})
        else:
            image_id = index
            kp = truth[row].clone()
            kp[:, :2] += offsets[row]
            box = _person_box(records[index] if records is not None else None, kp)
            images[image_id] = {"id": image_id}
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "iscrowd": 0, "keypoints": kp.flatten().tolist(),
                "num_keypoints": int((kp[:, 2] > 0).sum()), "area": box[2] * box[3],
                "bbox": box,
            })  # fmt: skip
        keypoints = torch.cat([predicted[row], torch.ones(len(predicted[row]), 1)], dim=1)
        detections.append({
            "image_id": image_id, "category_id": 1, "keypoints": keypoints.flatten().tolist(),
            "score": float(scores[row].clamp(min=0).mean()),
        })  # fmt: skip
    ground_truth = {
        "images": list(images.values()),
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}],
    }
    return ground_truth, detections


def _person_box(record, keypoints: torch.Tensor) -> list[float]:
    if isinstance(record, dict) and record.get("box"):
        x0, y0, x1, y1 = (float(v) for v in record["box"])
    else:
        labelled = keypoints[keypoints[:, 2] > 0, :2]
        if len(labelled) == 0:
            return [0.0, 0.0, 1.0, 1.0]
        (x0, y0), (x1, y1) = labelled.amin(0).tolist(), labelled.amax(0).tolist()
    return [x0, y0, max(x1 - x0, 1.0), max(y1 - y0, 1.0)]
