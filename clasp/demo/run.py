"""The demo's stages, each timed against a budget and skipped when an earlier run finished it
(a killed demo resumes; a run with other settings redoes the stages those settings change):

  synth     synthetic pedestrians with full ground truth; identities split in halves:
            train (teacher fit, pre-training, probe training) and test (probe testing, re-ID)
  teacher   fit the offline open_clip teacher on the train identities (`clasp teacher fit`)
  label     the teacher's part and attribute pseudo-labels (`clasp label`), their quality
            against the ground truth of the train identities, and part-label overlays
  clasp     pre-train CLASP: PC-MoE ViT, self-distillation + part + attribute losses and
            image-text alignment with captions from the attribute pseudo-labels
  baseline  pre-train self-distillation alone: the same ViT, dense MLPs, no pseudo-labels
  eval      frozen features of random-init, self-distillation and CLASP backbones on re-ID,
            attributes, parsing and pose (CLASP under each task's prompt), and CLASP's
            task x prompt matrix

Each stage calls the function its command calls, with the settings the command would build.
Writes into the output folder: results.md (the table), summary.json, loss_curves.png,
part_labels.png, task_prompt_matrix.png, and each stage's own outputs in its folder.

The output folder must be new, empty, hold only what a demo writes, or be one a demo made
(it has stages.json); any other folder is refused. `force` removes only the demo's own
folders and files, by name (`DEMO_ENTRIES`); anything else in the folder stays.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import time

from clasp import RANDOM_WEIGHTS
from clasp.atomic import TMP_MARK

from .report import MODEL_NAMES, OUTPUTS, overlay_sheet, read_json, save_json, write_report

# Seconds each stage should take at the default scale on 2 CPU cores (12 minutes in all).
BUDGET_S = {"synth": 25, "teacher": 100, "label": 20, "clasp": 200, "baseline": 160, "eval": 200}
SCALES = {
    "default": {
        "synth": {"ids": 200, "images_per_id": 8, "cameras": 4},
        "teacher": ["steps=180"],  # no time cap: the same fit on any machine
        "pretrain": [],  # the demo config's own steps and batch
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
# CLASP's run also aligns its class token with captions built from the teacher's attribute
# pseudo-labels, embedded by the teacher's text tower (image-text alignment).
CLASP_OVERRIDES = ["loss.image_text=1.0", "data.captions=labels"]
# The self-distillation baseline: the same ViT with dense MLPs and no pseudo-label losses.
BASELINE_OVERRIDES = ["model.moe.blocks=[]", "data.labels=null"]
OVERLAYS = 8  # part-label overlays written by the label stage
# The prompt-mix sweep of the evaluation; its end points are cells of the task x prompt matrix.
MIX, MIX_STEPS = ("reid", "parsing"), 5


STAGES_FILE = "stages.json"
STAGE_FOLDERS = ("synth", "teacher", "labels", "clasp", "baseline")
# Everything the demo writes at the top of its output folder (and temporaries of these).
DEMO_ENTRIES = (
    *STAGE_FOLDERS, STAGES_FILE, "eval.json", "pseudo_label_quality.json",
    "task_prompt_matrix.json", "prompt_mix.json", "prompt_mix.png", "ablation", *OUTPUTS,
)  # fmt: skip


class OutputFolderError(ValueError):
    """The output folder holds files that are not a demo's."""


def _is_demo_entry(name: str) -> bool:
    return name.split(TMP_MARK)[0] in DEMO_ENTRIES


def check_output_folder(out: str) -> None:
    """Raise OutputFolderError unless the demo may write into `out` (see the module doc).

    Why not only remove the demo's names: in a folder no demo made, `clasp/`, `labels/` or
    `synth/` may be the user's own (`--out .` in a project), so a name alone does not say
    that the demo wrote it; such a folder is refused before anything is written or removed.
    """
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise OutputFolderError(f"--out {out} is a file, not a folder; choose a folder")
    if os.path.isfile(os.path.join(out, STAGES_FILE)):  # a demo made it
        return
    others = sorted(name for name in os.listdir(out) if not _is_demo_entry(name))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise OutputFolderError(
            f"--out {out} holds files that are not a demo's ({shown}); the demo writes "
            f"{', '.join(STAGE_FOLDERS)} and its report there: choose a new or empty folder"
        )


