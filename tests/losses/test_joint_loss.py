"""Joint pseudo-labels (where two body parts meet in the part labels) and their spatial
softmax loss, against the junctions and the cross-entropy written out by hand."""

import pytest
import torch

from clasp.losses import JointLoss, part_pairs
from tests.utils import assert_close

NAMES = ["head", "background", "torso", "legs"]  # background need not be class 0


def test_part_pairs_are_the_pairs_of_body_parts():
    assert part_pairs(NAMES) == [(0, 2), (0, 3), (2, 3)]
    assert part_pairs(["background", "person"]) == []
    with pytest.raises(ValueError, match="at least two body-part classes"):
        JointLoss(part_pairs(["background", "person"]))


def labels_and_junctions():
    # A figure: head over torso over legs, one unlabelled patch (-1) inside the torso.
    labels = torch.tensor(
        [
            [1, 0, 1],
            [1, 2, 1],
            [2, -1, 2],
            [3, 3, 1],
        ]
    )
    head_torso = torch.zeros(4, 3, dtype=torch.bool)
    head_torso[0, 1] = head_torso[1, 1] = True  # the head patch and the torso below it
    torso_legs = torch.zeros(4, 3, dtype=torch.bool)
    # The left torso patch and the leg below it; the right torso patch touches background
    # and the unlabelled patch only, and the right leg patch has that patch above it.
    torso_legs[2, 0] = torso_legs[3, 0] = True
    return labels, {(0, 2): head_torso, (0, 3): torch.zeros(4, 3, dtype=torch.bool),
                    (2, 3): torso_legs}  # fmt: skip


def test_junctions_mark_the_patches_where_two_parts_touch():
    from clasp.losses.joint_loss import junctions

    labels, want = labels_and_junctions()
    pairs = part_pairs(NAMES)
    got = junctions(labels[None], pairs)[0]
    for k, pair in enumerate(pairs):
        assert torch.equal(got[..., k], want[pair]), pair


def test_joint_loss_is_the_cross_entropy_of_a_softmax_over_patches():
    labels, want = labels_and_junctions()
    pairs = part_pairs(NAMES)
    logits = torch.randn(2, 4, 3, len(pairs), dtype=torch.float64, requires_grad=True)
    batch = torch.stack([labels, torch.full_like(labels, 1)])  # the second: all background
    loss, has_joint = JointLoss(pairs)(logits, batch)
    assert has_joint.tolist() == [True, False] and loss[1] == 0
    terms = []
    for k, pair in enumerate(pairs):
        target = want[pair].flatten().double()
        if target.sum() == 0:
            continue  # the pair does not meet: it does not count
        log_p = logits[0, ..., k].flatten().log_softmax(0)
        terms.append(-(target / target.sum() * log_p).sum())
    assert_close(loss[0], torch.stack(terms).mean())
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().max() == 0
    with pytest.raises(ValueError, match="do not match"):
        JointLoss(pairs)(logits[..., :2], batch)
