import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import measure_peaks, run_benchmark, write_results  # noqa: E402

_entries: list[dict] = []
_state: dict = {}


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def peaks(device):
    _state["device"] = device
    _state["peaks"] = measure_peaks(device)
    return _state["peaks"]


@pytest.fixture
def measure(benchmark, device, peaks):
    """measure(fn, op=..., mode=..., backend=..., shape=..., dtype=..., bytes=..., flops=...)

    Times fn, derives achieved TB/s (from bytes) or TFLOP/s (from flops) and the fraction
    of the measured peak, and records the entry for the results file."""

    def _measure(fn, *, op, mode, backend, shape, dtype, bytes=None, flops=None):
        if backend == "triton" and device.type != "cuda":
            pytest.skip(
                "Triton kernels are timed on CUDA only (the interpreter is no speed target)"
            )
        seconds = run_benchmark(benchmark, fn, device)
        entry = dict(
            op=op,
            mode=mode,
            backend=backend,
            shape=shape,
            dtype=str(dtype).removeprefix("torch."),
            median_ms=seconds * 1e3,
        )
        if bytes is not None:
            entry["tbps"] = bytes / seconds / 1e12
            entry["peak_tbps"] = peaks.copy_tbps  # runs merged into one file differ in peak
            entry["fraction_of_peak"] = entry["tbps"] / peaks.copy_tbps
        if flops is not None:
            entry["tflops"] = flops / seconds / 1e12
            entry["peak_tflops"] = peaks.matmul_tflops
            entry["fraction_of_peak"] = entry["tflops"] / peaks.matmul_tflops
        benchmark.extra_info.update(entry)
        _entries.append(entry)
        return entry

    return _measure


def pytest_sessionfinish(session, exitstatus):
    if _entries:
        path = write_results(_state["device"], _state["peaks"], _entries)
        print(f"\nbenchmark results: {path}")
