"""Data loading: a 2-worker DataLoader feeding the 128x64 multi-crop pipeline, and the
synthetic generator's speed on one core.

The loader entry is recorded with op="data_loader", backend="cpu": median_ms per batch,
images_per_s (wall clock), and fraction_of_peak = images_per_s / (workers x the
single-process rate of the same pipeline measured in the same run), i.e. how well the
workers scale. On a shared machine wall clock says as much about the neighbours as about
the pipeline, so the entry also holds cpu_ms_per_image, the CPU time that the workers and
the main process spent per image in one more epoch (from /proc), and
images_per_s_on_2_free_cores = 2 / that: what two cores of this CPU deliver when the
pipeline has them to itself (an upper bound: it assumes no idle time).
"""

import os
import time

import pytest
import torch
from harness import append_result
from torch.utils.data import DataLoader

from clasp.data.build import build_dataset
from clasp.data.collate import collate_samples
from clasp.data.synthetic import generate
from clasp.data.transforms import MultiCrop

SIZE, LOCAL_SIZE, PATCH = (128, 64), (64, 32), 16
N_GLOBAL, N_LOCAL = 2, 6
IDS, PER_ID, CAMERAS = 64, 8, 4
BATCH, WORKERS = 64, 2


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    """A generated set, timed: images per minute on one core."""
    root = str(tmp_path_factory.mktemp("bench_synth"))
    start = time.perf_counter()
    generate(root, IDS, PER_ID, CAMERAS, SIZE, seed=0, workers=1)
    seconds = time.perf_counter() - start
    return root, 60 * IDS * PER_ID / seconds


def multicrop() -> MultiCrop:
    # Part labels on the patch grid, as the part loss sees them in training.
    return MultiCrop(
        SIZE, LOCAL_SIZE, N_GLOBAL, N_LOCAL, label_keys={"parts": "patch"}, patch_size=PATCH
    )


def single_process_rate(dataset, batches: int = 4) -> float:
    """Images/s of read + multi-crop + collate in this process on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        collate_samples([dataset[i] for i in range(BATCH)])  # warm-up
        start = time.perf_counter()
        for b in range(batches):
            collate_samples([dataset[(b * BATCH + i) % len(dataset)] for i in range(BATCH)])
        return batches * BATCH / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_data_loader_multicrop(synth_set, benchmark, device, peaks):
    root, generated_per_minute = synth_set
    dataset = build_dataset("synth", root, "all", transform=multicrop())
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=WORKERS,
        collate_fn=collate_samples,
        persistent_workers=True,
        drop_last=True,
    )
    per_epoch = len(loader) * BATCH

    def epoch():
        seen = 0
        for batch in loader:
            seen += len(batch["index"])
        assert seen == per_epoch

    benchmark.pedantic(epoch, rounds=5, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median
    workers = [w.pid for w in loader._iterator._workers]  # persistent, started by the warm-up
    cpu_before = time.process_time() + sum(process_cpu_seconds(p) for p in workers)
    epoch()
    cpu_seconds = time.process_time() + sum(process_cpu_seconds(p) for p in workers) - cpu_before
    images_per_s = per_epoch / seconds
    one_process = single_process_rate(build_dataset("synth", root, "all", transform=multicrop()))
    entry = dict(
        op="data_loader",
        mode=f"multicrop-{N_GLOBAL}g{N_LOCAL}l",
        backend="cpu",
        shape=dict(H=SIZE[0], W=SIZE[1], batch=BATCH, workers=WORKERS, crops=N_GLOBAL + N_LOCAL),
        dtype="uint8",
        median_ms=seconds / len(loader) * 1e3,
        images_per_s=images_per_s,
        single_process_images_per_s=one_process,
        fraction_of_peak=images_per_s / (WORKERS * one_process),
        cpu_ms_per_image=cpu_seconds / per_epoch * 1e3,
        images_per_s_on_2_free_cores=2 * per_epoch / cpu_seconds,
        load_average=os.getloadavg()[0],
        synth_images_per_minute_one_core=generated_per_minute,
    )
    benchmark.extra_info.update(entry)
    path = append_result(device, peaks, entry)
    print(
        f"\ndata loader: {images_per_s:.0f} images/s with {WORKERS} workers "
        f"({one_process:.0f} images/s in one process; {cpu_seconds / per_epoch * 1e3:.2f} ms CPU "
        f"per image, {2 * per_epoch / cpu_seconds:.0f} images/s on 2 free cores; load average "
        f"{os.getloadavg()[0]:.1f}); synth generation "
        f"{generated_per_minute:.0f} images/minute on one core; recorded in {path}"
    )
