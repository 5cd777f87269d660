"""Import `clasp` and `clasp.kernels` from this source tree when the package is not installed
(`import source_tree` first). `kernels/` installs as `clasp.kernels`, so a PYTHONPATH entry
alone cannot provide it: a meta-path finder maps it, as setuptools' editable installs do.
An installed package, editable or not, is used as it is."""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _SourceTreeKernels:
    """Finds `clasp.kernels` in <root>/kernels when no other finder does."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "clasp.kernels":
            return None
        package = os.path.join(ROOT, "kernels")
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(package, "__init__.py"), submodule_search_locations=[package]
        )


def use_source_tree() -> None:
    if importlib.util.find_spec("clasp") is None:
        sys.path.insert(0, ROOT)
    if _SourceTreeKernels not in sys.meta_path:
        sys.meta_path.append(_SourceTreeKernels)


use_source_tree()
