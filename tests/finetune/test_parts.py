"""The recipes' parts on constructed inputs: identity batches, re-ranking, the triplet loss,
training views, heatmaps, COCO AP, attribute weights, the colour-histogram baseline."""

import colorsys
import math

import numpy as np
import pytest
import torch

from clasp.eval.colour_histogram import rgb_to_hsv, stripe_histograms
from clasp.eval.metrics import reid_metrics
from clasp.finetune.attributes import positive_ratio_weights
from clasp.finetune.augment import view_matrix, warp_image, warp_keypoints, warp_mask
from clasp.finetune.pose import coco_keypoint_ap, decode_heatmaps, gaussian_targets
from clasp.finetune.reid import batch_hard_triplet
from clasp.finetune.rerank import k_reciprocal_distance
from clasp.finetune.samplers import IdentitySampler


def test_identity_batches_are_p_identities_of_k_images_and_resume_mid_epoch():
    pids = [p for p in range(10) for _ in range(3 + p % 4)]  # 3 to 6 images per identity
    sampler = IdentitySampler(pids, 4, 2, seed=7)
    batches = sampler.epoch_batches(0)
    assert batches and all(len(b) == 8 for b in batches)
    for batch in batches:
        ids = [pids[i] for i in batch]
        assert len(set(ids)) == 4 and all(ids.count(p) == 2 for p in set(ids))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(batches, IdentitySampler(pids, 4, 2, seed=7).epoch_batches(0), strict=True)
    )
    other = sampler.epoch_batches(1)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other, strict=False))
    # Two ranks split the batches of one epoch between them, disjointly.
    ranks = [IdentitySampler(pids, 4, 2, 2, r, seed=7).epoch_batches(0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(batches) // 2
    even = batches[0 : 2 * len(ranks[0]) : 2]
    assert [b.tolist() for b in ranks[0]] == [b.tolist() for b in even]
    # Starting at batch 1 of epoch 1 yields that epoch's batches from the second on.
    sampler.set_position(1, 1)
    yielded = [index for epoch, index in sampler]
    assert {epoch for epoch, _ in sampler} == {1}
    assert yielded == np.concatenate(sampler.epoch_batches(1)[1:]).tolist()
    assert len(sampler) == len(yielded)
    with pytest.raises(ValueError, match="cannot fill a batch"):
        IdentitySampler([0, 0, 1, 1], 3, 2)


def test_k_reciprocal_re_ranking_on_a_hand_checked_case():
    # Unit vectors at 0 (the query), 10, 40 and 50 degrees: mutual nearest pairs (q, g1) and
    # (g2, g3). With k1 = 1 and k2 = 1, R*(q) = {q, g1}, R*(g1) = {g1, q}: q shares nothing
    # with g2 and g3 (Jaccard distance 1).
    angles = torch.tensor([0.0, 10.0, 40.0, 50.0]).deg2rad()
    points = torch.stack([angles.cos(), angles.sin()], 1)

    def d(a, b):  # squared Euclidean distance of unit vectors 'a' and 'b' degrees apart
        return 2 - 2 * math.cos(math.radians(b - a))

    # Each row of d is divided by its largest entry (the farthest point): 50 for q, 40 for g1.
    dq, dg1 = d(0, 10) / d(0, 50), d(0, 10) / d(10, 50)
    vq = [1 / (1 + math.exp(-dq)), math.exp(-dq) / (1 + math.exp(-dq))]  # V[q, q], V[q, g1]
    vg1 = [math.exp(-dg1) / (1 + math.exp(-dg1)), 1 / (1 + math.exp(-dg1))]  # V[g1, q], V[g1, g1]
    shared = min(vq[0], vg1[0]) + min(vq[1], vg1[1])
    jaccard = 1 - shared / (2 - shared)  # = 0.0523
    out = k_reciprocal_distance(points[:1], points[1:], k1=1, k2=1, lambda_value=0.0)
    torch.testing.assert_close(out, torch.tensor([[jaccard, 1.0, 1.0]], dtype=torch.float64))
    assert abs(jaccard - 0.0523) < 1e-3
    mixed = k_reciprocal_distance(points[:1], points[1:], k1=1, k2=1, lambda_value=0.3)
    original = torch.tensor([[dq, d(0, 40) / d(0, 50), 1.0]], dtype=torch.float64)
    torch.testing.assert_close(mixed, 0.7 * out + 0.3 * original)


def test_re_ranking_keeps_the_true_match_first_on_clustered_identities():
    centres = torch.randn(6, 16)
    gallery = torch.cat([centres + 0.3 * torch.randn(6, 16) for _ in range(4)])
    pids = torch.arange(6).repeat(4)
    query = centres + 0.3 * torch.randn(6, 16)
    distance = k_reciprocal_distance(query, gallery, k1=4, k2=2)
    cams = torch.zeros(24, dtype=torch.long)
    plain = reid_metrics(query, torch.arange(6), cams[:6] + 1, gallery, pids, cams)
    assert distance.shape == (6, 24) and plain["rank1"] == 1.0
    assert (pids[distance.argmin(1)] == torch.arange(6)).all()


def test_batch_hard_triplet_matches_a_loop():
    features, labels = torch.randn(12, 5), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4])
    loss = batch_hard_triplet(features, labels, margin=0.3)
    terms = []
    for i in range(12):
        pos = [j for j in range(12) if labels[j] == labels[i] and j != i]
        neg = [j for j in range(12) if labels[j] != labels[i]]
        if pos:
            ap = max((features[i] - features[j]).norm() for j in pos)
            an = min((features[i] - features[j]).norm() for j in neg)
            terms.append(max(float(ap - an) + 0.3, 0.0))
    assert abs(float(loss) - sum(terms) / len(terms)) < 1e-5


