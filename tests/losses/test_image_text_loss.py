"""The image-text loss against CLIP's symmetric InfoNCE written out, with equal captions as
positives and uncaptioned samples left out."""

import pytest
import torch
import torch.nn.functional as F

from clasp.losses import image_text_loss
from tests.utils import assert_close


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


def test_image_text_loss_weights_samples_and_leaves_weight_zero_out_of_the_contrast():
    image, text = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 3, -1, 5])
    scale = torch.tensor(7.0, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    got = image_text_loss(image, text, scale, ids, weights)
    # The contrast among the captioned samples of weight > 0 (0, 1, 3, 5), each sample's
    # two-way cross-entropy weighted, averaged over the 5 captioned samples.
    keep = [0, 1, 3, 5]
    logits = scale * F.normalize(image[keep], dim=1) @ F.normalize(text[keep], dim=1).T
    labels = torch.arange(4)
    per_sample = 0.5 * (
        F.cross_entropy(logits, labels, reduction="none")
        + F.cross_entropy(logits.T, labels, reduction="none")
    )
    assert_close(got, (per_sample * weights[keep]).sum() / 5)
    image[2] += 10  # a weight-0 sample is not even a negative
    assert_close(image_text_loss(image, text, scale, ids, weights), got)
    ones = torch.ones(6, dtype=torch.float64)
    assert_close(
        image_text_loss(image, text, scale, ids, ones), image_text_loss(image, text, scale, ids)
    )
