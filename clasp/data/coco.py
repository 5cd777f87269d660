"""COCO person keypoints as person crops.

Layout: `annotations/person_keypoints_<split>2017.json` and `<split>2017/` images. Every
person annotation that is not a crowd and has at least `min_keypoints` labelled keypoints
is a sample: its box is enlarged by `margin` of its size on each side, widened or heightened
around its centre to the person aspect `aspect` (height / width), clipped to the image and
cropped. Keypoints are in the crop's pixels, visibility as in COCO (2 visible, 1 labelled but
hidden, 0 not labelled; an unlabelled keypoint or one outside the crop is (0, 0, 0)).
"""

from __future__ import annotations

import json
import os

import torch

from clasp.data.base import PersonDataset, require_dir, require_file
from clasp.data.images import read_rgb

COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip


def crop_box(box, width, height, margin, aspect) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 (integers, inside the image) around a COCO box (x, y, w, h)."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    w, h = w * (1 + 2 * margin), h * (1 + 2 * margin)
    if aspect:
        if h / max(w, 1e-6) < aspect:
            h = w * aspect
        else:
            w = h / aspect
    x0, y0 = max(0, int(round(cx - w / 2))), max(0, int(round(cy - h / 2)))
    x1, y1 = min(width, int(round(cx + w / 2))), min(height, int(round(cy + h / 2)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


class CocoKeypointDataset(PersonDataset):
    """COCO person keypoint crops; see the module docstring. Splits: train, val."""

    format = "coco"
    keypoint_names = list(COCO_KEYPOINTS)

    def __init__(
        self,
        root: str,
        split: str = "train",
        *,
        year: str = "2017",
        min_keypoints: int = 1,
        margin: float = 0.1,
        aspect: float | None = 2.0,
        **kwargs,
    ):
        super().__init__(root, split, **kwargs)
        split = split.removesuffix(year)
        annotations = require_file(
            os.path.join(root, "annotations", f"person_keypoints_{split}{year}.json"),
            "COCO keypoint annotations",
        )
        images_dir = require_dir(os.path.join(root, f"{split}{year}"), "COCO image folder")
        try:
            with open(annotations) as f:
                coco = json.load(f)
            images = {image["id"]: image for image in coco["images"]}
            person_ids = {c["id"] for c in coco["categories"] if c.get("name") == "person"}
            people = coco["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{annotations} is not a COCO keypoint file: {error}") from error
        self.margin, self.aspect = margin, aspect
        self.records = [
            (images[a["image_id"]], a)
            for a in people
            if a.get("category_id") in person_ids
            and not a.get("iscrowd", 0)
            and a.get("num_keypoints", 0) >= min_keypoints
            and a["image_id"] in images
        ]
        self.records.sort(key=lambda r: (r[0]["file_name"], r[1]["id"]))
        self.paths = [os.path.join(images_dir, image["file_name"]) for image, _ in self.records]
        self.pids = [-1] * len(self.records)
        self.cameras = [-1] * len(self.records)
        self.check_not_empty(f"COCO person annotations with >= {min_keypoints} keypoints")

    def load(self, index: int) -> dict:
        _, annotation = self.records[index]
        image = read_rgb(self.paths[index])
        x0, y0, x1, y1 = crop_box(
            annotation["bbox"], image.width, image.height, self.margin, self.aspect
        )
        sample = self.base_sample(index, image.crop((x0, y0, x1, y1)))
        keypoints = torch.tensor(annotation["keypoints"], dtype=torch.float32).view(-1, 3)
        keypoints[:, 0] -= x0
        keypoints[:, 1] -= y0
        inside = (keypoints[:, 0] >= 0) & (keypoints[:, 0] < x1 - x0)
        inside &= (keypoints[:, 1] >= 0) & (keypoints[:, 1] < y1 - y0)
        keypoints[~(inside & (keypoints[:, 2] > 0))] = 0.0
        sample["keypoints"] = keypoints
        sample["box"] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        return sample
