"""The texts of image-text alignment (`loss.image_text`): one caption per training image,
embedded once at start-up by a CLIP teacher's text tower.

Where an image's caption comes from (`data.captions`):
- "dataset": the set's own captions (`dataset.captions`: a synthetic set's, CUHK-PEDES's first
  caption of each image);
- "labels": built from the teacher's attribute pseudo-labels in the label cache: the most
  likely value of each attribute group, worded by `clasp.vocabulary.attribute_caption` (the
  builder the teacher fit uses for PETA's labels);
- "auto": the set's own captions where it has them, else the pseudo-label captions.
An image with no caption (not in the label cache) gets id -1 and takes no part in the loss.

The text tower is `data.text_teacher` / `data.text_pretrained` (an open_clip name with a tag or
a file, or a teacher folder), else `prompt_init.teacher` / `prompt_init.pretrained`. Equal
captions share one row of the table, so images of one caption are positives of each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from clasp.vocabulary import attribute_caption

log = logging.getLogger("clasp.train")

CAPTION_SOURCES = ("auto", "dataset", "labels")
ENCODE_BATCH = 256


@dataclass
class CaptionTable:
    texts: list[str]  # the U distinct captions
    embeddings: torch.Tensor  # (U, E) fp32, L2-normalised, by the text tower
    ids: torch.Tensor  # (N,) int64: each dataset image's row, -1 = no caption
    teacher: str  # the text tower's description


def text_teacher_source(config: dict) -> tuple[str | None, str | None]:
    """(name or folder, pretrained) of the text tower a training config names."""
    data, init = config["data"], config["prompt_init"]
    if data["text_teacher"]:
        return data["text_teacher"], data["text_pretrained"]
    return init["teacher"], init["pretrained"]


def pseudo_label_caption(attributes: torch.Tensor, names: list[str], group_sizes: list[int]) -> str:
    """(A,) soft attribute labels, a distribution per group -> the caption of each group's
    most likely value (names 'group=value' in the cache's order)."""
    chosen, start = [], 0
    for size in group_sizes:
        chosen.append(names[start + int(attributes[start : start + size].argmax())])
        start += size
    return attribute_caption(chosen)


def image_captions(dataset, source: str, cache=None, keys: list[str] | None = None) -> list:
    """One caption (or None) per image of `dataset`, from `source` (see the module doc)."""
    if source not in CAPTION_SOURCES:
        raise ValueError(f"data.captions must be one of {CAPTION_SOURCES}, got {source!r}")
    own = getattr(dataset, "captions", None)
    if source == "dataset" or (source == "auto" and own is not None):
        if own is None:
            raise ValueError(
                f"data.captions=dataset: the {dataset.format} set at {dataset.root} has no "
                "captions; use data.captions=labels (captions from the attribute pseudo-labels)"
            )
        return [texts[0] if texts else None for texts in own]
    if cache is None:
        raise ValueError(
            f"loss.image_text: the {dataset.format} set at {dataset.root} has no captions of its "
            "own, and without a label cache (data.labels) none can be built from attribute "
            "pseudo-labels"
        )
    names, sizes = cache.attribute_names, cache.group_sizes
    labels = [cache.get(key) for key in keys]
    return [
        None if found is None else pseudo_label_caption(found["attributes"], names, sizes)
        for found in labels
    ]


@torch.no_grad()
def caption_table(config: dict, dataset, cache=None, keys: list[str] | None = None) -> CaptionTable:
    """Captions of every image of `dataset` embedded by the configured text tower."""
    from clasp.teacher.loading import load_teacher

    name, pretrained = text_teacher_source(config)
    if not name:
        raise ValueError(
            "loss.image_text needs a CLIP text tower: set data.text_teacher=NAME|DIR (with "
            "data.text_pretrained=TAG|FILE for a model name), e.g. the folder of `clasp teacher "
            "fit`"
        )
    captions = image_captions(dataset, config["data"]["captions"], cache, keys)
    texts = list(dict.fromkeys(c for c in captions if c is not None))
    if not texts:
        raise ValueError(f"loss.image_text: none of the {len(captions)} images has a caption")
    row = {text: i for i, text in enumerate(texts)}
    ids = torch.tensor([row[c] if c is not None else -1 for c in captions], dtype=torch.long)
    teacher = load_teacher(name, pretrained)
    starts = range(0, len(texts), ENCODE_BATCH)
    embeddings = torch.cat([teacher.encode_text(texts[i : i + ENCODE_BATCH]).cpu() for i in starts])
    log.info(
        "image-text alignment: %d of %d images captioned (%d distinct captions), embedded by "
        "%s (%d-d)", int((ids >= 0).sum()), len(ids), len(texts), teacher.description,
        embeddings.shape[1],
    )  # fmt: skip
    return CaptionTable(texts, embeddings, ids, teacher.description)
