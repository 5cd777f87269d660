import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    GRAPH_BELOW_S,
    append_result,
    environment,
    graph_median_seconds,
    measure_peaks,
    run_benchmark,
)

_written: set[str] = set()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def peaks(device):
    return measure_peaks(device)


@pytest.fixture
def measure(benchmark, device, peaks):
    """measure(fn, op=..., mode=..., backend=..., shape=..., dtype=..., bytes=..., flops=...)

    Times fn, derives achieved TB/s (from bytes) or TFLOP/s (from flops) and the fraction
    of the measured peak, and appends the entry to the results file at once (a run cut off
    later keeps it). On CUDA, calls under a millisecond are also timed as CUDA-graph
    replays (`graph_ms`, with the rates from that time), which leaves out the host's
    launch work; calls that cannot be captured say why in `graph_error`. The returned
    entry may be extended and passed to `measure.update(entry)`."""

    def _measure(fn, *, op, mode, backend, shape, dtype, bytes=None, flops=None):
        if backend == "triton" and device.type != "cuda":
            pytest.skip(
                "Triton kernels are timed on CUDA only (the interpreter is no speed target)"
            )
        seconds = run_benchmark(benchmark, fn, device)
        env = environment(device)
        entry = dict(
            op=op,
            mode=mode,
            backend=backend,
            shape=shape,
            dtype=str(dtype).removeprefix("torch."),
            median_ms=seconds * 1e3,
            **{k: env[k] for k in ("device", "driver", "torch", "triton")},
        )
        graph_seconds = None
        if device.type == "cuda" and seconds < GRAPH_BELOW_S:
            graph_seconds, error = graph_median_seconds(fn)
            entry["graph_ms"] = None if graph_seconds is None else graph_seconds * 1e3
            if error:
                entry["graph_error"] = error
        if bytes is not None:
            entry["tbps"] = bytes / seconds / 1e12
            entry["peak_tbps"] = peaks.copy_tbps  # runs merged into one file differ in peak
            entry["fraction_of_peak"] = entry["tbps"] / peaks.copy_tbps
            if graph_seconds:
                entry["graph_fraction_of_peak"] = bytes / graph_seconds / 1e12 / peaks.copy_tbps
        if flops is not None:
            entry["tflops"] = flops / seconds / 1e12
            entry["peak_tflops"] = peaks.matmul_tflops
            entry["fraction_of_peak"] = entry["tflops"] / peaks.matmul_tflops
            if graph_seconds:
                fraction = flops / graph_seconds / 1e12 / peaks.matmul_tflops
                entry["graph_fraction_of_peak"] = fraction
        benchmark.extra_info.update(entry)
        _measure.update(entry)
        return entry

    def _update(entry):
        _written.add(append_result(device, peaks, entry))

    _measure.update = _update
    return _measure


def pytest_sessionfinish(session, exitstatus):
    for path in sorted(_written):
        print(f"\nbenchmark results: {path}")
