"""The student: a timm ViT with Prompt-Controlled MoE blocks, task prompts and pre-training heads.

backbone = build_backbone("configs/demo.yaml")          # random init
backbone = load_backbone("clasp-vit-s.safetensors", task="reid")
pooled, patches = backbone.extract(images, task={"reid": 0.5, "attributes": 0.5})
"""

from clasp.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .heads import AttributeHead, DINOHead, ImageTextHead, PartHead
from .io import load_backbone, save_backbone, timm_state_dict
from .pc_moe import PCMoE, PCMoEBlock
from .pretrain_model import HEAD_DEFAULTS, PretrainModel
from .prompts import TASK_DESCRIPTIONS, TASKS, TaskPrompts
from .vit import MODEL_DEFAULTS, ClaspViT, build_backbone, model_config


def build_model(
    config: dict | str | None = None,
    *,
    num_parts: int | None = None,
    num_attributes: int | None = None,
    dino: dict | None = None,
    text_dim: int | None = None,
    num_joints: int | None = None,
) -> PretrainModel:
    """The pre-training model (backbone + heads) from a model or training config.

    dino: DINO head settings (HEAD_DEFAULTS["dino"] <- a training config's heads.dino <- dino).
    num_parts / num_attributes: build the part / attribute heads (None: no such head).
    text_dim: build the image-text head into a text space of that width (None: none).
    num_joints: build the joint head with that many part pairs (None: none).
    """
    from clasp.config import load_yaml, merge

    if isinstance(config, str):
        with open(config) as f:
            config = load_yaml(f) or {}
    config = config or {}
    head = merge(HEAD_DEFAULTS["dino"], (config.get("heads") or {}).get("dino") or {})
    head = merge(head, dino or {})
    return PretrainModel(
        build_backbone(config), head, num_parts, num_attributes, text_dim, num_joints
    )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_DEFAULTS",
    "TASKS",
    "TASK_DESCRIPTIONS",
    "AttributeHead",
    "ClaspViT",
    "DINOHead",
    "ImageTextHead",
    "PCMoE",
    "PCMoEBlock",
    "PartHead",
    "PretrainModel",
    "TaskPrompts",
    "build_backbone",
    "build_model",
    "load_backbone",
    "model_config",
    "save_backbone",
    "timm_state_dict",
]
