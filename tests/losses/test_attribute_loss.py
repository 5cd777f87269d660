"""The attribute pseudo-label loss: BCE on soft targets, unknown values skipped."""

import math

import torch
import torch.nn.functional as F

from clasp.losses import AttributeLoss
from tests.utils import assert_close


def test_attribute_loss_uses_soft_targets_and_skips_unknown():
    logits = torch.randn(2, 6, dtype=torch.float64)
    targets = torch.rand(2, 6, dtype=torch.float64)
    targets[1, ::2] = math.nan
    loss, labelled = AttributeLoss()(logits, targets)
    assert labelled.all()
    assert_close(loss[0], F.binary_cross_entropy_with_logits(logits[0], targets[0]))
    known = ~targets[1].isnan()
    want = F.binary_cross_entropy_with_logits(logits[1][known], targets[1][known])
    assert_close(loss[1], want)
