"""The metrics against values worked out by hand on tiny constructed cases."""

import math

import pytest
import torch

from clasp.eval.metrics import (
    attribute_metrics,
    confusion_matrix,
    keypoint_box_size,
    pck,
    reid_metrics,
    segmentation_metrics,
)

NAN = float("nan")


def _unit_rows(rows):
    """(x, y) cosines with the two query axes, completed to unit length by a third axis."""
    return torch.tensor([[x, y, math.sqrt(1 - x * x - y * y)] for x, y in rows])


def test_reid_removes_same_camera_matches_and_junk_and_skips_unmatched_queries():
    # Gallery: cosine with query 0 (x) and with query 2 (y).
    gallery = _unit_rows(
        [(0.95, 0.1), (0.9, 0.4), (0.8, 0.2), (0.7, 0.05), (0.6, 0.15), (0.5, 0.0), (0.0, 0.0)]
    )
    gallery_pids = torch.tensor([1, 2, 1, -1, 3, 1, 4])
    gallery_cams = torch.tensor([0, 1, 1, 2, 0, 2, 0])
    query = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]) * 3.0  # scale must not matter
    query_pids, query_cams = torch.tensor([1, 4, 2]), torch.tensor([0, 0, 0])
    out = reid_metrics(query, query_pids, query_cams, gallery, gallery_pids, gallery_cams)
    # Query 0 ranks a b c d e f g; a (same id, same camera) and d (junk) go: b c e f g, whose
    # true matches c and f sit at ranks 2 and 4: AP = (1/2 + 2/4) / 2, first hit at rank 2.
    # Query 1's only match shares its camera: skipped. Query 2 finds b first: AP 1.
    assert out["num_queries"] == 3 and out["num_valid_queries"] == 2
    assert out["num_skipped_queries"] == 1
    assert out["mAP"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["rank1"] == pytest.approx(0.5)
    assert out["rank5"] == pytest.approx(1.0) and out["rank10"] == pytest.approx(1.0)


def test_reid_unknown_cameras_keep_every_match_and_no_valid_query_gives_nan():
    gallery = _unit_rows([(0.9, 0.0), (0.5, 0.0)])
    out = reid_metrics(
        torch.tensor([[1.0, 0, 0]]), torch.tensor([7]), torch.tensor([-1]),
        gallery, torch.tensor([5, 7]), torch.tensor([-1, -1]),
    )  # fmt: skip
    assert out["rank1"] == 0.0 and out["mAP"] == pytest.approx(0.5)
    none = reid_metrics(
        torch.ones(1, 3), torch.tensor([1]), torch.tensor([0]),
        torch.ones(1, 3), torch.tensor([2]), torch.tensor([0]),
    )  # fmt: skip
    assert math.isnan(none["mAP"]) and none["num_skipped_queries"] == 1


def test_attribute_mean_accuracy_and_instance_metrics():
    target = torch.tensor(
        [[1, 0, 1, 0], [1, 0, 0, 0], [0, 1, NAN, 0], [0, 0, 0, 0]], dtype=torch.float32
    )
    predicted = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    out = attribute_metrics(predicted, target, ["a0", "a1", "a2", "a3"])
    # a0: TPR 1/2, TNR 2/2; a1: TPR 1/1, TNR 2/3; a2 (one unknown): TPR 1/1, TNR 1/2;
    # a3 has no positive example: not scored.
    assert out["per_attribute_accuracy"] == pytest.approx(
        {"a0": 0.75, "a1": (1 + 2 / 3) / 2, "a2": 0.75}
    )
    assert out["mA"] == pytest.approx((0.75 + (1 + 2 / 3) / 2 + 0.75) / 3)
    assert out["unscored_attributes"] == ["a3"] and out["num_scored_attributes"] == 3
    # Per sample (known labels only): s0 gt {0,2} pred {0,1,2}; s1 gt {0} pred {2};
    # s2 gt {1} pred {1}; s3 gt {} pred {} (empty denominators count 0).
    precision, recall = (2 / 3 + 0 + 1 + 0) / 4, (1 + 0 + 1 + 0) / 4
    assert out["instance_accuracy"] == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)
    assert out["instance_precision"] == pytest.approx(precision)
    assert out["instance_recall"] == pytest.approx(recall)
    assert out["instance_f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_attribute_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(N, A\)"):
        attribute_metrics(torch.zeros(2, 3), torch.zeros(2, 4))


def test_mean_iou_over_a_dataset_excludes_absent_classes_and_ignored_pixels():
    first = confusion_matrix(
        torch.tensor([[0, 1, 0], [2, 2, -1]]), torch.tensor([[0, 1, 1], [2, -1, 0]]), 5
    )
    second = confusion_matrix(torch.tensor([[3]]), torch.tensor([[1]]), 5)
    out = segmentation_metrics(first + second, ["c0", "c1", "c2", "c3", "c4"])
    # c0: TP 1, 2 true, 2 predicted -> 1/3. c1: TP 1, 3 true, 1 predicted -> 1/3.
    # c2: TP 1 (the ignored pixel predicted 2 does not count) -> 1. c3: predicted once, never
    # true -> 0. c4: absent from both -> excluded. The pixel predicted -1 is a miss.
    assert out["per_class_iou"] == pytest.approx({"c0": 1 / 3, "c1": 1 / 3, "c2": 1.0, "c3": 0.0})
    assert out["mIoU"] == pytest.approx((1 / 3 + 1 / 3 + 1 + 0) / 4)
    assert out["pixel_accuracy"] == pytest.approx(3 / 6)
    assert out["absent_classes"] == ["c4"]


def test_confusion_matrix_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)


def test_pck_counts_labelled_keypoints_within_alpha_of_the_keypoint_box():
    target = torch.tensor(
        [
            [[10, 10, 2], [20, 10, 2], [10, 40, 1]],
            [[0, 0, 0], [5, 5, 2], [0, 0, 0]],  # one labelled keypoint: no box, skipped
        ],
        dtype=torch.float32,
    )
    predicted = torch.tensor([[[13, 14], [20, 17], [10, 40]], [[0, 0], [5, 5], [0, 0]]]).float()
    size = keypoint_box_size(target)
    assert size.tolist() == [30.0, 0.0]
    # Threshold 0.2 * 30 = 6 px: errors 5 (in), 7 (out), 0 (in).
    out = pck(predicted, target, size, alpha=0.2)
    assert out["PCK"] == pytest.approx(2 / 3)
    assert out["num_keypoints"] == 3 and out["num_skipped_people"] == 1
    assert out["per_keypoint"] == pytest.approx([1.0, 0.0, 1.0])
    # Visible only (visibility 2): the third keypoint no longer counts.
    visible = pck(predicted, target, torch.tensor([30.0, 30.0]), min_visibility=2)
    assert visible["PCK"] == pytest.approx(2 / 3)  # (13,14) in, (20,17) out, (5,5) in
    assert visible["num_keypoints"] == 3
