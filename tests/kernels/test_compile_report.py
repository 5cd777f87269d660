"""The hot kernels compiled ahead of time for H100 (sm_90) and A100 (sm_80), without a GPU:
no register spills in the largest kept tile of each, tensor cores and async copies in every
GEMM's main loop, shared memory within the device's limit. `benchmarks/compile_report.py
--quick` does the compiling (in a subprocess: it must run without TRITON_INTERPRET)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = os.path.join(ROOT, "benchmarks", "compile_report.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
HOT_GEMMS = ("fc1", "grouped_mm_act_bwd", "wgrad")
LIMITS = {"sm_90": 232448, "sm_80": 166912}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")
    run = subprocess.run(
        [sys.executable, REPORT, "--quick", "--arch", "sm_90", "sm_80", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())["records"]


def test_every_hot_kernel_was_compiled_for_both_architectures(records):
    compiled = {(r["role"], r["arch"]) for r in records}
    for role in (*HOT_GEMMS, "route_fwd"):
        for arch in LIMITS:
            assert (role, arch) in compiled, f"{role} was not compiled for {arch}"


def test_hot_kernels_do_not_spill(records):
    spilled = [
        f"{r['role']} {r['arch']} {r['config']}: {r['spill_bytes']} B" for r in records
        if r["spill_bytes"]
    ]  # fmt: skip
    assert not spilled, "register spills in kept configs: " + "; ".join(spilled)


def test_gemm_main_loops_use_tensor_cores_and_async_copies(records):
    for r in records:
        if r["role"] in HOT_GEMMS or r["role"] == "route_fwd":
            expected = "HGMMA" if r["arch"] == "sm_90" else "HMMA"
            assert r["tensor_cores"] and r["mma_kind"] == expected, (r["role"], r["arch"])
            assert r["async_copies"], f"{r['role']} {r['arch']}: operands not by cp.async/TMA"
            assert r["loop_spills"] == 0


def test_kept_configs_fit_the_shared_memory(records):
    for r in records:
        assert r["shared_bytes"] <= LIMITS[r["arch"]], (r["role"], r["arch"], r["config"])