def test_mask_and_keypoints_follow_the_image_through_a_random_view():
    image = torch.zeros(3, 40, 20, dtype=torch.uint8)
    image[:, 10:13, 4:7] = 255  # a bright 3 x 3 block centred on (5.5, 11.5)
    mask = torch.zeros(40, 20, dtype=torch.long)
    mask[10:13, 4:7] = 3
    keypoints = torch.tensor([[5.5, 11.5, 2.0], [15.0, 30.0, 2.0]])
    matrix = view_matrix((40, 20), (64, 32), flip=True, scale=1.2, angle=12.0, shift=(2.0, -3.0))
    out = warp_image(image, matrix, (64, 32))
    labels = warp_mask(mask, matrix, (64, 32))
    moved = warp_keypoints(keypoints, matrix, (64, 32), flip_perm=[1, 0])
    x, y = moved[1, :2].long().tolist()  # the block's keypoint, swapped into place 1
    assert out[:, y, x].min() > 0.9 and labels[y, x] == 3
    assert moved[0, 2] == 2 and moved[0, 0] < 16  # the other keypoint went to the left half
    outside = view_matrix((40, 20), (64, 32), scale=0.5)  # zoomed out: borders are outside
    assert warp_mask(mask, outside, (64, 32))[0, 0] == -1
    assert warp_image(image, outside, (64, 32))[:, 0, 0].max() == 0


def test_heatmaps_decode_to_their_keypoints_and_perfect_predictions_score_ap_one():
    keypoints = torch.tensor([[[10.3, 20.6, 2.0], [25.0, 5.2, 2.0]]])
    targets = gaussian_targets(keypoints, (16, 8), (4.0, 4.0), sigma=2.0)
    assert targets.shape == (1, 2, 16, 8) and abs(float(targets.max()) - 1) < 0.2
    positions, scores = decode_heatmaps(targets, (4.0, 4.0))
    assert (positions - keypoints[..., :2]).abs().max() < 1.5 and (scores > 0.8).all()
    people = torch.rand(3, 17, 2) * 50
    truth = torch.cat([people, torch.full((3, 17, 1), 2.0)], -1)
    gt = {
        "images": [{"id": i} for i in range(3)],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": i,
                "category_id": 1,
                "iscrowd": 0,
                "keypoints": truth[i].flatten().tolist(),
                "num_keypoints": 17,
                "area": 2500.0,
                "bbox": [0, 0, 50, 50],
            }
            for i in range(3)
        ],
    }
    perfect = [
        {"image_id": i, "category_id": 1, "score": 1.0, "keypoints": truth[i].flatten().tolist()}
        for i in range(3)
    ]
    assert coco_keypoint_ap(gt, perfect)["AP"] == pytest.approx(1.0)
    wrong = [
        {**p, "keypoints": (truth[i] + torch.tensor([30.0, 30.0, 0])).flatten().tolist()}
        for i, p in enumerate(perfect)
    ]
    assert coco_keypoint_ap(gt, wrong)["AP"] < 0.1


def test_attribute_weights_follow_the_positive_ratio():
    ratio = torch.tensor([0.1, 0.5])
    targets = torch.tensor([[1.0, 0.0], [0.0, float("nan")]])
    weights = positive_ratio_weights(ratio, targets)
    expected = torch.tensor([[math.exp(0.9), math.exp(0.5)], [math.exp(0.1), 0.0]])
    torch.testing.assert_close(weights, expected)


def test_colour_histograms_match_colorsys_and_tell_colours_apart():
    rgb = torch.rand(2, 3, 12, 6)
    hsv = rgb_to_hsv(rgb)
    for b, i, j in [(0, 0, 0), (1, 5, 3), (0, 11, 5), (1, 7, 1)]:
        expected = colorsys.rgb_to_hsv(*rgb[b, :, i, j].tolist())
        assert torch.allclose(hsv[b, :, i, j], torch.tensor(expected), atol=1e-5)
    features = stripe_histograms(rgb, stripes=6, bins=(8, 4, 4))
    assert features.shape == (2, 6 * 128)
    torch.testing.assert_close(features.view(2, 6, -1).sum(-1), torch.ones(2, 6))

    # People in red-over-blue and in green-over-grey, two views each: each finds its twin.
    def person(top, bottom):
        image = torch.empty(3, 24, 12)
        image[:, :12] = torch.tensor(top).view(3, 1, 1)
        image[:, 12:] = torch.tensor(bottom).view(3, 1, 1)
        return (image + 0.05 * torch.randn_like(image)).clamp(0, 1)

    views = torch.stack(
        [
            person([0.9, 0.1, 0.1], [0.1, 0.1, 0.8]),
            person([0.1, 0.8, 0.1], [0.5, 0.5, 0.5]),
            person([0.8, 0.15, 0.1], [0.1, 0.2, 0.9]),
            person([0.15, 0.9, 0.1], [0.45, 0.45, 0.45]),
        ]
    )
    f = stripe_histograms(views)
    cams = torch.tensor([0, 0, 1, 1])
    metrics = reid_metrics(
        f[:2], torch.tensor([0, 1]), cams[:2], f[2:], torch.tensor([0, 1]), cams[2:]
    )
    assert metrics["mAP"] == 1.0
