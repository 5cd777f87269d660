"""`clasp label`: run the CLIP teacher over an image folder and fill a label cache.

Images are listed recursively, hashed (sha256 of the bytes: the cache key, so renamed or
duplicated files are labelled once), and the ones not yet in the cache are decoded, labelled
in batches and written in shards. Unreadable files are skipped with their reason, logged and
recorded in the shard, so a resumed run neither retries them nor shifts shard boundaries: a
run killed at any point and started again ends with the same cache as one that never stopped.

The cache is keyed on the teacher's weights (`teacher_fingerprint`): a cache made with other
weights, even from the same folder, is refused unless `--overwrite` starts it over. Two runs
into one cache take turns: the second waits for the first, then labels what is left.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from clasp import RANDOM_WEIGHTS
from clasp.data.images import ImageReadError, list_images, open_error_reason, read_rgb
from clasp.vocabulary import Prompts, load_prompts

from . import DENSE_MODES
from .cache import LabelCache, LabelCacheWriter, file_sha256

if TYPE_CHECKING:  # open_clip takes seconds to import: only `main` and callers load it
    from .model import ClipTeacher

log = logging.getLogger("clasp.teacher")

DEFAULT_TEACHER = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
DEFAULT_THRESHOLD = 0.4
DEFAULT_SHARD_SIZE = 1024
OVERLAY_DIR = "visualize"  # under the cache folder


@dataclass
class LabelingReport:
    labelled: int = 0  # images labelled by this run
    already_cached: int = 0  # images found in the cache (or duplicates of them)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0  # teacher time: decoding, forward passes and labeling
    overlays: list[str] = field(default_factory=list)  # part-label PNGs written (visualize)

    @property
    def images_per_second(self) -> float:
        return self.labelled / self.seconds if self.seconds > 0 else 0.0


def teacher_fingerprint(teacher: ClipTeacher) -> str:
    """'sha256:<hex>' of the teacher's state dict (names, dtypes, shapes and bytes of every
    weight and buffer): the same for the same weights wherever they were loaded from, and
    different for a teacher refitted into the same folder. One pass over the weights
    (about a second for ViT-B/16)."""
    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return f"sha256:{digest.hexdigest()}"


def cache_meta(
    teacher: ClipTeacher, prompts: Prompts, temperature: float, threshold: float | None
) -> dict:
    return {
        "teacher": teacher.description,
        "teacher_weights": teacher_fingerprint(teacher),
        "dense": teacher.dense,
        "prompts": {
            "templates": prompts.templates,
            "parts": prompts.parts,
            "attributes": prompts.attributes,
        },
        "part_names": prompts.part_names,
        "attribute_names": prompts.attribute_names,
        "group_sizes": prompts.group_sizes,
        "image_size": list(teacher.image_size),
        "grid_size": list(teacher.grid_size),
        "geometry": "whole image resized to image_size; grid cells tile the whole image",
        "temperature": temperature,
        "threshold": threshold,
    }


class _Decode(torch.utils.data.Dataset):
    """(sha, path) -> (sha, path, resized uint8 tensor or None, reason)."""

    def __init__(self, items: list[tuple[str, str]], teacher: ClipTeacher):
        self.items = items
        self.resize = teacher.resize

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        sha, path = self.items[index]
        try:
            return sha, path, self.resize(read_rgb(path)), None
        except (ImageReadError, OSError) as error:
            return sha, path, None, getattr(error, "reason", None) or str(error)


def label_folder(
    images: str | list[str],
    out: str,
    teacher: ClipTeacher,
    prompts: Prompts,
    *,
    batch_size: int = 32,
    shard_size: int = DEFAULT_SHARD_SIZE,
    temperature: float | None = None,
    threshold: float | None = DEFAULT_THRESHOLD,
    workers: int = 0,
    backend: str = "auto",
    progress: bool = True,
    visualize: int = 0,
    overwrite: bool = False,
) -> LabelingReport:
    """Label every image under the folder `images` (or in the list of paths `images`) that
    is not yet in the cache at `out` (see the module doc). visualize: write part-label
    overlays of the first that many cached images to `out/visualize/`. overwrite: start
    the cache over (its labels and overlays are removed) instead of refusing one made with
    another teacher or other settings."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be at least 1")
    # Shards hold whole batches, so a resumed run batches images exactly as before.
    shard_size = -(-shard_size // batch_size) * batch_size
    temperature = teacher.default_temperature if temperature is None else temperature
    meta = cache_meta(teacher, prompts, temperature, threshold)
    paths = list_images(images) if isinstance(images, str) else images
    with LabelCacheWriter(out, meta, overwrite=overwrite) as writer:  # waits for another
        if overwrite:
            _remove_overlays(os.path.join(out, OVERLAY_DIR))
        text = teacher.text_embeddings(prompts)
        report = LabelingReport()

        pending, seen = [], set(writer.done)
        for path in tqdm(paths, desc="hashing", unit="img", disable=not progress):
            try:
                sha = file_sha256(path)
            except OSError as error:
                _skip(report, path, open_error_reason(path, error))
                continue
            if sha in writer.failed:  # unreadable in an earlier run: report, do not retry
                report.unreadable.append((path, writer.failed[sha][1]))
                continue
            if sha in seen:
                report.already_cached += 1
                continue
            seen.add(sha)
            pending.append((sha, path))

        loader = torch.utils.data.DataLoader(
            _Decode(pending, teacher),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=list,
            pin_memory=teacher.device.type == "cuda",
        )
        shard = _ShardBuffer(teacher.grid_size, len(prompts.attribute_names))
        bar = tqdm(total=len(pending), desc="labelling", unit="img", disable=not progress)
        start = time.perf_counter()
        for batch in loader:
            readable = [(sha, pixels) for sha, _, pixels, _ in batch if pixels is not None]
            for sha, path, pixels, reason in batch:
                if pixels is None:
                    _skip(report, path, reason)
                    shard.failed[sha] = [path, reason]
            if readable:
                labels = teacher.label(
                    torch.stack([p for _, p in readable]),
                    text,
                    temperature=temperature,
                    threshold=threshold,
                    backend=backend,
                )
                shard.add([sha for sha, _ in readable], {k: v.cpu() for k, v in labels.items()})
            shard.count += len(batch)
            bar.update(len(batch))
            if shard.count >= shard_size:
                report.labelled += shard.flush(writer)
        report.labelled += shard.flush(writer)
        bar.close()
        report.seconds = time.perf_counter() - start
    if visualize > 0:
        from .visualize import write_overlays

        folder = os.path.join(out, OVERLAY_DIR)
        report.overlays = write_overlays(LabelCache(out), paths, folder, visualize)
    return report


def _remove_overlays(folder: str) -> None:
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".png"):
                os.remove(os.path.join(folder, name))


