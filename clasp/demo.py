"""`clasp demo`: the whole method end to end on a synthetic set, on a CPU, in minutes.

Stages, each timed and skipped when its output already exists (so a killed demo resumes):
  synth     generate identities x cameras of synthetic pedestrians with full ground truth
  teacher   fit the offline open_clip teacher on the set's captions and labels
  label     the teacher's part and attribute pseudo-labels for every image (+ overlays)
  clasp     pre-train CLASP: PC-MoE ViT, DINO + part + attribute losses
  baseline  pre-train self-distillation alone: the same ViT, no MoE, no pseudo-labels
  eval      frozen-feature re-ID, attributes, parsing and pose of random-init, baseline
            and CLASP backbones, and CLASP's task x prompt matrix
Writes into --out: summary.json, results.md, and the PNGs (loss curves, part-label overlays,
task x prompt matrix).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import clasp

REPO_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(clasp.__file__))), "configs"
)
SCALES = {
    "default": dict(ids=200, images_per_id=8, cameras=4, teacher_seconds=60, steps=150, batch=32),
    "tiny": dict(ids=12, images_per_id=4, cameras=2, teacher_seconds=5, steps=4, batch=8),
}
MODELS = ("random", "baseline", "clasp")
PROTOCOL_TASK = {"reid": "reid", "attributes": "attributes", "parsing": "parsing", "pose": "pose"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--config", default=os.path.join(REPO_CONFIGS, "demo.yaml"))
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--steps", type=int, default=None, help="pre-training steps per model")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--seed", type=int, default=0)


def _run_cli(argv: list[str]) -> None:
    from clasp.cli import main

    code = main(argv)
    if code:
        raise SystemExit(f"clasp demo: `clasp {' '.join(argv)}` failed with exit status {code}")


class Stages:
    """Runs named stages once, records their wall time, and skips finished ones."""

    def __init__(self, out: str, force: bool):
        self.out, self.force, self.seconds = out, force, {}
        self.done_path = os.path.join(out, "stages.json")
        self.done = (
            {} if force or not os.path.exists(self.done_path) else _read_json(self.done_path)
        )

    def run(self, name: str, fn) -> None:
        if name in self.done:
            print(f"[demo] {name}: done in an earlier run ({self.done[name]:.0f} s), skipped")
            self.seconds[name] = self.done[name]
            return
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        fn()
        self.seconds[name] = self.done[name] = time.perf_counter() - start
        _write_json(self.done_path, self.done)
        print(f"[demo] {name}: {self.seconds[name]:.0f} s", flush=True)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def evaluate(models: dict[str, tuple[str, str | None]], synth: str, out: str) -> dict:
    """Every protocol on the synthetic test split for each backbone; CLASP under its matching
    task prompt. Returns {model: {protocol: metrics}} and writes the task x prompt matrix."""
    from clasp.eval.cli import json_ready, matrix_table, plot_matrix
    from clasp.eval.features import FeatureBank, load_encoder
    from clasp.eval.protocols import PROTOCOLS, SetLoader, run_protocol, task_prompt_matrix

    results, loader = {}, None
    for name, (checkpoint, config) in models.items():
        encoder = load_encoder(checkpoint, config, seed=0)
        bank = FeatureBank(encoder)
        loader = loader or SetLoader(bank.size)
        results[name] = {}
        for protocol in PROTOCOLS:
            task = PROTOCOL_TASK[protocol] if bank.tasks else None
            result = run_protocol(protocol, bank, loader, "synth", synth, task)
            results[name][protocol] = json_ready(result["metrics"])
            print(
                f"[demo]   {name:<9} {protocol:<11} {result['metric']} {100 * result['value']:.1f}"
            )
        if name == "clasp":
            matrix = task_prompt_matrix(bank, loader, synth)
            print(matrix_table(matrix))
            _write_json(os.path.join(out, "task_prompt_matrix.json"), json_ready(matrix))
            plot_matrix(matrix, os.path.join(out, "task_prompt_matrix.png"))
    return results


def results_table(results: dict) -> str:
    from clasp.eval.protocols import PRIMARY_METRIC, PROTOCOLS

    lines = [
        "| task (metric) | random init | self-distillation | CLASP | CLASP - best baseline |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for protocol in PROTOCOLS:
        metric = PRIMARY_METRIC[protocol]
        values = [results[m][protocol][metric] for m in MODELS]
        cells = ["n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}" for v in values]
        margin = 100 * (values[2] - max(values[0], values[1]))
        lines.append(f"| {protocol} ({metric}) | " + " | ".join(cells) + f" | {margin:+.1f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    scale = SCALES[args.scale]
    steps = args.steps or scale["steps"]
    out = os.path.abspath(args.out)
    if args.force and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, k) for k in ("synth", "teacher", "labels", "clasp", "baseline")}
    stages = Stages(out, args.force)
    total = time.perf_counter()

    stages.run("synth", lambda: _run_cli([
        "synth", "--out", paths["synth"], "--ids", str(scale["ids"]), "--images-per-id",
        str(scale["images_per_id"]), "--cameras", str(scale["cameras"]), "--seed", str(args.seed),
        "--workers", "2", "--force",
    ]))  # fmt: skip

    def fit_teacher():
        from clasp.config import load_config
        from clasp.teacher.fit import FIT_DEFAULTS, fit

        config = load_config(FIT_DEFAULTS, None, [f"max_seconds={scale['teacher_seconds']}"])
        summary = fit(paths["synth"], paths["teacher"], config)
        _write_json(os.path.join(out, "teacher_quality.json"), summary.get("quality", {}))

    stages.run("teacher", fit_teacher)
    stages.run("label", lambda: _run_cli([
        "label", "--images", os.path.join(paths["synth"], "images"), "--out", paths["labels"],
        "--teacher", paths["teacher"], "--visualize", "8", "--no-progress",
    ]))  # fmt: skip
    common = [
        f"data.root={paths['synth']}",
        f"optim.steps={steps}",
        f"seed={args.seed}",
        f"data.batch_size={scale['batch']}",
    ]
    stages.run("clasp", lambda: _run_cli([
        "pretrain", "--config", args.config, f"output_dir={paths['clasp']}",
        f"data.labels={paths['labels']}", *common,
    ]))  # fmt: skip
    stages.run("baseline", lambda: _run_cli([
        "pretrain", "--config", args.config, f"output_dir={paths['baseline']}",
        "model.moe.blocks=[]", *common,
    ]))  # fmt: skip

    models = {
        "random": ("random", args.config),
        "baseline": (os.path.join(paths["baseline"], "checkpoint.pt"), None),
        "clasp": (os.path.join(paths["clasp"], "checkpoint.pt"), None),
    }
    results = {}

    def run_eval():
        results.update(evaluate(models, paths["synth"], out))
        _write_json(os.path.join(out, "eval.json"), results)

    stages.run("eval", run_eval)
    results = results or _read_json(os.path.join(out, "eval.json"))
    quality = _read_json(os.path.join(out, "teacher_quality.json"))
    table = results_table(results)
    timing = " | ".join(f"{k} {v:.0f} s" for k, v in stages.seconds.items())
    report = "\n".join([
        "## CLASP demo on synthetic pedestrians (frozen features, synthetic test identities)",
        "", table, "",
        "Pseudo-label quality of the teacher against ground truth (held-out images): part pixel "
        f"accuracy {100 * quality.get('part_pixel_accuracy', float('nan')):.1f}% "
        f"(all-background {100 * quality.get('majority_baseline', float('nan')):.1f}%), part mIoU "
        f"{100 * quality.get('part_mIoU', float('nan')):.1f}%, attribute mA "
        f"{100 * quality.get('attribute_mA', float('nan')):.1f}%.",
        "", f"Stage times: {timing}; total {time.perf_counter() - total:.0f} s this run.",
    ])  # fmt: skip
    print("\n" + report)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report + "\n")
    _write_json(os.path.join(out, "summary.json"), {
        "results": results, "teacher_quality": quality, "stage_seconds": stages.seconds,
        "steps": steps, "scale": scale,
    })  # fmt: skip
    print(f"\n[demo] outputs in {out}: results.md, summary.json, task_prompt_matrix.png, "
          "clasp/losses.png, labels/ overlays")  # fmt: skip
    return 0
