"""The part pseudo-label loss: cross-entropy on labelled patches only."""

import pytest
import torch
import torch.nn.functional as F

from clasp.losses import PartLoss
from tests.utils import assert_close


def test_part_loss_ignores_unlabelled_patches():
    logits = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, 4, 2))
    labels[0, :2] = -1
    labels[2] = -1  # nothing labelled in this sample
    loss, labelled = PartLoss()(logits, labels)
    assert labelled.tolist() == [True, True, False]
    for i in range(2):
        keep = labels[i] >= 0
        assert_close(loss[i], F.cross_entropy(logits[i][keep], labels[i][keep]))
    assert loss[2] == 0
    with pytest.raises(ValueError, match="do not match the logits grid"):
        PartLoss()(logits, labels[:, :3])
