"""Label masks on patch grids: a pixel mask reduced to a (gh, gw) grid of cell labels.

Cells tile the whole mask: cell (i, j) covers rows [i H / gh, (i + 1) H / gh) and columns
[j W / gw, (j + 1) W / gw), as the teacher's part grids and the backbone's patches do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grid_labels(mask: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """The majority label of each grid cell of a (H, W) mask (-1 = ignore, not voting);
    -1 where a cell holds no labelled pixel. -> (gh, gw) int64."""
    mask = mask.long()
    one_hot = F.one_hot(mask.clamp(min=0), num_classes).permute(2, 0, 1).float()
    one_hot *= (mask >= 0).float()[None]
    votes = F.adaptive_avg_pool2d(one_hot[None], grid)[0]  # (C, gh, gw)
    labels = votes.argmax(0)
    return torch.where(votes.sum(0) > 0, labels, torch.full_like(labels, -1))
