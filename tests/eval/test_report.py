"""The task x prompt matrix's presentation: differences from the own prompt on one scale."""

import math

from clasp.eval.report import own_prompt_differences, own_prompt_margins, plot_matrix

MATRIX = {
    "prompts": ["reid", "parsing", "generic"],
    "protocols": ["reid", "parsing", "other"],
    "metrics": ["mAP", "mIoU", "x"],
    "values": [[0.50, 0.48, 0.5004], [0.20, 0.25, math.nan], [0.1, 0.3, 0.2]],
}


def test_differences_are_points_from_the_own_prompt_or_the_rows_best():
    diff = own_prompt_differences(MATRIX)
    assert [round(d, 6) for d in diff[0]] == [0.0, -2.0, 0.04]
    assert [round(d, 6) for d in diff[1][:2]] == [-5.0, 0.0] and math.isnan(diff[1][2])
    assert [round(d, 6) for d in diff[2]] == [-20.0, 0.0, -10.0]  # no own prompt: the best


def test_margins_are_the_own_prompt_over_the_best_other_skipping_nan():
    margins = own_prompt_margins(MATRIX)
    assert set(margins) == {"reid", "parsing"}  # "other" has no prompt of its name
    assert round(margins["reid"], 6) == -0.04 and round(margins["parsing"], 6) == 5.0


def test_plot_matrix_writes_a_png(tmp_path):
    path = plot_matrix(MATRIX, str(tmp_path / "m.png"), noise=0.5)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
