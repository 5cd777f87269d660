"""Linear probes on frozen features, fitted full-batch with L-BFGS (deterministic: zero
initialisation, one batch, a fixed number of iterations), or in closed form (`TextProbe`).

Features are standardised with the training set's mean and standard deviation first, so
one L2 strength suits encoders of any scale. Every loss is a mean over training targets
plus `l2 * ||W||^2` (the bias is not penalised).

- `AttributeProbe`: logistic regression, one output per attribute. Unknown labels (NaN)
  are left out; each attribute's positives and negatives weigh half each, because the
  metric (mA) weighs the true-positive and true-negative rates equally.
- `PartProbe`: a softmax classifier per patch token, trained against the label mask
  reduced to the patch grid by majority vote (`clasp.data.grids.grid_labels`); its logits
  are upsampled bilinearly to each image's resolution before the argmax.
- `HeatmapProbe`: a linear map from each patch token to K keypoint logits; for each
  keypoint a softmax over the grid is trained against a Gaussian around the true position
  (sigma = one cell); predictions upsample the logits bilinearly to image resolution and
  take the argmax.
- `TextProbe`: ridge regression from the features to L2-normalised text embeddings (least
  squares in closed form), the image side of text-based search for a backbone without an
  image-text head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clasp.data.grids import grid_labels


class Standardizer:
    def __init__(self, features: torch.Tensor):
        flat = features.reshape(-1, features.shape[-1]).double()
        self.mean = flat.mean(0).float()
        self.std = flat.std(0).float().clamp(min=1e-6) if flat.shape[0] > 1 else None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        out = features.float() - self.mean
        return out / self.std if self.std is not None else out


def fit_lbfgs(params: list[torch.Tensor], loss_fn, max_iter: int = 100) -> float:
    """Minimise loss_fn() over params with full-batch L-BFGS; returns the final loss."""
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        return float(loss_fn().detach())


class AttributeProbe:
    def __init__(self, l2: float = 1e-3, max_iter: int = 100):
        self.l2, self.max_iter = l2, max_iter

    def fit(self, features: torch.Tensor, targets: torch.Tensor) -> AttributeProbe:
        """features (N, D), targets (N, A) 0/1 with NaN unknown."""
        self.scale = Standardizer(features)
        x = self.scale(features)
        known = ~torch.isnan(targets)
        y = torch.nan_to_num(targets, nan=0.0)
        positives = (y * known).sum(0)
        negatives = ((1 - y) * known).sum(0)
        # Half the weight to each side of every attribute; a side with no example weighs 0.
        pos_weight = torch.where(positives > 0, 0.5 / positives.clamp(min=1), 0.0)
        neg_weight = torch.where(negatives > 0, 0.5 / negatives.clamp(min=1), 0.0)
        # Summed, these weights give the mean over attributes of each one's balanced loss.
        weight = (y * pos_weight + (1 - y) * neg_weight) * known / targets.shape[1]
        self.weight = torch.zeros(x.shape[1], targets.shape[1], requires_grad=True)
        self.bias = torch.zeros(targets.shape[1], requires_grad=True)

        def loss_fn():
            logits = x @ self.weight + self.bias
            bce = F.binary_cross_entropy_with_logits(logits, y, weight=weight, reduction="sum")
            return bce + self.l2 * self.weight.square().sum()

        self.loss = fit_lbfgs([self.weight, self.bias], loss_fn, self.max_iter)
        return self

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale(features) @ self.weight + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(N, A) bool: probability above 0.5."""
        return self.logits(features) > 0


class PartProbe:
    def __init__(self, num_classes: int, l2: float = 1e-3, max_iter: int = 100):
        self.num_classes, self.l2, self.max_iter = num_classes, l2, max_iter

    def fit(self, patches: torch.Tensor, masks: list[torch.Tensor]) -> PartProbe:
        """patches (N, gh, gw, D); masks: N label masks (H0, W0), -1 ignore."""
        grid = tuple(patches.shape[1:3])
        labels = torch.stack([grid_labels(m, grid, self.num_classes) for m in masks]).view(-1)
        keep = labels >= 0
        if not keep.any():
            raise ValueError("no labelled pixels to train the parsing probe on")
        self.scale = Standardizer(patches)
        x = self.scale(patches).reshape(-1, patches.shape[-1])[keep]
        y = labels[keep]
        self.weight = torch.zeros(x.shape[1], self.num_classes, requires_grad=True)
        self.bias = torch.zeros(self.num_classes, requires_grad=True)

        def loss_fn():
            ce = F.cross_entropy(x @ self.weight + self.bias, y)
            return ce + self.l2 * self.weight.square().sum()

        self.loss = fit_lbfgs([self.weight, self.bias], loss_fn, self.max_iter)
        return self

    @torch.no_grad()
    def logits(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, gh, gw, D) -> (N, C, gh, gw)."""
        return (self.scale(patches) @ self.weight + self.bias).permute(0, 3, 1, 2)

    @torch.no_grad()
    def predict(self, patches: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Labels (N, H, W) at `size` (logits upsampled bilinearly, then argmax)."""
        logits = F.interpolate(self.logits(patches), size, mode="bilinear", align_corners=False)
        return logits.argmax(1)


