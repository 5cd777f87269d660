"""Pre-training losses, one per file: DINO self-distillation, part-label cross-entropy,
attribute BCE, image-text InfoNCE, joints where parts meet, and the PC-MoE auxiliaries
(load balance, router z-loss)."""

from .attribute_loss import AttributeLoss
from .dino_loss import DINOLoss
from .image_text_loss import image_text_loss
from .joint_loss import JointLoss, part_pairs
from .load_balance import load_balance_loss
from .part_loss import PartLoss
from .router_z_loss import router_z_loss

__all__ = [
    "AttributeLoss",
    "DINOLoss",
    "JointLoss",
    "PartLoss",
    "image_text_loss",
    "load_balance_loss",
    "part_pairs",
    "router_z_loss",
]
