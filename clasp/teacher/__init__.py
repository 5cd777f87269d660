"""The CLIP teacher: prompts, open_clip loading, pseudo-labels and the label cache.

Names resolve lazily so that a training loader importing `LabelCache` does not pay for
importing open_clip.
"""

import importlib

DENSE_MODES = ("maskclip", "plain")  # dense patch features of the teacher; see ClipTeacher
RANDOM_WEIGHTS = "random"  # the `pretrained` value that asks for random weights on purpose

_EXPORTS = {
    "Prompts": "prompts",
    "load_prompts": "prompts",
    "LabelCache": "cache",
    "CacheMismatchError": "cache",
    "file_sha256": "cache",
    "ClipTeacher": "clip",
    "TeacherLoadError": "clip",
    "TextEmbeddings": "clip",
    "load_teacher": "clip",
    "save_teacher": "clip",
    "label_folder": "labeling",
}

__all__ = sorted([*_EXPORTS, "DENSE_MODES", "RANDOM_WEIGHTS"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
