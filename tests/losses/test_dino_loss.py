"""The DINO self-distillation loss against its formula written out, and its center."""

import pytest
import torch

from clasp.losses import DINOLoss
from tests.utils import assert_close


@pytest.mark.parametrize(
    "n_local", [pytest.param(0, id="globals-only"), pytest.param(3, id="3-local")]
)
def test_dino_loss_is_cross_entropy_over_pairs_of_different_crops(n_local):
    B, K, G = 4, 16, 2
    loss = DINOLoss(K, student_temp=0.1, center_momentum=0.9).double()
    loss.center.normal_()
    teacher = torch.randn(G * B, K, dtype=torch.float64)
    student_g = torch.randn(G * B, K, dtype=torch.float64)
    student_l = torch.randn(n_local * B, K, dtype=torch.float64) if n_local else None
    targets = loss.teacher_targets(teacher, 0.04)
    got = loss(student_g, student_l, targets, G)
    crops = list(student_g.chunk(G)) + (list(student_l.chunk(n_local)) if n_local else [])
    want = torch.zeros(B, dtype=torch.float64)
    pairs = 0
    for t in range(G):
        target = torch.softmax((teacher.chunk(G)[t] - loss.center) / 0.04, -1)
        for s, crop in enumerate(crops):
            if s != t:
                want -= (target * torch.log_softmax(crop / 0.1, -1)).sum(-1)
                pairs += 1
    assert pairs == G * (G - 1) + G * n_local
    assert_close(got, want / pairs)


def test_dino_center_moves_towards_the_teacher_mean():
    loss = DINOLoss(8, center_momentum=0.75)
    teacher = torch.randn(6, 8)
    loss.update_center(teacher)
    assert_close(loss.center, 0.25 * teacher.mean(0, keepdim=True))
    with pytest.raises(ValueError, match="two crops"):
        loss(torch.randn(4, 8), None, loss.teacher_targets(torch.randn(4, 8), 0.1), 1)
