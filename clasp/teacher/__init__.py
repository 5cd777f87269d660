"""The CLIP teacher: open_clip loading, pseudo-labels, the label cache and the offline fit.

    model.py     ClipTeacher: text embeddings, dense patch features, pseudo-labels
    loading.py   load_teacher / save_teacher: names, tags, files, folders
    hub.py       offline mode when the Hugging Face hub cannot be reached
    labeling.py  label_folder: an image folder into a label cache (and `clasp label`)
    cache.py     the label cache that training loaders read
    visualize.py part-label overlays
    fit_data.py  the offline fit's training examples: captions, attribute targets, part grids
    fit.py       fitting a small open_clip teacher offline
    cli.py       `clasp teacher fit`

The part and attribute vocabulary is `clasp.vocabulary` (re-exported here). Names resolve
lazily so that a training loader importing `LabelCache` does not pay for importing open_clip.
"""

import importlib

from clasp import RANDOM_WEIGHTS  # noqa: F401  (re-exported as clasp.teacher.RANDOM_WEIGHTS)

DENSE_MODES = ("maskclip", "plain")  # dense patch features of the teacher; see ClipTeacher

_EXPORTS = {
    "Prompts": "clasp.vocabulary",
    "load_prompts": "clasp.vocabulary",
    "LabelCache": "clasp.teacher.cache",
    "CacheMismatchError": "clasp.teacher.cache",
    "file_sha256": "clasp.teacher.cache",
    "ClipTeacher": "clasp.teacher.model",
    "TextEmbeddings": "clasp.teacher.model",
    "TeacherLoadError": "clasp.teacher.loading",
    "load_teacher": "clasp.teacher.loading",
    "save_teacher": "clasp.teacher.loading",
    "label_folder": "clasp.teacher.labeling",
}

__all__ = sorted([*_EXPORTS, "DENSE_MODES", "RANDOM_WEIGHTS"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