def remove_demo_outputs(out: str) -> list[str]:
    """Delete what a demo wrote in `out` (`DEMO_ENTRIES`, by name), nothing else; returns
    the names removed."""
    removed = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if not _is_demo_entry(name):
            continue
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(name)
    return removed


class StageInterrupted(RuntimeError):
    """A stage stopped before its end (pre-training on SIGINT / SIGTERM); it is not marked
    finished, so the next run redoes it."""


class Stages:
    """Runs named stages once, times them against their budget, and skips those an earlier
    run finished with the same settings. Each stage is recorded with the settings it depends
    on (`run(..., depends_on=)`, all of the run's by default), so a run with other
    pre-training settings redoes pre-training but keeps the synthetic set and its labels."""

    def __init__(self, out: str, settings: dict, budgets: dict):
        self.out, self.budgets, self.seconds = out, budgets, {}
        self.settings = settings
        self.path = os.path.join(out, STAGES_FILE)
        state = read_json(self.path) if os.path.exists(self.path) else {}
        done = state.get("done", {})
        # A record without per-stage settings: every stage was run with its "settings". A
        # stage is current when the settings it was run with agree on those it depends on.
        made_with = state.get("made_with", {name: state.get("settings") for name in done})
        self.state = {"settings": settings, "done": done, "made_with": made_with}

    def run(self, name: str, fn, depends_on: dict | None = None) -> None:
        budget = self.budgets.get(name)
        wanted = self.settings if depends_on is None else depends_on
        if name in self.state["done"]:
            made_with = self.state["made_with"].get(name) or {}
            if all(made_with.get(k, object()) == v for k, v in wanted.items()):
                self.seconds[name] = self.state["done"][name]
                print(f"[demo] {name}: finished by an earlier run ({self.seconds[name]:.0f} s)")
                return
            print(f"[demo] {name}: an earlier run had other settings; running it again")
        print(f"[demo] {name}" + (f" (budget {budget} s)" if budget else "") + " ...", flush=True)
        start = time.perf_counter()
        fn()
        self.seconds[name] = self.state["done"][name] = time.perf_counter() - start
        self.state["made_with"][name] = wanted
        save_json(self.path, self.state)
        print(f"[demo] {name}: {self.seconds[name]:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# Stages


def synthesize(out: str, ids: int, images_per_id: int, cameras: int, seed: int) -> dict:
    """The synthetic set (`clasp synth --force`, the command's other defaults)."""
    from clasp.data.synthetic import generate

    start = time.perf_counter()
    meta = generate(out, ids, images_per_id, cameras, seed=seed, workers=2, overwrite=True)
    print(
        f"[demo]   wrote {meta['num_images']} images of {meta['ids']} identities from "
        f"{cameras} cameras in {time.perf_counter() - start:.1f} s"
    )
    return meta


def fit_teacher(synth: str, out: str, overrides: list[str], threads: int, workers: int) -> dict:
    """The offline teacher (`clasp teacher fit` with these overrides), with its held-out
    pseudo-label quality."""
    from clasp.config import load_config
    from clasp.eval.pseudo_labels import teacher_quality
    from clasp.teacher.fit import FIT_DEFAULTS, fit

    config = load_config(FIT_DEFAULTS, None, [*overrides, f"workers={workers}"])
    config["threads"] = threads
    log = lambda line: print(f"[demo]   {line.strip()}")
    return fit(synth, out, config, log=log, quality=teacher_quality)


def label(synth: str, teacher_dir: str, labels: str, out: str, workers: int) -> dict:
    """The teacher's pseudo-labels of every synthetic image (`clasp label --teacher DIR
    --visualize 8 --backend reference`), their quality against the ground truth of the train
    identities (to out/pseudo_label_quality.json) and a sheet of overlays (part_labels.png)."""
    import torch

    from clasp.eval.pseudo_labels import cache_quality
    from clasp.teacher.labeling import label_folder
    from clasp.teacher.loading import load_teacher
    from clasp.vocabulary import load_prompts

    device = "cuda" if torch.cuda.is_available() else "cpu"  # as `clasp label`
    teacher = load_teacher(teacher_dir, device=device)
    report = label_folder(
        os.path.join(synth, "images"), labels, teacher, load_prompts(), workers=workers,
        backend="reference", progress=False, visualize=OVERLAYS,
    )  # fmt: skip
    print(
        f"[demo]   labelled {report.labelled} images in {report.seconds:.1f} s, "
        f"{report.already_cached} already cached, {len(report.unreadable)} unreadable"
    )
    quality = cache_quality(labels, synth, "train")
    save_json(os.path.join(out, "pseudo_label_quality.json"), quality)
    overlay_sheet(os.path.join(labels, "visualize"), os.path.join(out, "part_labels.png"))
    return quality


def pretrain(config: dict) -> None:
    """One pre-training run (`clasp pretrain`) from a config of `build_config`. The demo owns
    its run folders: a run killed with this config resumes from its checkpoint, a run made
    with another config is replaced."""
    from clasp.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from clasp.train.trainer import train

    config = copy.deepcopy(config)
    checkpoint = os.path.join(config["output_dir"], CHECKPOINT_NAME)
    earlier = load_checkpoint(checkpoint)["config"] if os.path.isfile(checkpoint) else None
    if earlier is not None and _same_run(earlier, config):
        config["train"]["resume"] = "auto"
    else:
        config["train"]["overwrite"] = True
    result = train(config)
    if result.stopped_by is not None:
        raise StageInterrupted(
            f"pre-training in {config['output_dir']} stopped by {result.stopped_by} at step "
            f"{result.step}; run the demo again to continue it"
        )


def _same_run(a: dict, b: dict) -> bool:
    def run_settings(config: dict) -> dict:
        train = {k: v for k, v in config["train"].items() if k not in ("resume", "overwrite")}
        return {**config, "train": train}

    return run_settings(a) == run_settings(b)


def evaluate(
    models: dict, synth: str, out: str, weights: str = "student", matrix: bool = True
) -> dict:
    """Every protocol on the synthetic split for each backbone {name: (checkpoint, config)}
    (a backbone with task prompts under the protocol's own); with `matrix`, the "clasp"
    backbone's task x prompt matrix and its re-ID -> parsing prompt mix to out."""
    from clasp.eval.features import FeatureBank, load_encoder, task_key
    from clasp.eval.protocols import (
        PROTOCOLS,
        SetLoader,
        prompt_mix_curve,
        run_protocol,
        task_prompt_matrix,
    )
    from clasp.eval.report import matrix_table, plot_matrix, plot_prompt_mix

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
                f"[demo]   {MODEL_NAMES.get(name, name):<17} {protocol:<10} {result['metric']:<4} "
                f"{100 * result['value']:5.1f}"
            )
        if matrix and name == "clasp" and bank.tasks:
            own = {(p, task_key(r["task"])): r["value"] for p, r in results[name].items()}
            table = task_prompt_matrix(bank, loader, synth, known=own)
            print(matrix_table(table))
            save_json(os.path.join(out, "task_prompt_matrix.json"), table)
            plot_matrix(table, os.path.join(out, "task_prompt_matrix.png"), "CLASP: task x prompt")
            if {"reid", "parsing"} <= set(bank.tasks):
                curve = prompt_mix_curve(bank, loader, synth, *MIX, steps=MIX_STEPS, matrix=table)
                save_json(os.path.join(out, "prompt_mix.json"), curve)
                plot_prompt_mix(
                    curve, os.path.join(out, "prompt_mix.png"), "CLASP: the prompt mixed"
                )
        print(
            f"[demo]   {MODEL_NAMES.get(name, name)} evaluated in "
            f"{time.perf_counter() - start:.0f} s"
        )
    return results


