"""`clasp demo --ablation`: which part of the method buys which task.

On the demo's set and pseudo-labels (its synth, teacher and label stages, shared with a
demo run in the same folder), each variant below is pre-trained with every seed and
evaluated with the demo's frozen-feature protocols; the table gives mean +- std over seeds
per task. Runs go to OUT/ablation/<variant>-seed<s>/; a killed ablation resumes run by run.
Writes OUT/ablation/ablation.json and OUT/ablation/ablation.md.
"""

from __future__ import annotations

import os
import statistics
import time

from clasp.atomic import atomic_open

from .report import read_json, save_json
from .run import CLASP_OVERRIDES, Demo, Stages, evaluate, pretrain

# name -> (what the table calls it, pre-training overrides)
VARIANTS = {
    "sd": ("self-distillation only", ["model.moe.blocks=[]", "data.labels=null"]),
    "sd+part": ("+ part loss", ["model.moe.blocks=[]", "loss.attribute=0"]),
    "sd+attr": ("+ attribute loss", ["model.moe.blocks=[]", "loss.part=0"]),
    "sd+both": ("+ both losses", ["model.moe.blocks=[]"]),
    # Both losses and the MoE blocks, but the prompt neither routes nor modulates.
    "moe": (
        "+ MoE without prompts",
        ["model.prompt.routing=false", "model.prompt.modulation=none"],
    ),
    "clasp": ("full CLASP", []),
    # The demo's CLASP run: + image-text alignment with pseudo-label captions.
    "clasp+itc": ("full CLASP + image-text", CLASP_OVERRIDES),
}
FOLDER = "ablation"


def aggregate(results: dict) -> dict:
    """{variant: {protocol: {"mean", "std", "values"}}} from {variant: {seed: eval result}};
    std is the sample standard deviation over seeds (0 for one seed)."""
    table = {}
    for variant, by_seed in results.items():
        protocols = next(iter(by_seed.values())).keys()
        table[variant] = {}
        for protocol in protocols:
            values = [by_seed[s][protocol]["value"] for s in sorted(by_seed)]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            table[variant][protocol] = {
                "metric": next(iter(by_seed.values()))[protocol]["metric"],
                "mean": statistics.fmean(values),
                "std": std,
                "values": values,
            }
    return table


def markdown(table: dict, seeds: list[int]) -> str:
    """The results table: one row per variant, mean +- std (in %) per task."""
    protocols = list(next(iter(table.values())))
    metrics = {p: next(iter(table.values()))[p]["metric"] for p in protocols}
    header = " | ".join(f"{p} ({metrics[p]})" for p in protocols)
    lines = [f"| run | {header} |", "| --- |" + " ---: |" * len(protocols)]
    for variant, row in table.items():
        cells = " | ".join(
            f"{100 * row[p]['mean']:.1f} ± {100 * row[p]['std']:.1f}" for p in protocols
        )
        lines.append(f"| {VARIANTS[variant][0]} | {cells} |")
    lines.append("")
    lines.append(f"Mean ± sample std over seeds {', '.join(map(str, seeds))}, frozen features.")
    return "\n".join(lines)


def run_ablation(
    out: str = "runs/demo",
    config: str = "demo",
    *,
    scale: str = "default",
    force: bool = False,
    seed: int = 0,
    seeds: int = 3,
    threads: int = 2,
    workers: int = 1,
    pretrain_overrides: list[str] = (),
) -> dict:
    """Every variant x seed (pre-training seeds seed .. seed + seeds - 1) on the demo's data
    stages in `out`; returns ablation.json's content. Raises as `run_demo` does."""
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    demo = Demo(
        out, config, scale=scale, seed=seed, threads=threads, workers=workers,
        pretrain_overrides=pretrain_overrides,
    )  # fmt: skip
    folder = os.path.join(demo.out, FOLDER)
    seed_list = list(range(seed, seed + seeds))
    runs = {
        (variant, s): (
            os.path.join(folder, f"{variant}-seed{s}"),
            demo.pretrain_config(
                os.path.join(folder, f"{variant}-seed{s}"), [*overrides, f"seed={s}"]
            ),
        )  # fmt: skip
        for variant, (_, overrides) in VARIANTS.items()
        for s in seed_list
    }
    demo.open(force)
    start = time.perf_counter()
    demo.data_stages()
    os.makedirs(folder, exist_ok=True)
    # Each run is current while its own pre-training config is: another seed count or a new
    # variant reuses the runs already made.
    stages = Stages(folder, {**demo.settings, "seeds": seed_list}, {})
    results: dict = {v: {} for v in VARIANTS}
    for (variant, s), (run_dir, run_config) in runs.items():
        name = f"{variant}-seed{s}"
        result_file = os.path.join(run_dir, "eval.json")
        made_with = {"config": run_config}
        stages.run(name, lambda c=run_config: pretrain(c), made_with)
        stages.run(f"{name}-eval", lambda d=run_dir, f=result_file, n=name: save_json(
            f, evaluate({n: (os.path.join(d, "checkpoint.pt"), None)}, demo.paths["synth"],
                        d, matrix=False)[n],
        ), made_with)  # fmt: skip
        results[variant][s] = read_json(result_file)
    table = aggregate(results)
    text = markdown(table, seed_list)
    summary = {
        "table": table,
        "variants": {v: {"name": n, "overrides": o} for v, (n, o) in VARIANTS.items()},
        "seeds": seed_list,
        "settings": demo.settings,
        "seconds": time.perf_counter() - start,
    }
    save_json(os.path.join(folder, "ablation.json"), summary)
    with atomic_open(os.path.join(folder, "ablation.md")) as f:
        f.write(text + "\n")
    print("\n" + text)
    return summary
