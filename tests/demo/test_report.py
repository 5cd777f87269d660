"""The demo's results table: values in percent, CLASP's margin over the better baseline."""

import math

from clasp.demo.report import results_table
from clasp.eval.protocols import PROTOCOLS


def test_results_table_shows_percentages_and_margins_over_the_best_baseline():
    values = {"random": 0.1, "baseline": 0.4, "clasp": 0.5}
    results = {m: {p: {"value": v} for p in PROTOCOLS} for m, v in values.items()}
    results["clasp"]["pose"]["value"] = 0.3
    results["random"]["reid"]["value"] = math.nan  # nothing to score
    table, margins = results_table(results)
    assert margins["pose"] == 0.3 - 0.4 and margins["parsing"] == 0.5 - 0.4
    lines = table.splitlines()
    assert len(lines) == 2 + len(PROTOCOLS)
    assert "| parsing (mIoU) | 10.0 | 40.0 | 50.0 | +10.0 |" in lines
    assert "| pose (PCK) | 10.0 | 40.0 | 30.0 | -10.0 |" in lines
    assert any(line.startswith("| reid (mAP) | n/a |") for line in lines)