def heatmap_targets(
    keypoints: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int], sigma: float
) -> torch.Tensor:
    """(N, K, gh * gw) Gaussian distributions over cell centres around keypoints (N, K, 3)
    given in pixels of an image of image_size (H, W); sigma in cells."""
    gh, gw = grid
    height, width = image_size
    rows = (keypoints[..., 1] / height * gh)[..., None, None]  # position in cell units
    cols = (keypoints[..., 0] / width * gw)[..., None, None]
    centre_r = (torch.arange(gh, dtype=torch.float32) + 0.5).view(gh, 1)
    centre_c = (torch.arange(gw, dtype=torch.float32) + 0.5).view(1, gw)
    d2 = (centre_r - rows).square() + (centre_c - cols).square()
    logits = -d2 / (2 * sigma**2)
    return logits.flatten(-2).softmax(-1)


class HeatmapProbe:
    def __init__(self, l2: float = 1e-3, sigma: float = 1.0, max_iter: int = 100):
        self.l2, self.sigma, self.max_iter = l2, sigma, max_iter

    def fit(
        self, patches: torch.Tensor, keypoints: torch.Tensor, image_size: tuple[int, int]
    ) -> HeatmapProbe:
        """patches (N, gh, gw, D); keypoints (N, K, 3) in pixels of the (H, W) input the
        patches come from; keypoints with visibility 0 are not trained on."""
        n, gh, gw, d = patches.shape
        counted = keypoints[..., 2] > 0
        if not counted.any():
            raise ValueError("no labelled keypoints to train the pose probe on")
        targets = heatmap_targets(keypoints, (gh, gw), image_size, self.sigma)
        self.scale = Standardizer(patches)
        x = self.scale(patches).reshape(n, gh * gw, d)
        # No bias: a per-keypoint constant cancels in the softmax over locations, so where a
        # keypoint is must come from the features alone.
        self.weight = torch.zeros(d, keypoints.shape[1], requires_grad=True)

        def loss_fn():
            logits = (x @ self.weight).transpose(1, 2)  # (N, K, cells)
            ce = -(targets * logits.log_softmax(-1)).sum(-1)
            return ce[counted].mean() + self.l2 * self.weight.square().sum()

        self.loss = fit_lbfgs([self.weight], loss_fn, self.max_iter)
        return self

    @torch.no_grad()
    def predict(self, patches: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(N, K, 2) x, y in pixels of the (H, W) input: argmax of the upsampled logits,
        at the centre of its pixel."""
        n, gh, gw, d = patches.shape
        x = self.scale(patches).reshape(n, gh * gw, d)
        logits = (x @ self.weight).transpose(1, 2).reshape(n, -1, gh, gw)
        height, width = image_size
        up = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
        flat = up.flatten(2).argmax(-1)
        ys, xs = flat // width, flat % width
        return torch.stack([xs.float() + 0.5, ys.float() + 0.5], dim=-1)


class TextProbe:
    def __init__(self, l2: float = 1e-3):
        self.l2 = l2

    def fit(self, features: torch.Tensor, texts: torch.Tensor) -> TextProbe:
        """features (N, D), texts (N, E) (normalised here): W, b minimising
        mean ||x W + b - t||^2 + l2 ||W||^2 over the standardised features."""
        self.scale = Standardizer(features)
        x = self.scale(features).double()  # zero mean: the bias is the mean target
        t = F.normalize(texts.double(), dim=-1)
        self.bias = t.mean(0)
        gram = x.T @ x / x.shape[0] + self.l2 * torch.eye(x.shape[1], dtype=x.dtype)
        self.weight = torch.linalg.solve(gram, x.T @ (t - self.bias) / x.shape[0])
        return self

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E) embeddings in the text space (not normalised)."""
        return (self.scale(features).double() @ self.weight + self.bias).float()
