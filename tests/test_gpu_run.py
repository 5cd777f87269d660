"""The GPU run's plan (`benchmarks/gpu.sh`), checked on the CPU: phases in order within the
budget, the hard time limit, the row order of the benchmarks and the test-outcome summary."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_run  # noqa: E402

GPU_SH = os.path.join(ROOT, "benchmarks", "gpu.sh")
PHASE_LINE = re.compile(r"phase (\d): (.+?)\s+budget\s+([\d.]+) s\s+ends by\s+([\d.]+) s")


def dry_run(*args: str, env=None) -> str:
    out = subprocess.run(
        ["bash", GPU_SH, "--dry-run", *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("budget", [None, 300])
def test_dry_run_prints_the_phases_in_order_within_the_budget(budget):
    text = dry_run(*([] if budget is None else ["--budget", str(budget)]))
    total = 480 if budget is None else budget
    phases = PHASE_LINE.findall(text)
    names = [name for _, name, _, _ in phases]
    assert names == ["setup", "kernel tests", "warm", "kernel benchmarks", "training step"]
    budgets = [float(b) for _, _, b, _ in phases]
    ends = [float(e) for _, _, _, e in phases]
    assert abs(sum(budgets) - total) < 1 and ends == sorted(ends) and ends[-1] <= total
    assert "CLASP_AUTOTUNE=0" in text and "bf16/fp16 and fp32" in text
    # Kernel benchmarks come after the tests and before the training step and labelling.
    assert text.index("test_train_step") > text.index("bench_moe.py")


def test_gpu_sh_runs_itself_under_a_timeout_of_the_budget_plus_a_minute(tmp_path):
    """A stand-in `timeout` on PATH records what gpu.sh asks of it."""
    fake = tmp_path / "timeout"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CLASP_GPU_SH_TIMED"}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    for args, limit in (([], 540), (["--budget", "300"], 360), (["--budget=200"], 260)):
        subprocess.run(["bash", GPU_SH, *args], env=env, check=True, timeout=60)
        recorded = (tmp_path / "args").read_text().split()
        assert recorded[recorded.index("--kill-after=15") + 1] == str(limit)
        assert recorded[-len(args) - 1 :] == [GPU_SH, *args][-len(args) - 1 :]


def test_plan_shares_add_up_and_refuses_a_tiny_budget(capsys):
    rows = gpu_run.plan(480)
    assert sum(seconds for _, seconds, _ in rows) == pytest.approx(480, abs=0.5)
    assert rows[-1][2] == pytest.approx(480, abs=0.5)
    assert gpu_run.main(["--budget", "10"]) == 2
    assert "--budget must be at least" in capsys.readouterr().out


def test_benchmark_rows_run_triton_and_eager_first_and_compile_last():
    ids = [
        "bench_routing.py::test_route[256x129x768x8-fwd-compile]",
        "bench_routing.py::test_route[256x129x768x8-fwd-triton]",
        "bench_moe.py::test_moe_mlp[vitb-E8-fwd-grouped_mm]",
        "bench_routing.py::test_route[256x129x768x8-fwd-eager]",
        "bench_moe.py::test_moe_mlp[vitb-E8-fwd-triton]",
    ]
    backends = [i.rsplit("-", 1)[1].rstrip("]") for i in gpu_run.ordered(ids)]
    assert backends == ["triton", "triton", "eager", "grouped_mm", "compile"]
    assert gpu_run.ordered(ids)[0] == ids[1]  # ties keep the collection order


def test_outcome_summary_counts_failures_and_tests_cut_off(tmp_path):
    path = tmp_path / "outcomes.jsonl"
    lines = [
        {"id": "a", "when": "call", "outcome": "passed"},
        {"id": "b", "when": "call", "outcome": "failed", "message": "AssertionError: x"},
        {"id": "b", "when": "teardown", "outcome": "passed"},
        {"id": "c", "when": "setup", "outcome": "skipped"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = gpu_run.summarise_outcomes(str(path), ["a", "b", "c", "d"])
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 1, 1)
    assert summary["not_run"] == 1 and summary["failures"][0]["id"] == "b"


def test_source_tree_makes_clasp_kernels_importable_without_an_install(tmp_path):
    """What gpu.sh relies on when the GPU machine has no install of this package."""
    code = (
        "import sys\n"
        "installed = lambda f: 'Editable' in getattr(f, '__name__', '')\n"
        "sys.meta_path = [f for f in sys.meta_path if not installed(f)]\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('clasp') is None\n"
        "import source_tree, clasp.kernels\n"
        "print(clasp.kernels.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "benchmarks"))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.join(ROOT, "kernels", "__init__.py")
