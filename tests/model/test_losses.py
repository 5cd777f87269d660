"""Each pre-training loss against its formula written out, and its edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from clasp.losses import (
    AttributeLoss,
    DINOLoss,
    PartLoss,
    image_text_loss,
    load_balance_loss,
    router_z_loss,
)
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


def test_load_balance_is_one_when_uniform_and_E_when_collapsed():
    E = 4
    uniform = load_balance_loss(torch.full((2, E), 1 / E), torch.full((2, E), 10))
    assert_close(uniform, torch.tensor(1.0))
    probs = torch.tensor([[1.0, 0, 0, 0]], requires_grad=True)
    collapsed = load_balance_loss(probs, torch.tensor([[40, 0, 0, 0]]))
    assert_close(collapsed, torch.tensor(float(E)))
    collapsed.backward()
    # Only probs_mean carries a gradient: E * fraction, pushing mass off the loaded expert.
    assert_close(probs.grad, torch.tensor([[4.0, 0, 0, 0]]))
    empty = load_balance_loss(torch.full((1, E), 1 / E), torch.zeros(1, E, dtype=torch.int32))
    assert empty == 0


def test_router_z_loss_is_the_mean_over_routers():
    z = torch.tensor([1.0, 2.0, 6.0])
    assert_close(router_z_loss(z), torch.tensor(3.0))


def test_image_text_loss_is_clip_loss_for_distinct_texts():
    image, text = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    scale = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    got = image_text_loss(image, text, scale)
    logits = scale * F.normalize(image, dim=1) @ F.normalize(text, dim=1).T
    labels = torch.arange(6)
    want = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert_close(got, want)
    got.backward()
    assert scale.grad is not None and scale.grad != 0  # the temperature is learned


def test_image_text_loss_counts_equal_texts_as_positives_and_skips_uncaptioned():
    image, text = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ids = torch.tensor([3, 7, 3, -1, 9])
    text[2] = text[0]  # images 0 and 2 share one caption
    scale = torch.tensor(5.0, dtype=torch.float64)
    got = image_text_loss(image, text, scale, ids)
    keep = [0, 1, 2, 4]
    logits = scale * F.normalize(image[keep], dim=1) @ F.normalize(text[keep], dim=1).T
    targets = torch.tensor(
        [[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]], dtype=torch.float64
    )
    i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
    t2i = -(targets * logits.T.log_softmax(1)).sum(1).mean()
    assert_close(got, 0.5 * (i2t + t2i))
    # Moving the uncaptioned sample changes nothing; fewer than two captioned give zero.
    image[3] += 10
    assert_close(image_text_loss(image, text, scale, ids), got)
    lonely = image_text_loss(image, text, scale, torch.tensor([-1, -1, 4, -1, -1]))
    assert lonely == 0
    with pytest.raises(ValueError, match=r"\(N, E\)"):
        image_text_loss(image, text[:4], scale)
