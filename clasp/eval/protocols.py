"""The four frozen-feature protocols and the data splits each uses per format.

protocol    formats           first role (train / query)     second role (test / gallery)
reid        market, idfolder  the set's query split          the set's gallery split
reid        synth             the test split's images that   the other test images
                              the set's "query" split holds  (its "gallery" split)
reid        folder            all images: the first image    the other images
                              of each (identity, camera)     (needs identities)
attributes  peta, synth       train split                    test split (other identities)
attributes  market            train split                    gallery split (test identities)
parsing     ccp, synth        train split                    test split
pose        synth             train split                    test split
pose        coco              train2017 photos whose         the other photos (a photo's
                              crc32(path) % 5 != 0           people stay on one side)

Metrics: `clasp.eval.metrics`. Probes: `clasp.eval.probes`. Parsing is scored at each test
image's original resolution; pose in original crop pixels, PCK normalised by the longer side
of the box around the person's labelled keypoints (visibility > 0), alpha 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clasp.data.build import build_dataset

from .features import (
    FeatureBank,
    Features,
    PreparedSet,
    prepare,
    query_gallery_split,
    split_by_group,
    task_key,
)
from .metrics import (
    attribute_metrics,
    confusion_matrix,
    keypoint_box_size,
    pck,
    reid_metrics,
    segmentation_metrics,
)
from .probes import AttributeProbe, HeatmapProbe, PartProbe

PROTOCOLS = ("reid", "attributes", "parsing", "pose")
PARSING_CHUNK = 32  # test images upsampled at once
PRIMARY_METRIC = {"reid": "mAP", "attributes": "mA", "parsing": "mIoU", "pose": "PCK"}
FORMATS = {
    "reid": ("market", "idfolder", "synth", "folder"),
    "attributes": ("peta", "market", "synth"),
    "parsing": ("ccp", "synth"),
    "pose": ("coco", "synth"),
}
# format -> (split read for the first role, split for the second or None = divide the first)
SPLITS = {
    "reid": {"market": ("query", "gallery"), "idfolder": ("query", "gallery"),
             "synth": ("test", None), "folder": ("all", None)},
    "attributes": {"peta": ("train", "test"), "market": ("train", "gallery"),
                   "synth": ("train", "test")},
    "parsing": {"ccp": ("train", "test"), "synth": ("train", "test")},
    "pose": {"coco": ("train", None), "synth": ("train", "test")},
}  # fmt: skip


class NoValidQueriesError(ValueError):
    """Re-ID with no query that has a match of its identity from another camera in the
    gallery: every metric would be NaN."""


@dataclass
class View:
    """Some images of a prepared set (all when index is None)."""

    data: PreparedSet
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.data) if self.index is None else len(self.index)

    def take(self, values):
        if values is None or self.index is None:
            return values
        if isinstance(values, list):
            return [values[i] for i in self.index.tolist()]
        return values[self.index]

    def features(self, bank: FeatureBank, task, patches: bool = False) -> Features:
        full = bank(self.data, task, patches=patches)
        return Features(self.take(full.pooled), self.take(full.patches) if patches else None)


class SetLoader:
    """Builds the views of a protocol, decoding each (format, root, split) once per run."""

    def __init__(self, size: tuple[int, int], *, max_images: int | None = None, workers: int = 0):
        self.size, self.max_images, self.workers = tuple(size), max_images, workers
        self._sets: dict[tuple[str, str, str], PreparedSet] = {}

    def prepared(self, format: str, root: str, split: str) -> PreparedSet:
        key = (format, root, split)
        if key not in self._sets:
            dataset = build_dataset(format, root, split)
            self._sets[key] = prepare(
                dataset,
                self.size,
                name=f"{format}:{split}",
                max_images=self.max_images,
                workers=self.workers,
            )
        return self._sets[key]

    def views(self, protocol: str, format: str, root: str) -> tuple[View, View]:
        """(query, gallery) for reid, (train, test) for the probes."""
        if protocol not in SPLITS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
        if format not in SPLITS[protocol]:
            raise ValueError(
                f"{protocol} evaluation reads formats {', '.join(FORMATS[protocol])}, not "
                f"{format!r}"
            )
        first, second = SPLITS[protocol][format]
        data = self.prepared(format, root, first)
        if second is not None:
            return View(data), View(self.prepared(format, root, second))
        if protocol == "reid" and format == "synth":
            query = set(build_dataset("synth", root, "query").paths)
            a = [i for i, path in enumerate(data.paths) if path in query]
            b = [i for i, path in enumerate(data.paths) if path not in query]
        elif protocol == "reid":
            if not (data.pids >= 0).any():
                raise ValueError(
                    f"{data.name} at {root} has no identities; re-ID needs them: use "
                    "--format idfolder for <pid>/<cam>_<view> folders or market for "
                    "Market-1501 names"
                )
            a, b = query_gallery_split(data.pids, data.cameras)
        else:
            a, b = split_by_group(data.paths)
        return View(data, torch.tensor(a, dtype=torch.long)), View(
            data, torch.tensor(b, dtype=torch.long)
        )


def evaluate_reid(bank: FeatureBank, query: View, gallery: View, task=None) -> dict:
    q = query.features(bank, task).pooled
    g = gallery.features(bank, task).pooled
    metrics = reid_metrics(
        q,
        query.take(query.data.pids),
        query.take(query.data.cameras),
        g,
        gallery.take(gallery.data.pids),
        gallery.take(gallery.data.cameras),
    )
    return {"metrics": metrics, "sets": {"query": len(query), "gallery": len(gallery)}}


def evaluate_attributes(
    bank: FeatureBank, train: View, test: View, task=None, *, l2: float = 1e-3
) -> dict:
    if train.data.attributes is None or test.data.attributes is None:
        raise ValueError(f"{train.data.name} has no attribute labels")
    probe = AttributeProbe(l2=l2).fit(
        train.features(bank, task).pooled, train.take(train.data.attributes)
    )
    predicted = probe.predict(test.features(bank, task).pooled)
    metrics = attribute_metrics(
        predicted, test.take(test.data.attributes), test.data.attribute_names
    )
    return {"metrics": metrics, "sets": {"train": len(train), "test": len(test)}}


def evaluate_parsing(
    bank: FeatureBank, train: View, test: View, task=None, *, l2: float = 1e-3
) -> dict:
    if train.data.parts is None or test.data.parts is None:
        raise ValueError(f"{train.data.name} has no part masks")
    names = train.data.part_names
    probe = PartProbe(len(names), l2=l2).fit(
        train.features(bank, task, patches=True).patches, train.take(train.data.parts)
    )
    patches = test.features(bank, task, patches=True).patches
    masks = test.take(test.data.parts)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, mask in enumerate(masks):
        by_size.setdefault(tuple(mask.shape), []).append(i)
    confusion = torch.zeros(len(names), len(names) + 1, dtype=torch.long)
    for size, members in by_size.items():
        for start in range(0, len(members), PARSING_CHUNK):
            chunk = members[start : start + PARSING_CHUNK]
            predicted = probe.predict(patches[chunk], size)
            truth = torch.stack([masks[i] for i in chunk])
            confusion += confusion_matrix(predicted, truth, len(names))
    metrics = segmentation_metrics(confusion, names)
    return {"metrics": metrics, "sets": {"train": len(train), "test": len(test)}}


def evaluate_pose(
    bank: FeatureBank,
    train: View,
    test: View,
    task=None,
    *,
    l2: float = 1e-3,
    alpha: float = 0.2,
) -> dict:
    if train.data.keypoints is None or test.data.keypoints is None:
        raise ValueError(f"{train.data.name} has no keypoints")
    height, width = bank.size

    def to_input(keypoints, sizes):  # original pixels -> encoder input pixels
        scale = torch.stack([width / sizes[:, 1], height / sizes[:, 0]], dim=1).float()
        out = keypoints.clone()
        out[..., :2] *= scale[:, None, :]
        return out

    train_kps = to_input(train.take(train.data.keypoints), train.take(train.data.sizes))
    probe = HeatmapProbe(l2=l2).fit(
        train.features(bank, task, patches=True).patches, train_kps, (height, width)
    )
    predicted = probe.predict(test.features(bank, task, patches=True).patches, (height, width))
    sizes = test.take(test.data.sizes).float()
    predicted *= torch.stack([sizes[:, 1] / width, sizes[:, 0] / height], dim=1)[:, None, :]
    truth = test.take(test.data.keypoints)
    metrics = pck(predicted, truth, keypoint_box_size(truth), alpha=alpha)
    return {"metrics": metrics, "sets": {"train": len(train), "test": len(test)}}


EVALUATORS = {
    "reid": evaluate_reid,
    "attributes": evaluate_attributes,
    "parsing": evaluate_parsing,
    "pose": evaluate_pose,
}


def run_protocol(
    protocol: str,
    bank: FeatureBank,
    loader: SetLoader,
    format: str,
    root: str,
    task=None,
    *,
    l2: float = 1e-3,
    alpha: float = 0.2,
) -> dict:
    """Evaluate one protocol on the set at root; returns a JSON-ready result. l2: the
    probes' L2 strength; alpha: the PCK threshold."""
    first, second = loader.views(protocol, format, root)
    options = {} if protocol == "reid" else {"l2": l2}
    if protocol == "pose":
        options["alpha"] = alpha
    result = EVALUATORS[protocol](bank, first, second, task, **options)
    if protocol == "reid" and result["metrics"]["num_valid_queries"] == 0:
        subset = (
            f"; --max-images {loader.max_images} keeps too few images of each identity: "
            "raise it or leave it out"
            if loader.max_images is not None
            else "; re-ID needs identities seen by at least two cameras"
        )
        raise NoValidQueriesError(
            f"re-ID on {format} at {root}: none of the {len(first)} queries has an image of "
            f"its identity from another camera among the {len(second)} gallery images, so "
            f"mAP is undefined{subset}"
        )
    metric = PRIMARY_METRIC[protocol]
    return {
        "protocol": protocol,
        "format": format,
        "data": root,
        "task": task_key(task),
        "metric": metric,
        "value": result["metrics"][metric],
        **result,
    }


