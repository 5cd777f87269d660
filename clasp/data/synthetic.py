"""`clasp synth`: a synthetic pedestrian set with ground truth for every task, and its reader.

    clasp synth --out DIR --ids N --images-per-id M --cameras C --size HxW --seed S [--workers W]

Output format (version 1):

    DIR/meta.json          written last: format, version, seed, size [H, W], ids, images_per_id,
                           num_images, num_train_ids, part_names, attribute_names,
                           attribute_groups {group: [values]}, group_sizes, keypoint_names,
                           cameras [{camera, view, views, gain, figure_scale, tilt, blur,
                           noise}], occlusion
    DIR/labels.jsonl       one JSON record per image, sorted by (pid, n)
    DIR/images/<pid:05d>_c<camera:02d>_<n:03d>.png   RGB, stored uncompressed (fast to read)
    DIR/parts/<same name>.png                        8-bit part mask: the index into
                           part_names, 255 = ignore (a carried bag); occluders are background

A record holds: "image", "parts" (paths relative to DIR), "pid" (0..N-1), "camera"
(0..C-1), "n" (the image's number within its identity), "view" (front, back, side_right,
side_left), "attributes" {group: value}, "attribute_vector" (0/1 in attribute_names order,
one-hot per group), "keypoints" 17 x [x, y, visibility] in COCO order (pixels; visibility 2
seen, 1 hidden, 0 outside the image), "caption", "box" [x0, y0, x1, y1] of the figure's
labelled pixels and "occluder" [x0, y0, x1, y1] or null.

Images look like a person detector's crops (`clasp.data.render`): the figure's box spans
about 85-95% of the height and most of the width; behind it each image shows another part
of its camera's scene, with passers-by and objects (background in the masks). A camera
("cameras" in meta) has its own views ("views": how often each is seen, "view" the most
frequent), brightness and colour cast ("gain"), box height ("figure_scale"), keystone
("tilt"), blur (Gaussian sigma in pixels) and noise; an image jitters them. Masks and
keypoints are those of the drawn shapes before the blur. Sets written before "views",
"tilt" and "blur" existed read the same; their images had one background and view per
camera.

Attribute groups and part classes are the vocabulary's (`clasp.vocabulary`). Image n of
identity p is seen by camera (p + n) mod C, so with M >= C every identity appears in every
camera, and with M >= 2 in at least two. Each image's random generator is seeded from
(seed, pid, camera, n): the output does not depend on --workers.

Splits read by `SyntheticDataset`: "train" = identities below num_train_ids, "test" = the
others; "query" = the test images with n < min(C, M // 2) (one per camera at most),
"gallery" = the other test images; "all" = everything.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from clasp.data.base import LabelReadError, PersonDataset, require_file
from clasp.data.pedestrians import (
    KEYPOINT_NAMES,
    PART_NAMES,
    check_vocabulary,
    sample_identity,
    setup_camera,
)
from clasp.data.render import render
from clasp.vocabulary import load_prompts

FORMAT, VERSION = "clasp-synth", 1
PARTS_IGNORE = 255
PARTS_LOOKUP = np.arange(256, dtype=np.int64)  # stored mask value -> part label
PARTS_LOOKUP[PARTS_IGNORE] = -1

PERSON_NOUNS = {
    ("male", "child"): "boy",
    ("female", "child"): "girl",
    ("male", "adult"): "man",
    ("female", "adult"): "woman",
    ("male", "elderly"): "elderly man",
    ("female", "elderly"): "elderly woman",
}
SLEEVES = {"short_sleeve": "short-sleeved", "long_sleeve": "long-sleeved"}


def caption(attributes: dict[str, str]) -> str:
    """An English description of a drawn appearance, e.g. 'a photo of a woman with long hair
    wearing a red short-sleeved top and blue shorts, carrying a backpack.'"""
    a = attributes
    who = PERSON_NOUNS[(a["gender"], a["age"])]
    article = "an" if who[0] in "aeiou" else "a"
    hat = " and a hat" if a["hat"] == "hat" else ""
    lower = {
        "trousers": f"{a['lower_color']} trousers",
        "shorts": f"{a['lower_color']} shorts",
        "skirt": f"a {a['lower_color']} skirt",
    }[a["lower_type"]]
    bag = "" if a["bag"] == "none" else f", carrying a {a['bag']}"
    top = f"{a['upper_color']} {SLEEVES[a['upper_type']]} top"
    return (
        f"a photo of {article} {who} with {a['hair']} hair{hat} wearing a {top} and {lower}{bag}."
    )


def image_name(pid: int, camera: int, n: int) -> str:
    return f"{pid:05d}_c{camera:02d}_{n:03d}.png"


def camera_of(pid: int, n: int, cameras: int) -> int:
    return (pid + n) % cameras


