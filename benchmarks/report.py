"""Print a results file as a table: `python benchmarks/report.py [results/FILE.json]`."""

import glob
import json
import os
import sys

from harness import RESULTS_DIR


def rate_text(entry: dict) -> str:
    if "tbps" in entry:
        tbps = entry["tbps"]
        return f"{tbps:.2f} TB/s" if tbps >= 0.1 else f"{tbps * 1e3:.1f} GB/s"
    if "tflops" in entry:
        return f"{entry['tflops']:.2f} TFLOP/s"
    return "-"


def main(argv: list[str]) -> int:
    path = (
        argv[0]
        if argv
        else max(glob.glob(os.path.join(RESULTS_DIR, "*.json")), key=os.path.getmtime)
    )
    with open(path) as f:
        data = json.load(f)
    peaks = data["peaks"]
    print(f"{data['device']}  torch {data['torch']}  triton {data['triton']}  {data['date']}")
    print(
        f"measured peaks: copy {peaks['copy_tbps']:.3f} TB/s, "
        f"{peaks['matmul_dtype']} matmul {peaks['matmul_tflops']:.1f} TFLOP/s"
    )
    rows = sorted(
        data["results"], key=lambda e: (e["op"], json.dumps(e["shape"]), e["mode"], e["backend"])
    )
    eager = {
        (e["op"], json.dumps(e["shape"]), e["mode"], e["dtype"]): e["median_ms"]
        for e in rows
        if e["backend"] == "eager"
    }
    print(
        f"{'op':<16}{'shape':<34}{'mode':<9}{'backend':<9}"
        f"{'ms':>9}{'rate':>14}{'of peak':>9}{'vs eager':>10}"
    )
    for e in rows:
        shape = ",".join(f"{k}={v}" for k, v in e["shape"].items())
        rate = rate_text(e)
        base = eager.get((e["op"], json.dumps(e["shape"]), e["mode"], e["dtype"]))
        speedup = f"{base / e['median_ms']:.2f}x" if base else "-"
        print(
            f"{e['op']:<16}{shape:<34}{e['mode']:<9}{e['backend']:<9}{e['median_ms']:>9.3f}{rate:>14}{e['fraction_of_peak']:>8.0%}{speedup:>10}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