# ---------------------------------------------------------------------------------------------
# The whole demo


class Demo:
    """The settings of one demo folder: its paths, the pre-training configs of both runs and
    the stages record. Bad settings raise before anything is written (see `run_demo`)."""

    def __init__(
        self, out: str, config: str, *, scale: str, seed: int, threads: int, workers: int,
        pretrain_overrides: list[str],
    ):  # fmt: skip
        from clasp.config import resolve_config
        from clasp.teacher.cache import file_sha256

        if scale not in SCALES:
            raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
        self.config_file = os.path.abspath(resolve_config(config))
        self.scale, self.sizes, self.seed = scale, SCALES[scale], seed
        self.threads, self.workers = threads, workers
        self.out = os.path.abspath(out)
        self.paths = {k: os.path.join(self.out, k) for k in STAGE_FOLDERS}
        self.common = [
            f"data.root={self.paths['synth']}", f"seed={seed}", f"data.num_workers={workers}",
            f"train.cpu_threads={threads}", *self.sizes["pretrain"],
            # the text tower of image-text alignment (CLASP's run; the baseline's too, should
            # an override such as `clasp demo loss.image_text=1.0` switch it on there)
            f"data.text_teacher={self.paths['teacher']}", *pretrain_overrides,
        ]  # fmt: skip
        self.settings = {
            "scale": scale, "config": self.config_file, "seed": seed,
            "pretrain_overrides": list(pretrain_overrides),
            "config_sha256": file_sha256(self.config_file),  # an edited config starts over too
        }  # fmt: skip
        self.stages = None

    def pretrain_config(self, output_dir: str, overrides: list[str] = ()) -> dict:
        """A pre-training config on the demo's set and pseudo-labels (`overrides` last)."""
        from clasp.train.config import build_config

        return build_config(
            self.config_file,
            [f"output_dir={output_dir}", f"data.labels={self.paths['labels']}", *self.common,
             *overrides],
        )  # fmt: skip

    def open(self, force: bool) -> None:
        """Check (and with `force` clear) the output folder, then read its stages record."""
        import torch

        check_output_folder(self.out)
        if force:
            removed = remove_demo_outputs(self.out)
            if removed:
                print(f"[demo] --force: removed {', '.join(removed)} from {self.out}")
        os.makedirs(self.out, exist_ok=True)
        torch.set_num_threads(self.threads)
        budgets = BUDGET_S if self.scale == "default" else {}
        self.stages = Stages(self.out, self.settings, budgets)

    def data_stages(self) -> None:
        """synth, teacher and label: the set and its pseudo-labels that every run trains on."""
        paths, synth, seed = self.paths, self.sizes["synth"], self.seed
        data = {"scale": self.scale, "seed": seed}  # what these stages depend on
        self.stages.run("synth", lambda: synthesize(
            paths["synth"], synth["ids"], synth["images_per_id"], synth["cameras"], seed
        ), data)  # fmt: skip
        self.stages.run("teacher", lambda: fit_teacher(
            paths["synth"], paths["teacher"], [*self.sizes["teacher"], f"seed={seed}"],
            self.threads, self.workers,
        ), data)  # fmt: skip
        self.stages.run("label", lambda: label(
            paths["synth"], paths["teacher"], paths["labels"], self.out, self.workers
        ), data)  # fmt: skip


