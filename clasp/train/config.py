"""Default pre-training config; a YAML file and `key.sub=value` overrides are merged over it."""

from __future__ import annotations

from clasp.config import load_config
from clasp.model import HEAD_DEFAULTS, MODEL_DEFAULTS, TASKS

DEFAULTS = {
    "seed": 0,
    "output_dir": "runs/clasp",
    "model": MODEL_DEFAULTS,
    "prompt_init": {
        # Initialise the task prompts from CLIP text embeddings of the task descriptions.
        "teacher": None,  # open_clip model name or folder (None: random prompts)
        "pretrained": None,  # pretrained tag or weights file for a model name
    },
    "heads": HEAD_DEFAULTS,
    "data": {
        "format": "synth",  # any clasp.data format with images: synth, folder, market, ...
        "root": None,
        "split": None,  # None: the format's default split
        "labels": None,  # label cache folder from `clasp label`; None: no pseudo-label losses
        # Image-text alignment (loss.image_text > 0; see clasp.train.captions): each image's
        # caption, embedded once at start-up by a CLIP teacher's text tower.
        "captions": "auto",  # auto: the set's own where it has them, else from the
        #                      attribute pseudo-labels | dataset | labels
        "text_teacher": None,  # open_clip model name or teacher folder; None: prompt_init's
        "text_pretrained": None,  # pretrained tag or weights file for a model name
        "batch_size": 32,  # per process
        "num_workers": 2,
    },
    "crops": {
        "n_global": 2,
        "n_local": 4,
        "local_size": [64, 32],  # the global size is model.img_size
        "global_scale": [0.4, 1.0],
        "local_scale": [0.1, 0.4],
        # With pseudo-labels: local crops inside the box around the labelled person parts
        # (their area a local_scale fraction of that box's), not anywhere in the image.
        "locals_on_person": False,
        "flip_p": 0.5,
        "color_jitter": [0.4, 0.4, 0.2, 0.1],
        "jitter_p": 0.8,
        "grayscale_p": 0.2,
    },
    "tasks": {
        # Each sample draws a task with these relative probabilities ...
        "sampling": {task: 1.0 for task in TASKS},
        # ... and its losses are weighted by its task's row (SOLIDER-style per-sample weights;
        # a loss a row leaves out has weight 0 for that task).
        "loss_weights": {
            task: dict(zip(("dino", "part", "attribute", "image_text", "joint"), row, strict=True))
            for task, row in (
                ("reid", (1.0, 0.0, 0.0, 1.0, 0.0)),
                ("attributes", (1.0, 0.0, 1.0, 1.0, 0.0)),
                ("parsing", (1.0, 1.0, 0.0, 1.0, 0.0)),
                ("pose", (1.0, 1.0, 0.0, 1.0, 1.0)),
                ("generic", (1.0, 0.5, 0.5, 1.0, 0.5)),
            )
        },
    },
    "loss": {
        "dino": 1.0,
        "part": 1.0,
        "attribute": 1.0,
        "load_balance": 0.01,
        "z_loss": 0.001,
        # Image-text InfoNCE (VAL-PAT's ITC) of the class token, through a projection head,
        # against the text tower's caption embeddings; 0 = off (no head is built).
        "image_text": 0.0,
        # Joints where two body parts meet in the part pseudo-labels (clasp.losses.joint_loss),
        # a spatial softmax per part pair over the patches; 0 = off (no head is built).
        "joint": 0.0,
        # How much of the gradient of the task losses (part, attribute, image-text, joint) reaches
        # the weights every task shares (patch embedding, attention, dense MLPs, norms):
        # 1 = plain multi-task training; below 1, the rest of it trains only what the prompt
        # selects (the PC-MoE experts and routers, the prompts and their modulation) and the
        # heads, so task knowledge lands on the task's own path. Self-distillation always
        # trains everything. Single-process runs only.
        "shared_task_grad": 1.0,
        "student_temp": 0.1,
        "teacher_temp": 0.07,
        "warmup_teacher_temp": 0.04,
        "warmup_teacher_temp_steps": 1000,
        "center_momentum": 0.9,
        "part_ignore_index": -1,
    },
    "optim": {
        "steps": 10000,
        "lr": 5e-4,
        "min_lr": 1e-6,
        "warmup_steps": 500,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "betas": [0.9, 0.999],
        "clip_grad": 3.0,  # max global grad norm; 0 = no clipping
        "momentum_teacher": 0.996,  # EMA momentum, cosine to 1.0 at the last step
        "freeze_last_layer_steps": 0,  # DINO: keep the prototypes fixed for the first steps
    },
    "train": {
        "log_every": 10,  # metrics JSONL line and progress update
        "plot_every": 100,  # loss-curve PNG
        "checkpoint_every": 500,
        "amp": "auto",  # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 | off
        "compile": False,  # torch.compile the student and teacher
        # None: a new run, refused where output_dir holds an earlier one | auto: continue
        # output_dir's checkpoint (it must exist; `--resume`) | a checkpoint path.
        "resume": None,
        "overwrite": False,  # a new run may replace an earlier run in output_dir (`--overwrite`)
        "progress": True,
        "deterministic": False,  # torch.use_deterministic_algorithms (slower on CUDA)
        # Threads of the training process on a CPU run (None: torch's default, one per core).
        # On a small or shared CPU, 1 thread plus data workers on the other cores is faster
        # than threads competing with the workers.
        "cpu_threads": None,
        # Also write the metrics as TensorBoard events to output_dir/tensorboard (needs the
        # tensorboard package: pip install 'clasp-triton[tensorboard]').
        "tensorboard": False,
    },
    "distributed": {
        "strategy": "ddp",  # ddp | fsdp (CUDA; shards parameters, grads and optimiser state)
        "backend": "auto",  # auto: nccl on CUDA, gloo on CPU
    },
}


def build_config(
    path: str | None,
    overrides: list[str] = (),
    resume: str | None = None,
    overwrite: bool = False,
) -> dict:
    """The full pre-training config: DEFAULTS <- the YAML file at path <- key.sub=value
    overrides (<- the --resume value into train.resume, --overwrite into train.overwrite)."""
    config = load_config(DEFAULTS, path, overrides)
    if resume is not None:
        config["train"]["resume"] = resume
    if overwrite:
        config["train"]["overwrite"] = True
    return config