class _ShardBuffer:
    """Labels of the images of one shard, collected batch by batch."""

    def __init__(self, grid_size: tuple[int, int], n_attributes: int):
        self.shapes = {
            "parts": (0, *grid_size),
            "part_confidence": (0, *grid_size),
            "attributes": (0, n_attributes),
        }
        self._clear()

    def _clear(self) -> None:
        self.keys: list[str] = []
        self.labels: list[dict[str, torch.Tensor]] = []
        self.failed: dict[str, list[str]] = {}
        self.count = 0

    def add(self, keys: list[str], labels: dict[str, torch.Tensor]) -> None:
        self.keys += keys
        self.labels.append(labels)

    def flush(self, writer: LabelCacheWriter) -> int:
        if self.count == 0:
            return 0
        stacked = {
            name: torch.cat([b[name] for b in self.labels]) if self.labels else torch.zeros(shape)
            for name, shape in self.shapes.items()
        }
        writer.write_shard(self.keys, **stacked, failed=self.failed)
        written = len(self.keys)
        self._clear()
        return written


def _skip(report: LabelingReport, path: str, reason: str) -> None:
    log.warning("skipping unreadable image %s: %s", path, reason)
    report.unreadable.append((path, reason))


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of person images (recursive)")
    parser.add_argument("--out", required=True, help="label cache folder (created or resumed)")
    parser.add_argument(
        "--teacher",
        default=DEFAULT_TEACHER,
        help="open_clip model name, or a folder with open_clip_config.json + weights "
        f"(default {DEFAULT_TEACHER})",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help=f"pretrained tag or checkpoint file for a model name (default {DEFAULT_PRETRAINED}"
        f"); '{RANDOM_WEIGHTS}' for random weights",
    )
    parser.add_argument("--prompts", default=None, help="prompts YAML (default: packaged)")
    parser.add_argument("--dense", choices=DENSE_MODES, default="maskclip")
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="patches whose part probability is below it get label -1 "
        f"(default {DEFAULT_THRESHOLD}; a negative value keeps every label)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="softmax temperature (default: 1/logit_scale)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard"
    )
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backend",
        choices=("auto", "triton", "reference"),
        default="auto",
        help="labeling kernel: fused Triton or eager reference",
    )
    parser.add_argument(
        "--visualize", type=int, default=0, metavar="N", help="write part overlays of N images"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start the cache at --out over: remove its labels (made with another teacher "
        "or other settings) and label every image again",
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    from .loading import load_teacher

    pretrained = args.pretrained
    if pretrained is None and not os.path.isdir(args.teacher):
        pretrained = DEFAULT_PRETRAINED
    # A missing folder or weights, a cache made with another teacher (CacheMismatchError) or
    # an output that cannot be written raises; `clasp.cli` says it in one line.
    paths = list_images(args.images)  # before the model: a wrong folder fails at once
    prompts = load_prompts(args.prompts)
    teacher = load_teacher(args.teacher, pretrained, device=args.device, dense=args.dense)
    report = label_folder(
        paths,
        args.out,
        teacher,
        prompts,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        temperature=args.temperature,
        threshold=None if args.threshold < 0 else args.threshold,
        workers=args.workers,
        backend=args.backend,
        progress=not args.no_progress,
        visualize=args.visualize,
        overwrite=args.overwrite,
    )
    cache = LabelCache(args.out)
    log.info(
        "labelled %d images in %.1f s (%.1f images/s), %d already cached, %d unreadable "
        "skipped; the cache at %s holds %d images",
        report.labelled,
        report.seconds,
        report.images_per_second,
        report.already_cached,
        len(report.unreadable),
        args.out,
        len(cache),
    )
    for path, reason in report.unreadable:
        log.info("unreadable: %s (%s)", path, reason)
    if args.visualize > 0:
        folder = os.path.join(args.out, OVERLAY_DIR)
        log.info("wrote %d part overlays to %s", len(report.overlays), folder)
    return 0