def run_demo(
    out: str = "runs/demo",
    config: str = "demo",
    *,
    scale: str = "default",
    force: bool = False,
    seed: int = 0,
    threads: int = 2,
    workers: int = 1,
    pretrain_overrides: list[str] = (),
) -> dict:
    """Run (or resume) every stage into `out` and write the report; returns summary.json's
    content. config: the pre-training YAML or a packaged config's name; pretrain_overrides:
    `key.sub=value` for both pre-training runs. Bad settings raise before any stage runs:
    FileNotFoundError (config), KeyError / ValueError (overrides), OutputFolderError (an
    output folder holding files that are not a demo's)."""
    demo = Demo(
        out, config, scale=scale, seed=seed, threads=threads, workers=workers,
        pretrain_overrides=pretrain_overrides,
    )  # fmt: skip
    paths = demo.paths
    clasp_config = demo.pretrain_config(paths["clasp"], CLASP_OVERRIDES)
    baseline_config = demo.pretrain_config(paths["baseline"], BASELINE_OVERRIDES)
    demo.open(force)
    stages, total = demo.stages, time.perf_counter()
    demo.data_stages()
    stages.run("clasp", lambda: pretrain(clasp_config))
    stages.run("baseline", lambda: pretrain(baseline_config))

    models = {
        "random": (RANDOM_WEIGHTS, os.path.join(paths["clasp"], "config.yaml")),
        "baseline": (os.path.join(paths["baseline"], "checkpoint.pt"), None),
        "clasp": (os.path.join(paths["clasp"], "checkpoint.pt"), None),
    }
    stages.run("eval", lambda: save_json(
        os.path.join(demo.out, "eval.json"), evaluate(models, paths["synth"], demo.out)
    ))  # fmt: skip
    results = read_json(os.path.join(demo.out, "eval.json"))
    text = write_report(demo.out, results, stages.seconds, time.perf_counter() - total,
                        demo.settings)  # fmt: skip
    print("\n" + text)
    return read_json(os.path.join(demo.out, "summary.json"))
