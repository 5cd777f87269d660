"""pytest plugin of `benchmarks/gpu.sh`'s phases (`-p gpu_pytest_plugin`, with benchmarks/ on
PYTHONPATH).

- Makes `clasp` and `clasp.kernels` importable from this source tree when the package is not
  installed (`source_tree`).
- Appends each test's outcome as one JSON line to $CLASP_OUTCOMES as soon as it is known,
  so a phase killed by its time limit still says which tests passed or failed.
"""

from __future__ import annotations

import json
import os

import source_tree  # noqa: F401  (makes clasp.kernels importable)


def pytest_runtest_logreport(report):
    path = os.environ.get("CLASP_OUTCOMES")
    if not path:
        return
    # One line per test: its call outcome, or the setup/teardown outcome when that failed
    # or skipped it.
    if report.when == "call" or report.outcome != "passed":
        line = {"id": report.nodeid, "when": report.when, "outcome": report.outcome}
        if report.outcome == "failed":
            line["message"] = str(report.longrepr).strip().splitlines()[-1][:300]
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
