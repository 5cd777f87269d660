"""Side-by-side timing of backends, measured device peaks, and the results file.

Every benchmark times each backend of one op at one shape in the same run, converts the
median time into achieved TB/s or TFLOP/s, and divides by the device's peak measured in
the same session: copy bandwidth for memory-bound ops, dense matmul rate for GEMMs.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass

import pytest
import torch

from clasp.atomic import write_json

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


# Plain timings under this also get a CUDA-graph timing: for small ops the host's launch
# work (custom op, autograd, allocations, Triton's launcher) can be most of the plain time.
GRAPH_BELOW_S = 1e-3


def graph_median_seconds(fn) -> tuple[float | None, str | None]:
    """Median time of fn() replayed from a captured CUDA graph, or (None, why not): ops
    that synchronise with the host (e.g. `.tolist()`, `bincount`) cannot be captured."""
    import triton.testing

    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as error:  # capture fails in many ways, all meaning "not capturable"
        torch.cuda.synchronize()
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return ms / 1e3, None


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


def driver_version(device: torch.device) -> str | None:
    """The NVIDIA driver's version (nvidia-smi), else the CUDA driver API version."""
    if device.type != "cuda":
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        version = torch._C._cuda_getDriverVersion()
        return f"CUDA driver API {version // 1000}.{version % 1000 // 10}"
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def environment(device: torch.device) -> dict:
    """Device, driver and library versions: written into every entry and the file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "driver": driver_version(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
    }


def result_key(entry: dict) -> tuple:
    return (
        entry["op"],
        entry["mode"],
        entry["backend"],
        json.dumps(entry["shape"], sort_keys=True),
        entry["dtype"],
    )


def results_path(device: torch.device) -> str:
    """$CLASP_RESULTS_FILE, else <$CLASP_RESULTS_DIR or results/>/<device>-<date>.json."""
    if os.environ.get("CLASP_RESULTS_FILE"):
        return os.environ["CLASP_RESULTS_FILE"]
    directory = os.environ.get("CLASP_RESULTS_DIR") or RESULTS_DIR
    return os.path.join(directory, f"{device_slug(device)}-{environment(device)['date']}.json")


def _read(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def append_result(device: torch.device, peaks: Peaks, entry: dict) -> str:
    """Merge one entry into the results file now (a rerun replaces the matching entry), so
    a run cut off later keeps everything measured so far. The file-level peaks are the
    latest session's; each entry keeps the peak it was divided by."""
    path = results_path(device)
    data = _read(path)
    merged = {result_key(e): e for e in data.get("results", [])}
    merged[result_key(entry)] = entry
    data.update(environment(device), peaks=asdict(peaks), results=list(merged.values()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, data)
    return path


def record_section(path: str, name: str, value, env: dict) -> None:
    """Store a non-benchmark section (e.g. the kernel tests' outcome) in a results file,
    with the `environment` it was measured in."""
    data = _read(path)
    data.update({k: v for k, v in env.items() if k not in data}, **{name: value})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, data)
