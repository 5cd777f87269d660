"""Text-based person search: rank the gallery images for each caption (CUHK-PEDES' protocol).

Queries are the captions of the test images: every caption of every image (cuhk-pedes), or
each identity's caption once (synth, whose captions describe an identity, so all its images
share one); the gallery is every test image, and a gallery image matches a query when it
shows the query's identity. Rank-k and mAP are those of re-ID (`reid_metrics`, no camera
filtering): CMC rank-1/5/10 of the first match, AP over all matches.

Both sides meet in the text space of a CLIP teacher: captions through its text tower, images
through the backbone's pooled features and then
- "head": the backbone's own image-text head, for a student pre-trained with
  `loss.image_text` (kept in its checkpoint or export);
- "probe": otherwise a linear map fitted on the train split (`TextProbe`: least squares from
  each train image's features to the embedding of each of its captions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clasp.data.build import build_dataset

from .features import FeatureBank, task_key
from .metrics import reid_metrics
from .probes import TextProbe
from .protocols import SetLoader

SEARCH_FORMATS = ("synth", "cuhk-pedes")
SPLITS = {"synth": ("train", "test"), "cuhk-pedes": ("train", "test")}
PRIMARY_METRIC = "rank1"


def captions_of(format: str, root: str, split: str, paths: list[str]) -> list[list[str]]:
    """The captions of each prepared image (by path)."""
    dataset = build_dataset(format, root, split)
    if dataset.captions is None:
        raise ValueError(f"the {format} set at {root} has no captions")
    by_path = dict(zip(dataset.paths, dataset.captions, strict=True))
    return [by_path[p] for p in paths]


def caption_queries(
    captions: list[list[str]], pids: torch.Tensor, once_per_identity: bool
) -> tuple[list[str], torch.Tensor]:
    """(query texts, their identities (Q,)): every caption of every image, or each distinct
    (identity, caption) once."""
    texts, owners, seen = [], [], set()
    for image_captions, pid in zip(captions, pids.tolist(), strict=True):
        for text in image_captions:
            if once_per_identity and (pid, text) in seen:
                continue
            seen.add((pid, text))
            texts.append(text)
            owners.append(pid)
    return texts, torch.tensor(owners, dtype=torch.long)


def embed_texts(encode_text, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """(N, E) L2-normalised embeddings of texts through `encode_text` (list -> (n, E))."""
    parts = [
        encode_text(texts[i : i + batch_size]).float().cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return F.normalize(torch.cat(parts), dim=-1)


def evaluate_text_search(
    bank: FeatureBank,
    loader: SetLoader,
    format: str,
    root: str,
    encode_text,
    *,
    head: torch.nn.Module | None = None,
    task=None,
    l2: float = 1e-3,
) -> dict:
    """Text-to-image retrieval on the set at root (see the module doc); encode_text maps a
    list of captions to (n, E) text embeddings; head maps pooled features (N, D) to the text
    space (its first output), or None to fit a `TextProbe` on the train split."""
    if format not in SPLITS:
        raise ValueError(f"text search reads formats {', '.join(SEARCH_FORMATS)}, not {format!r}")
    train_split, test_split = SPLITS[format]
    test = loader.prepared(format, root, test_split)
    gallery = bank(test, task, patches=False).pooled
    sets = {"gallery": len(test)}
    if head is not None:
        with torch.no_grad():
            projected = head.float()(gallery)[0]
        projection = "head"
    else:
        train = loader.prepared(format, root, train_split)
        train_captions = captions_of(format, root, train_split, train.paths)
        rows = [i for i, texts in enumerate(train_captions) for _ in texts]
        targets = embed_texts(encode_text, [t for texts in train_captions for t in texts])
        features = bank(train, task, patches=False).pooled
        probe = TextProbe(l2=l2).fit(features[rows], targets)
        projected = probe.predict(gallery)
        projection = "probe"
        sets["train"] = len(train)
    texts, query_pids = caption_queries(
        captions_of(format, root, test_split, test.paths), test.pids, format == "synth"
    )
    queries = embed_texts(encode_text, texts)
    unknown = torch.full_like(query_pids, -1)
    metrics = reid_metrics(
        queries, query_pids, unknown, projected, test.pids, torch.full_like(test.pids, -1)
    )
    sets["queries"] = len(texts)
    return {
        "protocol": "text-search",
        "format": format,
        "data": root,
        "task": task_key(task),
        "metric": PRIMARY_METRIC,
        "value": metrics[PRIMARY_METRIC],
        "metrics": metrics,
        "projection": projection,
        "sets": sets,
    }