class _Generator:
    """Renders and writes all images of one identity; one per worker process."""

    def __init__(self, out, size, seed, cameras, images_per_id, occlusion, prompts_path):
        prompts = load_prompts(prompts_path)
        self.groups = prompts.attributes
        self.values = check_vocabulary(self.groups)
        self.attribute_names = prompts.attribute_names
        self.out, self.size, self.seed = out, size, seed
        self.images_per_id, self.occlusion = images_per_id, occlusion
        self.cameras = [setup_camera(seed, c, size) for c in range(cameras)]

    def __call__(self, pid: int) -> list[dict]:
        identity = sample_identity(self.seed, pid, self.values)
        recorded = {g: identity.attributes[g] for g in self.groups}
        vector = [int(recorded[g] == v) for g, values in self.groups.items() for v in values]
        text = caption(identity.attributes)
        records = []
        for n in range(self.images_per_id):
            cam = camera_of(pid, n, len(self.cameras))
            rng = np.random.default_rng([self.seed, pid, cam, n])
            drawn = render(identity, self.cameras[cam], rng, self.size, occlusion=self.occlusion)
            name = image_name(pid, cam, n)
            # Images are stored uncompressed: decoding is then about 3x cheaper, which a
            # CPU-bound multi-crop loader feels; masks compress well and stay at level 1.
            image_path = os.path.join(self.out, "images", name)
            Image.fromarray(drawn.image).save(image_path, compress_level=0)
            parts = np.where(drawn.parts < 0, PARTS_IGNORE, drawn.parts).astype(np.uint8)
            Image.fromarray(parts).save(os.path.join(self.out, "parts", name), compress_level=1)
            records.append(
                {
                    "image": f"images/{name}",
                    "parts": f"parts/{name}",
                    "pid": pid,
                    "camera": cam,
                    "n": n,
                    "view": drawn.view,
                    "attributes": recorded,
                    "attribute_vector": vector,
                    "keypoints": np.round(drawn.keypoints.astype(np.float64), 2).tolist(),
                    "caption": text,
                    "box": list(drawn.box),
                    "occluder": list(drawn.occluder) if drawn.occluder else None,
                }
            )
        return records


_worker: _Generator | None = None


def _init_worker(*args) -> None:
    global _worker
    _worker = _Generator(*args)


def _render_identity(pid: int) -> list[dict]:
    return _worker(pid)