def task_prompt_matrix(
    bank: FeatureBank,
    loader: SetLoader,
    root: str,
    prompts: list | None = None,
    *,
    l2: float = 1e-3,
    alpha: float = 0.2,
    known: dict | None = None,
) -> dict:
    """Every protocol on a synthetic set under every prompt: {"prompts": [...],
    "protocols": [...], "metrics": [...], "values": [[protocol x prompt]]}. `known`:
    {(protocol, task_key(prompt)): value} of cells already run with this bank, set and
    settings, taken instead of running them again."""
    prompts = list(prompts if prompts is not None else (bank.tasks or [None]))
    known = known or {}

    def value(protocol: str, prompt) -> float:
        if (protocol, task_key(prompt)) in known:
            return known[protocol, task_key(prompt)]
        return run_protocol(protocol, bank, loader, "synth", root, prompt, l2=l2, alpha=alpha)[
            "value"
        ]

    values = [[value(protocol, p) for p in prompts] for protocol in PROTOCOLS]
    return {
        "prompts": [task_key(p) for p in prompts],
        "protocols": list(PROTOCOLS),
        "metrics": [PRIMARY_METRIC[p] for p in PROTOCOLS],
        "values": values,
    }


def prompt_mix_curve(
    bank: FeatureBank,
    loader: SetLoader,
    root: str,
    start: str,
    end: str,
    steps: int = 5,
    protocols: list[str] | None = None,
    *,
    l2: float = 1e-3,
    alpha: float = 0.2,
    matrix: dict | None = None,
) -> dict:
    """Every protocol on a synthetic set as the prompt mixes from `start` to `end` (weight of
    `end` from 0 to 1 in `steps` points), like SOLIDER's semantic-weight sweep:
    {"start", "end", "weights": [...], "protocols": [...], "metrics": [...],
    "values": [[protocol x weight]]}. `matrix`: a `task_prompt_matrix` of the same bank, set
    and settings, whose cells are taken for the two end points instead of running them."""
    if steps < 2:
        raise ValueError(f"a prompt mix needs at least 2 points, got {steps}")
    missing = [t for t in (start, end) if t not in bank.tasks]
    if missing:
        raise ValueError(f"the model has no task {missing}; it knows {list(bank.tasks)}")
    protocols = list(protocols or PROTOCOLS)
    weights = [i / (steps - 1) for i in range(steps)]

    def mix(w: float):
        return start if w == 0 else end if w == 1 else {start: 1.0 - w, end: w}

    def known(protocol: str, w: float) -> float | None:
        prompt = start if w == 0 else end if w == 1 else None
        if matrix is None or prompt is None or protocol not in matrix["protocols"]:
            return None
        return matrix["values"][matrix["protocols"].index(protocol)][
            matrix["prompts"].index(prompt)
        ]

    def value(protocol: str, w: float) -> float:
        cell = known(protocol, w)
        if cell is not None:
            return cell
        return run_protocol(protocol, bank, loader, "synth", root, mix(w), l2=l2, alpha=alpha)[
            "value"
        ]

    values = [[value(protocol, w) for w in weights] for protocol in protocols]
    return {
        "start": start,
        "end": end,
        "weights": weights,
        "protocols": protocols,
        "metrics": [PRIMARY_METRIC[p] for p in protocols],
        "values": values,
    }
