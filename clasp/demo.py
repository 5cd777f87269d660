"""`clasp demo`: the whole method end to end on a synthetic set, on a CPU, in minutes.

    clasp demo [--out runs/demo] [--scale default|tiny] [--force]

Stages, each timed against a budget and skipped when an earlier run finished it (a killed
demo resumes; a run with other settings starts over):
  synth     synthetic pedestrians with full ground truth; identities split in halves:
            train (teacher fit, pre-training, probe training) and test (probe testing, re-ID)
  teacher   fit the offline open_clip teacher on the train identities (`clasp teacher fit`)
  label     the teacher's part and attribute pseudo-labels (`clasp label`), their quality
            against the ground truth of the train identities, and part-label overlays
  clasp     pre-train CLASP: PC-MoE ViT, self-distillation + part + attribute losses
  baseline  pre-train self-distillation alone: the same ViT, dense MLPs, no pseudo-labels
  eval      frozen features of random-init, self-distillation and CLASP backbones on re-ID,
            attributes, parsing and pose (CLASP under each task's prompt), and CLASP's
            task x prompt matrix
Writes into --out: results.md (the table), summary.json, loss_curves.png,
part_labels.png, task_prompt_matrix.png, and each stage's own outputs in its folder.
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
MODELS = ("random", "baseline", "clasp")
MODEL_NAMES = {"random": "random init", "baseline": "self-distillation", "clasp": "CLASP"}
# Seconds each stage should take at the default scale on 2 CPU cores (12 minutes in all).
BUDGET_S = {"synth": 25, "teacher": 100, "label": 20, "clasp": 230, "baseline": 200, "eval": 120}
SCALES = {
    "default": {
        "synth": {"ids": 200, "images_per_id": 8, "cameras": 4},
        "teacher": ["steps=180", "batch_size=64", "max_seconds=120"],
        "pretrain": ["optim.steps=150", "data.batch_size=32"],
    },
    # A smoke test: every stage on a handful of images and a tiny model.
    "tiny": {
        "synth": {"ids": 8, "images_per_id": 4, "cameras": 2},
        "teacher": [
            "steps=3", "batch_size=4", "model.embed_dim=16", "model.vision_cfg.width=32",
            "model.vision_cfg.layers=1", "model.vision_cfg.head_width=16",
            "model.text_cfg.width=32", "model.text_cfg.layers=1", "model.text_cfg.heads=2",
        ],
        "pretrain": [
            "optim.steps=2", "optim.warmup_steps=1", "data.batch_size=4", "model.depth=2",
            "model.kernels=reference",  # eager MoE: no Triton interpreter under the tests
            "model.embed_dim=32", "model.num_heads=2", "heads.dino.out_dim=64",
            "heads.dino.hidden_dim=64", "heads.dino.bottleneck_dim=32", "crops.n_local=2",
            "train.checkpoint_every=2", "train.plot_every=2", "train.log_every=1",
        ],
    },
}  # fmt: skip
# The self-distillation baseline: the same ViT with dense MLPs and no pseudo-label losses.
BASELINE_OVERRIDES = ["model.moe.blocks=[]", "data.labels=null"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--config", default=os.path.join(REPO_CONFIGS, "demo.yaml"), help="pre-training config"
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=1, help="data loading processes")
    parser.add_argument(
        "pretrain_overrides", nargs="*", metavar="key=value",
        help="extra overrides for both pre-training runs, e.g. optim.steps=600",
    )  # fmt: skip


def _run_cli(argv: list[str]) -> None:
    from clasp.cli import main

    code = main(argv)
    if code:
        raise SystemExit(f"clasp demo: `clasp {' '.join(argv)}` failed with exit status {code}")


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    from clasp.eval.cli import json_ready

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(json_ready(value), f, indent=1)
    os.replace(tmp, path)


class Stages:
    """Runs named stages once, times them against their budget, skips finished ones."""

    def __init__(self, out: str, settings: dict, budgets: dict):
        self.out, self.budgets, self.seconds = out, budgets, {}
        self.path = os.path.join(out, "stages.json")
        state = _read_json(self.path) if os.path.exists(self.path) else {}
        if state and state.get("settings") != settings:
            print(f"[demo] {out} holds a run with other settings: starting over")
            state = {}
        self.state = {"settings": settings, "done": state.get("done", {})}

    def run(self, name: str, fn) -> None:
        budget = self.budgets.get(name)
        if name in self.state["done"]:
            self.seconds[name] = self.state["done"][name]
            print(f"[demo] {name}: finished by an earlier run ({self.seconds[name]:.0f} s)")
            return
        print(f"[demo] {name} (budget {budget} s) ...", flush=True)
        start = time.perf_counter()
        fn()
        self.seconds[name] = self.state["done"][name] = time.perf_counter() - start
        _write_json(self.path, self.state)
        print(f"[demo] {name}: {self.seconds[name]:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# Stages


def fit_teacher(synth: str, out: str, overrides: list[str], threads: int, workers: int) -> dict:
    from clasp.config import load_config
    from clasp.teacher.fit import FIT_DEFAULTS, fit

    config = load_config(FIT_DEFAULTS, None, [*overrides, f"workers={workers}"])
    config["threads"] = threads
    return fit(synth, out, config, log=lambda line: print(f"[demo]   {line.strip()}"))


def pseudo_label_quality(synth: str, labels: str) -> dict:
    """The cached pseudo-labels of the train identities' images against their ground truth:
    the labels CLASP actually trains on (see `clasp.eval.pseudo_labels`)."""
    import torch

    from clasp.data.build import build_dataset
    from clasp.eval.pseudo_labels import label_quality
    from clasp.teacher.cache import LabelCache, file_sha256

    cache = LabelCache(labels)
    dataset = build_dataset("synth", synth, "train")
    grids, masks, soft, target = [], [], [], []
    for index in range(len(dataset)):
        cached = cache.get(file_sha256(dataset.paths[index]))
        if cached is None:
            continue
        sample = dataset.load(index)
        grids.append(cached["parts"].long())
        masks.append(sample["parts"])
        soft.append(cached["attributes"].float())
        target.append(sample["attributes"])
    if not grids:
        raise ValueError(f"none of the train images of {synth} is in the label cache {labels}")
    return label_quality(grids, masks, torch.stack(soft), torch.stack(target), cache)


def overlay_sheet(folder: str, path: str, columns: int = 8) -> str | None:
    """The first `columns` part-label overlays of `clasp label --visualize` side by side."""
    from PIL import Image

    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))[:columns]
    if not names:
        return None
    tiles = [Image.open(os.path.join(folder, n)).convert("RGB") for n in names]
    width = sum(t.width for t in tiles)
    sheet = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width
    sheet.save(path)
    return path


def plot_curves(out: str, path: str) -> str:
    """Teacher fit losses, and pre-training losses of CLASP beside self-distillation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clasp.train.metrics import MetricsLog

    def read_jsonl(p):
        return [json.loads(line) for line in open(p)] if os.path.exists(p) else []

    teacher = read_jsonl(os.path.join(out, "teacher", "fit_history.jsonl"))
    logs = {name: os.path.join(out, name, "metrics.jsonl") for name in ("clasp", "baseline")}
    runs = {name: MetricsLog.read(p) if os.path.exists(p) else [] for name, p in logs.items()}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.17, top=0.88, wspace=0.25)
    for key in ("clip", "attributes", "parts", "prompts"):
        points = [(r["step"], r[key]) for r in teacher if key in r]
        if points:
            axes[0].plot(*zip(*points, strict=True), lw=1, label=key)
    axes[0].set_title("offline teacher fit")
    for name, records in runs.items():
        points = [(r["step"], r["dino"]) for r in records if "dino" in r]
        if points:
            axes[1].plot(*zip(*points, strict=True), lw=1.2, label=MODEL_NAMES[name])
    axes[1].set_title("self-distillation (DINO) loss")
    for key in ("part", "attribute", "load_balance"):
        points = [(r["step"], r[key]) for r in runs["clasp"] if key in r]
        if points:
            axes[2].plot(*zip(*points, strict=True), lw=1.2, label=key)
    axes[2].set_title("CLASP pseudo-label and router losses")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate(models: dict, synth: str, out: str, weights: str = "student") -> dict:
    """Every protocol on the synthetic split for each backbone (a CLASP backbone under the
    protocol's own task prompt); CLASP's task x prompt matrix to out."""
    from clasp.eval.cli import matrix_table, plot_matrix
    from clasp.eval.features import FeatureBank, load_encoder
    from clasp.eval.protocols import PROTOCOLS, SetLoader, run_protocol, task_prompt_matrix

    results, loader = {}, None
    for name, (checkpoint, config) in models.items():
        start = time.perf_counter()
        encoder = load_encoder(checkpoint, config, seed=0, weights=weights)
        bank = FeatureBank(encoder)
        loader = loader or SetLoader(bank.size)
        results[name] = {}
        for protocol in PROTOCOLS:
            task = protocol if protocol in bank.tasks else None
            result = run_protocol(protocol, bank, loader, "synth", synth, task)
            results[name][protocol] = result
            print(
                f"[demo]   {MODEL_NAMES[name]:<17} {protocol:<10} {result['metric']:<4} "
                f"{100 * result['value']:5.1f}"
            )
        if name == "clasp" and bank.tasks:
            matrix = task_prompt_matrix(bank, loader, synth)
            print(matrix_table(matrix))
            _write_json(os.path.join(out, "task_prompt_matrix.json"), matrix)
            plot_matrix(matrix, os.path.join(out, "task_prompt_matrix.png"), "CLASP: task x prompt")
        print(f"[demo]   {MODEL_NAMES[name]} evaluated in {time.perf_counter() - start:.0f} s")
    return results


