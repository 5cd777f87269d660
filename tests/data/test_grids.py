"""Pixel masks reduced to patch grids by majority vote."""

import torch

from clasp.data.grids import grid_labels


def test_grid_labels_take_the_majority_and_skip_ignored_pixels():
    mask = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 2, 1, -1],
            [-1, -1, 3, 3],
            [-1, -1, 3, 2],
        ]
    )
    assert grid_labels(mask, (2, 2), 4).tolist() == [[0, 1], [-1, 3]]


def test_grid_labels_match_a_per_cell_vote_on_random_masks():
    classes, (gh, gw), (ch, cw) = 5, (4, 3), (6, 5)  # 24 x 15 mask, 6 x 5 pixels per cell
    mask = torch.randint(-1, classes, (gh * ch, gw * cw))
    mask[:ch, :cw] = -1  # one cell with no labelled pixel
    expected = torch.full((gh, gw), -1)
    for i in range(gh):
        for j in range(gw):
            cell = mask[i * ch : (i + 1) * ch, j * cw : (j + 1) * cw]
            counts = torch.bincount(cell[cell >= 0], minlength=classes)
            if counts.sum() > 0:
                expected[i, j] = int(counts.argmax())  # ties: the lowest class
    assert torch.equal(grid_labels(mask, (gh, gw), classes), expected)
    assert expected[0, 0] == -1
