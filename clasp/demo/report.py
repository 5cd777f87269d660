"""What the demo shows: the results table, the markdown report, summary.json and pictures
(loss curves, part-label overlays)."""

from __future__ import annotations

import json
import math
import os

from clasp.atomic import atomic_open, write_json
from clasp.eval.report import json_ready, own_prompt_margins

MODELS = ("random", "baseline", "clasp")  # the backbones compared, in table order
MODEL_NAMES = {"random": "random init", "baseline": "self-distillation", "clasp": "CLASP"}
OUTPUTS = ("results.md", "summary.json", "loss_curves.png", "part_labels.png",
           "task_prompt_matrix.png")  # fmt: skip


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def save_json(path: str, value) -> None:
    """`value` as strict JSON (NaN -> null), written atomically."""
    write_json(path, json_ready(value))


def overlay_sheet(folder: str, path: str, columns: int = 8) -> str | None:
    """The first `columns` part-label overlays of the labeler's `visualize` folder side by
    side in one PNG."""
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


STEER_POINTS = 0.5  # an own-prompt margin that counts as the prompt steering its task


def prompt_summary(out: str) -> dict:
    """{} without out/task_prompt_matrix.json, else per task the own prompt's margin over the
    best other prompt (points) and how many tasks it leads by at least STEER_POINTS."""
    path = os.path.join(out, "task_prompt_matrix.json")
    if not os.path.exists(path):
        return {}
    margins = own_prompt_margins(read_json(path))
    return {
        "own_minus_best_other": margins,
        "steered": sum(m >= STEER_POINTS for m in margins.values()),
    }


def report(out: str, results: dict, stage_seconds: dict, total_seconds: float) -> str:
    """The markdown report of a finished run in `out`: the table, pseudo-label quality, times."""
    table, margins = results_table(results)
    wins = sum(m > 0 for m in margins.values())
    labels = read_json(os.path.join(out, "pseudo_label_quality.json"))
    teacher = read_json(os.path.join(out, "teacher", "fit.json")).get("quality", {})
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in stage_seconds.items())
    prompts = prompt_summary(out)
    steering = (
        "Task x prompt matrix (task_prompt_matrix.png): own prompt minus the best other prompt, "
        + ", ".join(f"{p} {m:+.2f}" for p, m in prompts["own_minus_best_other"].items())
        + f" points; ahead by at least {STEER_POINTS} points on {prompts['steered']} of "
        f"{len(prompts['own_minus_best_other'])} tasks."
        if prompts
        else "No task x prompt matrix (the CLASP backbone has no task prompts)."
    )
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
        steering,
        "",
        f"Stage times: {timing}; this run {total_seconds:.0f} s.",
    ]
    return "\n".join(lines)


def summary(out: str, results: dict, stage_seconds: dict, settings: dict) -> dict:
    """summary.json: every metric, the primary ones, CLASP's margins, the pseudo-label and
    teacher reports, stage times and the run's settings."""
    _, margins = results_table(results)
    return {
        "results": {m: {p: r["metrics"] for p, r in v.items()} for m, v in results.items()},
        "primary": {m: {p: r["value"] for p, r in v.items()} for m, v in results.items()},
        "margins_over_best_baseline": margins,
        "wins": sum(v > 0 for v in margins.values()),
        "task_prompt": prompt_summary(out),
        "pseudo_label_quality": read_json(os.path.join(out, "pseudo_label_quality.json")),
        "teacher": read_json(os.path.join(out, "teacher", "fit.json")),
        "stage_seconds": stage_seconds,
        "settings": settings,
    }


def write_report(
    out: str, results: dict, stage_seconds: dict, total_seconds: float, settings: dict
) -> str:
    """loss_curves.png, results.md and summary.json into `out`; returns the markdown."""
    plot_curves(out, os.path.join(out, "loss_curves.png"))
    text = report(out, results, stage_seconds, total_seconds)
    with atomic_open(os.path.join(out, "results.md")) as f:
        f.write(text + "\n")
    save_json(os.path.join(out, "summary.json"), summary(out, results, stage_seconds, settings))
    return text
