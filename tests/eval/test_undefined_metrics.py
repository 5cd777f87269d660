"""Re-ID on a subset where no query has a match from another camera says why and exits 2,
instead of printing mAP=nan."""

import json

from clasp.cli import main as clasp_main


def test_reid_with_no_valid_query_exits_2_saying_why(synth_set, tiny_config, capsys):
    argv = ["eval", "reid", "--checkpoint", "random", "--config", tiny_config,
            "--data", synth_set, "--format", "synth"]  # fmt: skip
    # 6 of the 24 test images, evenly spaced: one image of each of the 6 test identities.
    assert clasp_main([*argv, "--max-images", "6"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("clasp eval: re-ID on synth") and "\n" not in err, err
    assert "none of the" in err and "another camera" in err and "--max-images 6" in err
    assert "nan" not in captured.out
    # The whole split has valid queries: a number, not NaN.
    assert clasp_main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = result["metrics"]
    assert metrics["num_valid_queries"] > 0 and 0 <= metrics["mAP"] <= 1
