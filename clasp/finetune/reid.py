"""Re-identification fine-tuning, the TransReID / SOLIDER-REID recipe.

- Head: BNNeck on the class token (a BatchNorm1d whose bias is frozen, then a bias-free
  classifier over the training identities).
- Loss: identity cross-entropy with label smoothing on the classifier's logits, plus the
  batch-hard triplet loss on the features before the BNNeck (the hardest positive and the
  hardest negative of each anchor in the batch, Euclidean distance, margin or soft margin).
- Batches: P identities x K images (`IdentitySampler`); data.batch_size is P x K.
- Views: resize, horizontal flip, pad-and-crop (a shift of up to augment.pad pixels) and
  random erasing.
- Test: features of query and gallery (eval.neck_feat "before" or "after" the BNNeck, flip
  averaged with eval.flip), cosine distance, mAP and CMC with same-camera gallery matches
  removed (`clasp.eval.metrics.reid_metrics`); eval.rerank adds k-reciprocal re-ranking.

Formats: market (bounding_box_train; query / bounding_box_test), idfolder (train; query and
gallery from val), msmt17 (list_train + list_val; list_query / list_gallery), synth (train
identities; the test identities' query / gallery).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clasp.data.build import build_dataset
from clasp.eval.metrics import reid_metrics, retrieval_metrics

from .augment import draw_view, normalize, random_erasing, view_matrix, warp_image
from .rerank import k_reciprocal_distance
from .run import Recipe, eval_batches
from .samplers import IdentitySampler


class BNNeckHead(nn.Module):
    """pooled (B, D) -> {"feature" (B, D) before the neck, "neck_feature" (B, D) after it,
    "logits" (B, num_classes)}."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.neck = nn.BatchNorm1d(dim)
        self.neck.bias.requires_grad_(False)  # BNNeck: the classifier sees a centred feature
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor | None = None) -> dict:
        feature = pooled.float()
        neck = self.neck(feature)
        return {"feature": feature, "neck_feature": neck, "logits": self.classifier(neck)}


def batch_hard_triplet(
    features: torch.Tensor, labels: torch.Tensor, margin: float | None = 0.3
) -> torch.Tensor:
    """Batch-hard triplet loss: for each anchor, its farthest positive against its nearest
    negative (Euclidean), hinge with `margin` (None: soft margin log(1 + exp(ap - an))).
    features (B, D), labels (B,); anchors without a positive or a negative are left out."""
    distance = torch.cdist(features.float(), features.float()).clamp_min(1e-12)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    valid = positive.any(1) & (~same).any(1)
    if not valid.any():
        return features.sum() * 0.0
    hardest_positive = torch.where(positive, distance, torch.zeros_like(distance)).amax(1)
    hardest_negative = torch.where(same, torch.full_like(distance, float("inf")), distance)
    hardest_negative = hardest_negative.amin(1)
    gap = (hardest_positive - hardest_negative)[valid]
    if margin is None:
        return F.softplus(gap).mean()
    return F.relu(gap + margin).mean()


class ReIDRecipe(Recipe):
    name = "reid"
    task = "reid"
    metric = "mAP"
    splits = {f: ("train", "query") for f in ("market", "idfolder", "msmt17", "synth")}
    loss_terms = ("id", "triplet")

    def datasets(self):
        train, query = super().datasets()
        data = self.config["data"]
        gallery = build_dataset(data["format"], data["root"], "gallery", on_error="drop")
        return train, (query, gallery)

    def head_config(self, train_set) -> dict:
        pids = sorted({p for p in train_set.pids if p >= 0})
        if len(pids) < 2:
            raise ValueError(f"{train_set!r} has {len(pids)} identities; re-ID needs at least 2")
        self.label_of = {pid: i for i, pid in enumerate(pids)}
        return {"num_classes": len(pids)}

    def build_head(self, backbone, head_config: dict) -> nn.Module:
        return BNNeckHead(backbone.embed_dim, head_config["num_classes"])

    def sampler(self, dataset, world):
        data = self.config["data"]
        k = int(data["instances_per_id"])
        if data["batch_size"] % k:
            raise ValueError(
                f"data.batch_size {data['batch_size']} must be P x K with K = "
                f"data.instances_per_id = {k}"
            )
        return IdentitySampler(
            dataset.dataset.pids, data["batch_size"] // k, k, world.size, world.rank,
            self.config["seed"],
        )  # fmt: skip

    def train_sample(self, sample: dict, size) -> dict:
        augment = self.config["augment"]
        flip, scale, angle, shift = draw_view(augment)
        source = tuple(sample["image"].shape[-2:])
        matrix = view_matrix(source, size, flip=flip, scale=scale, angle=angle, shift=shift)
        image = normalize(warp_image(sample["image"], matrix, size))
        image = random_erasing(image, augment["erasing_p"])
        return {"image": image, "label": self.label_of[sample["pid"]], "index": sample["index"]}

    def losses(self, out: dict, batch: dict, device) -> dict[str, torch.Tensor]:
        labels = batch["label"].to(device)
        loss = self.config["loss"]
        identity = F.cross_entropy(
            out["logits"].float(), labels, label_smoothing=float(loss["label_smoothing"])
        )
        margin = loss["triplet_margin"]
        triplet = batch_hard_triplet(out["feature"], labels, None if margin is None else margin)
        return {"id": identity, "triplet": triplet}

    def features(self, model, dataset, size, device) -> tuple[torch.Tensor, ...]:
        """(features (N, D), pids (N,), cameras (N,)) of a test split."""
        evaluation, data = self.config["eval"], self.config["data"]
        key = "neck_feature" if evaluation["neck_feat"] == "after" else "feature"
        feats, pids, cams = [], [], []
        for batch in eval_batches(
            dataset, size, data["eval_batch_size"], data["num_workers"], data["max_eval_images"]
        ):
            images = batch["image"].to(device)
            weights = model.backbone.prompts.weights(self.task, images.shape[0], device)
            feature = model(images, weights)[0][key].float()
            if evaluation["flip"]:
                feature = feature + model(images.flip(-1), weights)[0][key].float()
            feats.append(feature.cpu())
            pids.append(batch["pid"])
            cams.append(batch["camera"])
        return torch.cat(feats), torch.cat(pids), torch.cat(cams)

    def evaluate(self, model, test, size, device) -> dict:
        query, gallery = test
        qf, qp, qc = self.features(model, query, size, device)
        gf, gp, gc = self.features(model, gallery, size, device)
        evaluation = self.config["eval"]
        if evaluation["rerank"]:
            distance = k_reciprocal_distance(
                qf, gf, evaluation["rerank_k1"], evaluation["rerank_k2"],
                evaluation["rerank_lambda"],
            )  # fmt: skip
            metrics = retrieval_metrics(distance, qp, qc, gp, gc)
        else:
            metrics = reid_metrics(qf, qp, qc, gf, gp, gc)
        return {"metrics": metrics, "sets": {"query": len(qf), "gallery": len(gf)}}
