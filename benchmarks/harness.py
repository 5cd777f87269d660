"""Side-by-side timing of backends, measured device peaks, and the results file.

Every benchmark times each backend of one op at one shape in the same run, converts the
median time into achieved TB/s or TFLOP/s, and divides by the device's peak measured in
the same session: copy bandwidth for memory-bound ops, dense matmul rate for GEMMs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass

import pytest
import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BACKENDS = ("triton", "eager", "compile")


def machine_shapes(shapes: dict) -> list:
    """The shapes this machine benchmarks: shapes["cuda"] with a GPU, else shapes["cpu"]."""
    return shapes["cuda" if torch.cuda.is_available() else "cpu"]


def cases(shapes, modes=("fwd", "fwd+bwd"), backends=BACKENDS) -> list:
    """pytest parameters (shape, mode, backend): every shape with every mode and backend. A
    shape is a tuple (its id joins the numbers with "x") or a pytest.param holding one."""
    params = []
    for shape in shapes:
        if type(shape) is tuple:  # not isinstance: a pytest.param is a tuple too
            value, name = shape, "x".join(map(str, shape))
        else:
            value, name = shape.values[0], shape.id
        for mode in modes:
            for backend in backends:
                params.append(pytest.param(value, mode, backend, id=f"{name}-{mode}-{backend}"))
    return params


@dataclass
class Peaks:
    copy_tbps: float  # device-to-device copy: read + write bytes per second
    matmul_tflops: float  # dense square matmul
    matmul_dtype: str


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        models = re.findall(r"model name\s*:\s*(.*)", f.read())
    return f"CPU {models[0].strip()} x{os.cpu_count()}" if models else f"CPU {platform.machine()}"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn, device: torch.device, *, min_time: float = 0.2, max_reps: int = 200
) -> float:
    """Median wall time of fn() in seconds, with the device synchronised around each batch."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-6)
    # Batch short calls so the host-side synchronisation does not dominate.
    inner = max(1, min(100, int(1e-3 / once)))
    reps = max(3, min(max_reps, int(min_time / (once * inner))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / inner)
    times.sort()
    return times[len(times) // 2]


def measure_peaks(device: torch.device) -> Peaks:
    if device.type == "cuda":
        n_bytes, n, dtype = 1 << 30, 8192, torch.bfloat16
    else:
        n_bytes, n, dtype = 1 << 26, 1024, torch.float32
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = median_seconds(lambda: a @ b, device)
    return Peaks(
        copy_tbps=2 * n_bytes / copy_s / 1e12,
        matmul_tflops=2 * n**3 / mm_s / 1e12,
        matmul_dtype=str(dtype).removeprefix("torch."),
    )


def run_benchmark(benchmark, fn, device: torch.device) -> float:
    """Time fn through pytest-benchmark (so its table and JSON see it); return median seconds."""
    seconds = median_seconds(fn, device)
    rounds = max(3, min(50, int(0.5 / max(seconds, 1e-6))))

    def synced():
        fn()
        synchronize(device)

    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=1, iterations=1)
    return seconds


def environment(device: torch.device, peaks: Peaks) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "peaks": asdict(peaks),
    }


def result_key(entry: dict) -> tuple:
    return (
        entry["op"],
        entry["mode"],
        entry["backend"],
        json.dumps(entry["shape"], sort_keys=True),
        entry["dtype"],
    )


def write_results(device: torch.device, peaks: Peaks, entries: list[dict]) -> str:
    """Merge entries into results/<device>-<date>.json (a rerun replaces matching entries).

    The file-level peaks are the latest run's; each entry keeps the peak it was divided by."""
    env = environment(device, peaks)
    path = os.path.join(RESULTS_DIR, f"{device_slug(device)}-{env['date']}.json")
    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = {result_key(e): e for e in json.load(f).get("results", [])}
    merged.update({result_key(e): e for e in entries})
    os.makedirs(RESULTS_DIR, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({**env, "results": list(merged.values())}, f, indent=1)
    os.replace(tmp, path)
    return path