# ---------------------------------------------------------------------------------------------
# Report


def _pct(value) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{100 * value:.1f}")
    )


def results_table(results: dict) -> tuple[str, dict]:
    """The markdown table (values in %) and per task: margin over the best baseline."""
    from clasp.eval.protocols import PRIMARY_METRIC, PROTOCOLS

    lines = [
        "| task (metric) | random init | self-distillation | CLASP | CLASP - best baseline |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    margins = {}
    for protocol in PROTOCOLS:
        values = [results[m][protocol]["value"] for m in MODELS]
        margin = values[2] - max(values[0], values[1])
        margins[protocol] = margin
        cells = " | ".join(_pct(v) for v in values)
        metric = PRIMARY_METRIC[protocol]
        lines.append(f"| {protocol} ({metric}) | {cells} | {100 * margin:+.1f} |")
    return "\n".join(lines), margins


def report(out: str, results: dict, stage_seconds: dict, total_seconds: float) -> str:
    table, margins = results_table(results)
    wins = sum(m > 0 for m in margins.values())
    labels = _read_json(os.path.join(out, "pseudo_label_quality.json"))
    teacher = _read_json(os.path.join(out, "teacher", "fit.json")).get("quality", {})
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in stage_seconds.items())
    lines = [
        "## CLASP demo: synthetic pedestrians, frozen-feature probes on unseen identities",
        "",
        table,
        "",
        f"CLASP beats both baselines on {wins} of {len(margins)} tasks. Re-ID: mAP of "
        "test-identity queries against the other test images; attributes, parsing and pose: "
        "linear probes trained on the train identities, scored on the test identities.",
        "",
        "Pseudo-labels CLASP trained on (train identities, against ground truth): part pixel "
        f"accuracy {_pct(labels['part_pixel_accuracy'])}% (all-background: "
        f"{_pct(labels['majority_baseline'])}%), part mIoU {_pct(labels['part_mIoU'])}%, "
        f"attribute mA {_pct(labels['attribute_mA'])}% (chance 50%). The offline teacher on "
        f"held-out identities: part mIoU {_pct(teacher.get('part_mIoU'))}%, attribute mA "
        f"{_pct(teacher.get('attribute_mA'))}%. It was fitted to the train identities' "
        "captions, attributes and part masks, so it stands in for a CLIP that knows the domain.",
        "",
        f"Stage times: {timing}; this run {total_seconds:.0f} s.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def main(args: argparse.Namespace) -> int:
    import torch

    from clasp.teacher.cache import file_sha256

    if not os.path.isfile(args.config):
        raise SystemExit(f"clasp demo: config file not found: {args.config}")
    scale = SCALES[args.scale]
    out = os.path.abspath(args.out)
    if args.force and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(args.threads)
    paths = {k: os.path.join(out, k) for k in ("synth", "teacher", "labels", "clasp", "baseline")}
    settings = {
        "scale": args.scale, "config": os.path.abspath(args.config), "seed": args.seed,
        "pretrain_overrides": args.pretrain_overrides,
        "config_sha256": file_sha256(args.config),  # an edited config starts over too
    }  # fmt: skip
    budgets = BUDGET_S if args.scale == "default" else {}
    stages = Stages(out, settings, budgets)
    total = time.perf_counter()
    synth = scale["synth"]

    stages.run("synth", lambda: _run_cli([
        "synth", "--out", paths["synth"], "--ids", str(synth["ids"]), "--images-per-id",
        str(synth["images_per_id"]), "--cameras", str(synth["cameras"]), "--seed",
        str(args.seed), "--workers", "2", "--force",
    ]))  # fmt: skip
    stages.run("teacher", lambda: fit_teacher(
        paths["synth"], paths["teacher"], [*scale["teacher"], f"seed={args.seed}"],
        args.threads, args.workers,
    ))  # fmt: skip

    def label():
        _run_cli([
            "label", "--images", os.path.join(paths["synth"], "images"), "--out",
            paths["labels"], "--teacher", paths["teacher"], "--visualize", "8",
            "--no-progress", "--workers", str(args.workers), "--backend", "reference",
        ])  # fmt: skip
        quality = pseudo_label_quality(paths["synth"], paths["labels"])
        _write_json(os.path.join(out, "pseudo_label_quality.json"), quality)
        overlay_sheet(
            os.path.join(paths["labels"], "visualize"), os.path.join(out, "part_labels.png")
        )

    stages.run("label", label)
    common = [
        f"data.root={paths['synth']}", f"seed={args.seed}", f"data.num_workers={args.workers}",
        f"train.cpu_threads={args.threads}", *scale["pretrain"], *args.pretrain_overrides,
    ]  # fmt: skip
    stages.run("clasp", lambda: _run_cli([
        "pretrain", "--config", args.config, f"output_dir={paths['clasp']}",
        f"data.labels={paths['labels']}", *common,
    ]))  # fmt: skip
    stages.run("baseline", lambda: _run_cli([
        "pretrain", "--config", args.config, f"output_dir={paths['baseline']}", *common,
        *BASELINE_OVERRIDES,
    ]))  # fmt: skip

    models = {
        "random": ("random", os.path.join(paths["clasp"], "config.yaml")),
        "baseline": (os.path.join(paths["baseline"], "checkpoint.pt"), None),
        "clasp": (os.path.join(paths["clasp"], "checkpoint.pt"), None),
    }

    def run_eval():
        _write_json(os.path.join(out, "eval.json"), evaluate(models, paths["synth"], out))

    stages.run("eval", run_eval)
    results = _read_json(os.path.join(out, "eval.json"))
    plot_curves(out, os.path.join(out, "loss_curves.png"))
    text = report(out, results, stages.seconds, time.perf_counter() - total)
    print("\n" + text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    _, margins = results_table(results)
    _write_json(os.path.join(out, "summary.json"), {
        "results": {m: {p: r["metrics"] for p, r in v.items()} for m, v in results.items()},
        "primary": {m: {p: r["value"] for p, r in v.items()} for m, v in results.items()},
        "margins_over_best_baseline": margins,
        "wins": sum(v > 0 for v in margins.values()),
        "pseudo_label_quality": _read_json(os.path.join(out, "pseudo_label_quality.json")),
        "teacher": _read_json(os.path.join(paths["teacher"], "fit.json")),
        "stage_seconds": stages.seconds,
        "settings": settings,
    })  # fmt: skip
    print(
        f"\n[demo] outputs in {out}: results.md, summary.json, loss_curves.png, "
        "part_labels.png, task_prompt_matrix.png"
    )
    return 0
