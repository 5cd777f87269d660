"""k-reciprocal re-ranking of re-ID retrieval (Zhong et al., CVPR 2017).

Over all query and gallery features together, with d the squared Euclidean distance of the
L2-normalised features, each row scaled by its largest entry:
- R(i, k): the k-reciprocal neighbours of i, the j among i's k + 1 nearest (i included) that
  have i among their own k + 1 nearest;
- R*(i): R(i, k1), grown by R(c, round(k1 / 2)) of each c in it when at least 2/3 of that
  set is already in R(i, k1);
- V[i, j] = exp(-d[i, j]) over j in R*(i), 0 elsewhere, normalised to sum 1; with k2 > 1,
  V[i] becomes the mean of V over i's k2 nearest (local query expansion);
- Jaccard distance J[i, j] = 1 - sum_m min(V[i, m], V[j, m]) / sum_m max(V[i, m], V[j, m]),
  where for rows summing to 1 the denominator is 2 - the numerator;
- final distance = (1 - lambda) J + lambda d, for queries (rows) against the gallery.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _reciprocal(rank: torch.Tensor, i: int, k: int) -> torch.Tensor:
    forward = rank[i, : k + 1]
    backward = rank[forward, : k + 1]
    return forward[(backward == i).any(1)]


def k_reciprocal_distance(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> torch.Tensor:
    """Re-ranked distances (Q, G) of query (Q, D) to gallery (G, D) features (see the module
    doc). Computed in float64; ties in the neighbour order go to the lower index."""
    features = F.normalize(torch.cat([query, gallery]).double(), dim=1)
    n, q = features.shape[0], query.shape[0]
    d = (2 - 2 * features @ features.T).clamp_min(0)
    d = d / d.amax(dim=1, keepdim=True).clamp_min(1e-12)
    k1, k2 = min(k1, n - 1), min(k2, n)
    rank = torch.argsort(d, dim=1, stable=True)
    v = torch.zeros(n, n, dtype=torch.float64)
    half = int(round(k1 / 2))
    for i in range(n):
        neighbours = _reciprocal(rank, i, k1)
        expansion = neighbours
        for candidate in neighbours.tolist():
            grown = _reciprocal(rank, candidate, half)
            overlap = torch.isin(grown, neighbours).sum()
            if overlap > 2 / 3 * len(grown):
                expansion = torch.cat([expansion, grown])
        expansion = torch.unique(expansion)
        weights = torch.exp(-d[i, expansion])
        v[i, expansion] = weights / weights.sum()
    if k2 > 1:
        v = v[rank[:, :k2]].mean(1)
    jaccard = torch.empty(q, n, dtype=torch.float64)
    for i in range(q):
        support = torch.nonzero(v[i]).flatten()
        shared = torch.minimum(v[i, support][None], v[:, support]).sum(1)
        jaccard[i] = 1 - shared / (2 - shared)
    final = (1 - lambda_value) * jaccard + lambda_value * d[:q]
    return final[:, q:]