def generate(
    out: str,
    ids: int,
    images_per_id: int,
    cameras: int,
    size: tuple[int, int] = (128, 64),
    seed: int = 0,
    *,
    workers: int = 1,
    occlusion: float = 0.3,
    train_fraction: float = 0.5,
    prompts_path: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic set to `out` (format in the module docstring); returns its meta."""
    if ids < 1 or images_per_id < 1 or cameras < 1:
        raise ValueError("--ids, --images-per-id and --cameras must all be at least 1")
    if cameras >= 2 and images_per_id < 2:
        raise ValueError(
            f"with {cameras} cameras every identity must be seen by two of them: "
            "use --images-per-id 2 or more"
        )
    if min(size) < 32:
        raise ValueError(f"--size must be at least 32x32 pixels, got {size[0]}x{size[1]}")
    if not 0.0 <= occlusion <= 1.0 or not 0.0 < train_fraction <= 1.0:
        raise ValueError("occlusion must be in [0, 1] and train_fraction in (0, 1]")
    prompts = load_prompts(prompts_path)
    if tuple(prompts.part_names) != PART_NAMES:
        raise ValueError(
            f"the synthetic renderer labels the parts {list(PART_NAMES)} in that order; the "
            f"prompts file has {prompts.part_names}"
        )
    if os.path.exists(os.path.join(out, "meta.json")) and not overwrite:
        raise FileExistsError(f"{out} already holds a synthetic set; pass --force to overwrite")
    for sub in ("images", "parts"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    stale = os.path.join(out, "meta.json")
    if os.path.exists(stale):
        os.remove(stale)  # a half-written set must not look complete

    args = (out, size, seed, cameras, images_per_id, occlusion, prompts_path)
    if workers <= 1:
        generator = _Generator(*args)
        per_id = [generator(pid) for pid in range(ids)]
        camera_setups = generator.cameras
    else:
        with multiprocessing.get_context().Pool(workers, _init_worker, args) as pool:
            per_id = list(
                pool.imap(_render_identity, range(ids), chunksize=max(1, ids // (8 * workers)))
            )
        camera_setups = [setup_camera(seed, c, size) for c in range(cameras)]
    with open(os.path.join(out, "labels.jsonl"), "w") as f:
        for records in per_id:
            for record in records:
                f.write(json.dumps(record) + "\n")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "seed": seed,
        "size": list(size),
        "ids": ids,
        "images_per_id": images_per_id,
        "num_images": ids * images_per_id,
        "num_train_ids": min(ids, max(1, math.ceil(ids * train_fraction))),
        "part_names": list(PART_NAMES),
        "attribute_names": prompts.attribute_names,
        "attribute_groups": {g: list(v) for g, v in prompts.attributes.items()},
        "group_sizes": prompts.group_sizes,
        "keypoint_names": list(KEYPOINT_NAMES),
        "cameras": [c.describe() for c in camera_setups],
        "occlusion": occlusion,
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like HxW (e.g. 128x64), got {text!r}"
        ) from None
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--ids", type=int, default=100, help="number of identities")
    parser.add_argument("--images-per-id", type=int, default=8, help="images of each identity")
    parser.add_argument("--cameras", type=int, default=4, help="number of cameras")
    parser.add_argument("--size", type=parse_size, default=(128, 64), help="image size HxW")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes rendering in parallel")
    parser.add_argument(
        "--occlusion", type=float, default=0.3, help="chance of an occluder per image"
    )
    parser.add_argument(
        "--train-fraction", type=float, default=0.5, help="identities in the train split"
    )
    parser.add_argument("--prompts", default=None, help="prompts YAML (default: the packaged one)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing set in --out")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        meta = generate(
            args.out,
            args.ids,
            args.images_per_id,
            args.cameras,
            args.size,
            args.seed,
            workers=args.workers,
            occlusion=args.occlusion,
            train_fraction=args.train_fraction,
            prompts_path=args.prompts,
            overwrite=args.force,
        )
    except (ValueError, FileExistsError) as error:
        print(f"clasp synth: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    n = meta["num_images"]
    print(
        f"wrote {n} images of {meta['ids']} identities from {args.cameras} cameras to {args.out} "
        f"in {seconds:.1f} s ({60 * n / seconds:.0f} images/minute with {args.workers} worker(s))"
    )
    return 0


class SyntheticDataset(PersonDataset):
    """A set written by `clasp synth`; samples carry every label (see the module docstring)."""

    format = "synth"
    SPLITS = ("all", "train", "test", "query", "gallery")

    def __init__(self, root: str, split: str = "all", **kwargs):
        super().__init__(root, split, **kwargs)
        if split not in self.SPLITS:
            raise ValueError(f"synthetic split must be one of {self.SPLITS}, got {split!r}")
        meta_path = require_file(
            os.path.join(root, "meta.json"),
            "synthetic set (meta.json; make one with `clasp synth --out DIR`)",
        )
        with open(meta_path) as f:
            self.meta = meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a {FORMAT} meta file")
        self.attribute_names = meta["attribute_names"]
        self.part_names = meta["part_names"]
        self.keypoint_names = meta["keypoint_names"]
        n_train, cams, per_id = meta["num_train_ids"], len(meta["cameras"]), meta["images_per_id"]
        query_below = max(1, min(cams, per_id // 2))
        keep = {
            "all": lambda r: True,
            "train": lambda r: r["pid"] < n_train,
            "test": lambda r: r["pid"] >= n_train,
            "query": lambda r: r["pid"] >= n_train and r["n"] < query_below,
            "gallery": lambda r: r["pid"] >= n_train and r["n"] >= query_below,
        }[split]
        self.records = []
        with open(require_file(os.path.join(root, "labels.jsonl"), "synthetic labels")) as f:
            for line in f:
                record = json.loads(line)
                if keep(record):
                    self.records.append(record)
        # Labels as arrays once, so that loading a sample only slices them.
        self.attribute_matrix = np.array(
            [r["attribute_vector"] for r in self.records], dtype=np.float32
        ).reshape(len(self.records), len(self.attribute_names))
        self.keypoint_array = np.array(
            [r["keypoints"] for r in self.records], dtype=np.float32
        ).reshape(len(self.records), len(self.keypoint_names), 3)
        self.paths = [os.path.join(root, r["image"]) for r in self.records]
        self.captions = [[r["caption"]] for r in self.records]
        self.pids = [r["pid"] for r in self.records]
        self.cameras = [r["camera"] for r in self.records]
        self.check_not_empty("synthetic images")

    def load(self, index: int) -> dict:
        record = self.records[index]
        sample = self.base_sample(index)
        parts_path = os.path.join(self.root, record["parts"])
        try:
            with open(parts_path, "rb") as f, Image.open(io.BytesIO(f.read())) as mask:
                parts = np.asarray(mask, dtype=np.uint8)
        except OSError as error:
            raise LabelReadError(parts_path, f"{type(error).__name__}: {error}") from error
        if parts.shape != tuple(sample["image"].shape[1:]):
            raise LabelReadError(parts_path, f"mask {parts.shape} does not match the image")
        sample["parts"] = torch.from_numpy(PARTS_LOOKUP[parts])
        sample["attributes"] = torch.from_numpy(self.attribute_matrix[index].copy())
        sample["keypoints"] = torch.from_numpy(self.keypoint_array[index].copy())
        sample["caption"] = record["caption"]
        return sample
