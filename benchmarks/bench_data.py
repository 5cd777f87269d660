"""Data loading: a 2-worker DataLoader feeding the 128x64 multi-crop pipeline, and the
synthetic generator's speed on one core.

The loader entry is recorded with op="data_loader", backend="cpu": median_ms per batch,
images_per_s, and fraction_of_peak = images_per_s / (workers x the single-process rate of
the same pipeline measured in the same run), i.e. how well the workers scale.
"""

import time

import pytest
import torch
from harness import write_results
from torch.utils.data import DataLoader

from clasp.data.build import build_dataset
from clasp.data.synthetic import generate
from clasp.data.transforms import MultiCrop, collate_samples

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
        synth_images_per_minute_one_core=generated_per_minute,
    )
    benchmark.extra_info.update(entry)
    path = write_results(device, peaks, [entry])
    print(
        f"\ndata loader: {images_per_s:.0f} images/s with {WORKERS} workers "
        f"({one_process:.0f} images/s in one process); synth generation "
        f"{generated_per_minute:.0f} images/minute on one core; recorded in {path}"
    )
