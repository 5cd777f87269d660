"""The fine-tuning table of the README: every recipe from random init, self-distillation and
CLASP, taken from a `clasp demo` folder, on its synthetic split and on the real dev sets.

    python benchmarks/finetune_table.py --demo runs/demo --out runs/finetune-table \\
        [--data ../shared/data] [--steps 300] [--only reid] [--jobs 2]

For each row it runs `clasp finetune RECIPE --checkpoint DEMO/{clasp,baseline}/checkpoint.pt`
(random: `--checkpoint random --config DEMO/clasp/config.yaml`) with the recipe's default
config and `optim.steps=STEPS`, one training thread per run, and for re-ID also the
colour-histogram baseline (`clasp eval reid --checkpoint colour-histogram`). Finished runs
(their result.json) are kept, so a killed table resumes. Writes OUT/table.md and
OUT/table.json; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INITS = {"random": "random init", "baseline": "self-distillation", "clasp": "CLASP"}
# recipe -> [(set name, format, path relative to the demo folder or the data folder)]
SETS = {
    "reid": [("synth", "synth", "@demo/synth"), ("mini_market1501", "market", "mini_market1501"),
             ("col780_reid", "idfolder", "col780_reid")],
    "attributes": [("synth", "synth", "@demo/synth"), ("peta", "peta", "peta"),
                   ("mini_market1501", "market", "mini_market1501")],
    "parsing": [("synth", "synth", "@demo/synth"), ("ccp", "ccp", "ccp")],
    "pose": [("synth", "synth", "@demo/synth"), ("tiny_coco", "coco", "tiny_coco")],
}  # fmt: skip
# Quick-check settings: subsets of the large test splits keep a row within minutes on a CPU.
EXTRA = {("attributes", "peta"): ["data.max_eval_images=400"], ("parsing", "ccp"): [
    "data.max_eval_images=40"]}  # fmt: skip


def checkpoint_args(demo: str, init: str) -> list[str]:
    if init == "random":
        return ["--checkpoint", "random", "--config", os.path.join(demo, "clasp", "config.yaml")]
    return ["--checkpoint", os.path.join(demo, init, "checkpoint.pt")]


def run_one(command: list[str], out: str, log: str) -> dict:
    result = os.path.join(out, "result.json")
    if os.path.isfile(result):
        with open(result) as f:
            return json.load(f)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if code != 0:
        return {"error": f"exit {code}, see {log}"}
    with open(result) as f:
        value = json.load(f)
    value["wall_s"] = round(time.perf_counter() - start, 1)
    with open(result, "w") as f:
        json.dump(value, f)
    return value


def colour_histogram(root: str, fmt: str, out: str) -> dict:
    path = os.path.join(out, "result.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    command = [sys.executable, "-m", "clasp", "eval", "reid", "--checkpoint", "colour-histogram",
               "--data", root, "--format", fmt]  # fmt: skip
    text = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
    value = json.loads(text.strip().splitlines()[-1])
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f)
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="a `clasp demo --out` folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", nargs="*", default=None, help="recipes or recipe:set names")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    args = parser.parse_args()
    jobs, rows = [], []
    for recipe, sets in SETS.items():
        for name, fmt, where in sets:
            if args.only and recipe not in args.only and f"{recipe}:{name}" not in args.only:
                continue
            root = where.replace("@demo", args.demo) if where.startswith("@demo") else (
                os.path.join(args.data, where))  # fmt: skip
            row = {"recipe": recipe, "set": name, "format": fmt, "results": {}}
            rows.append(row)
            for init in INITS:
                out = os.path.join(args.out, recipe, name, init)
                os.makedirs(out, exist_ok=True)
                command = [sys.executable, "-m", "clasp", "finetune", recipe,
                           *checkpoint_args(args.demo, init), "--data", root, "--format", fmt,
                           "--out", out, "--overwrite", f"optim.steps={args.steps}",
                           "train.cpu_threads=1", "train.plot_every=0", "train.progress=false",
                           *EXTRA.get((recipe, name), [])]  # fmt: skip
                jobs.append((row, init, command, out, os.path.join(out, "log.txt")))
            if recipe == "reid":
                out = os.path.join(args.out, recipe, name, "colour-histogram")
                row["results"]["colour-histogram"] = colour_histogram(root, fmt, out)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [(row, init, pool.submit(run_one, c, o, log)) for row, init, c, o, log in jobs]
        for row, init, future in futures:
            row["results"][init] = future.result()
            r = row["results"][init]
            shown = r.get("error") or f"{r['metric']} {100 * r['value']:.1f} ({r.get('wall_s')} s)"
            print(f"{row['recipe']:10s} {row['set']:16s} {INITS[init]:18s} {shown}", flush=True)
    table = markdown(rows, args.steps)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(table)
    return 0


def markdown(rows: list[dict], steps: int) -> str:
    lines = [
        f"| recipe | set (format) | metric | random init | self-distillation | CLASP | "
        f"colour histogram | minutes per run ({steps} steps) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        results = row["results"]
        metric = next((r["metric"] for r in results.values() if "metric" in r), "?")

        def cell(key, results=results):
            r = results.get(key)
            if r is None:
                return ""
            return r.get("error", "error") if "value" not in r else f"{100 * r['value']:.1f}"

        times = [r["wall_s"] / 60 for k, r in results.items() if k in INITS and "wall_s" in r]
        minutes = f"{min(times):.1f}-{max(times):.1f}" if times else ""
        lines.append(
            f"| {row['recipe']} | {row['set']} ({row['format']}) | {metric} | {cell('random')} | "
            f"{cell('baseline')} | {cell('clasp')} | {cell('colour-histogram')} | {minutes} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
