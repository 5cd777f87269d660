"""Print a results file as a table.

    python benchmarks/report.py [results/FILE.json] [--markdown]

Without a file, the newest in results/. --markdown prints a Markdown table (for the README)."""

import glob
import json
import os
import sys

from harness import RESULTS_DIR

COLUMNS = (
    "op", "shape", "dtype", "mode", "backend", "ms", "graph ms", "rate", "of peak", "vs eager",
)  # fmt: skip
RIGHT = {"ms", "graph ms", "rate", "of peak", "vs eager"}


def rate_text(entry: dict) -> str:
    if "tbps" in entry:
        tbps = entry["tbps"]
        return f"{tbps:.2f} TB/s" if tbps >= 0.1 else f"{tbps * 1e3:.1f} GB/s"
    if "tflops" in entry:
        tflops = entry["tflops"]
        return f"{tflops:.1f} TFLOP/s" if tflops >= 0.1 else f"{tflops * 1e3:.1f} GFLOP/s"
    return "-"


def graph_text(entry: dict) -> str:
    if entry.get("graph_ms") is not None:
        return f"{entry['graph_ms']:.3f}"
    return "n/a" if "graph_error" in entry else "-"


def table_rows(results: list[dict]) -> list[tuple[str, ...]]:
    """One row per entry, sorted by op, shape, mode and backend; speed-ups against eager
    (plain time against plain time). graph ms: the same call replayed from a CUDA graph."""

    def key(e):
        return (e["op"], json.dumps(e["shape"]), e["dtype"], e["mode"])

    rows = sorted(results, key=lambda e: (*key(e), e["backend"]))
    eager = {key(e): e["median_ms"] for e in rows if e["backend"] == "eager"}
    out = []
    for e in rows:
        base = eager.get(key(e))
        out.append((
            e["op"], ",".join(f"{k}={v}" for k, v in e["shape"].items()), e["dtype"],
            e["mode"], e["backend"], f"{e['median_ms']:.3f}", graph_text(e), rate_text(e),
            f"{e['fraction_of_peak']:.0%}", f"{base / e['median_ms']:.2f}x" if base else "-",
        ))  # fmt: skip
    return out


def main(argv: list[str]) -> int:
    markdown = "--markdown" in argv
    files = [a for a in argv if a != "--markdown"]
    newest = max(glob.glob(os.path.join(RESULTS_DIR, "*.json")), key=os.path.getmtime, default=None)
    path = files[0] if files else newest
    if path is None:
        raise SystemExit(f"no results in {RESULTS_DIR}: run `make bench` first")
    with open(path) as f:
        data = json.load(f)
    driver = f"  driver {data['driver']}" if data.get("driver") else ""
    print(
        f"{data.get('device')}{driver}  torch {data.get('torch')}  triton {data.get('triton')}  "
        f"{data.get('date')}"
    )
    peaks = data.get("peaks")
    if peaks:
        print(
            f"measured peaks: copy {peaks['copy_tbps'] * 1e3:.1f} GB/s, "
            f"{peaks['matmul_dtype']} matmul {peaks['matmul_tflops']:.3f} TFLOP/s\n"
        )
    tests = data.get("kernel_tests")
    if tests:
        print(
            f"kernel tests (compiled): {tests['passed']} passed, {tests['failed']} failed, "
            f"{tests['skipped']} skipped, {tests['not_run']} not run\n"
        )
    rows = table_rows([e for e in data.get("results", []) if "median_ms" in e])
    if not rows:
        print("no benchmark rows")
        return 0
    if markdown:
        print("| " + " | ".join(COLUMNS) + " |")
        print("| " + " | ".join("---:" if c in RIGHT else "---" for c in COLUMNS) + " |")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return 0
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]

    def line(cells):
        return "  ".join(
            cell.rjust(w) if name in RIGHT else cell.ljust(w)
            for name, cell, w in zip(COLUMNS, cells, widths, strict=True)
        )

    print(line(COLUMNS))
    for row in rows:
        print(line(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
