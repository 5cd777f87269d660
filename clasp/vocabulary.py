"""The vocabulary of person parts and attributes, with the text prompts that name them.

One file (`prompts.yaml` beside this module, or the user's own) fixes the part classes and
attribute groups for every stage: the synthetic generator draws and labels them, the teacher
embeds their prompts, and the label cache and the model heads are sized by them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from clasp.config import load_yaml

DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.yaml")
CAPTION_PREFIX = "a photo of a person: "


@dataclass(frozen=True)
class Prompts:
    templates: list[str]
    parts: dict[str, list[str]]  # class name -> prompts, in class-index order
    attributes: dict[str, dict[str, list[str]]]  # group -> value -> prompts, in value order

    @property
    def part_names(self) -> list[str]:
        return list(self.parts)

    @property
    def attribute_names(self) -> list[str]:
        """Flat binary attribute names, one per group value: 'group=value'."""
        return [f"{group}={value}" for group, values in self.attributes.items() for value in values]

    @property
    def group_sizes(self) -> list[int]:
        return [len(values) for values in self.attributes.values()]


def load_prompts(path: str | None = None) -> Prompts:
    """Read a prompts YAML (default: the packaged prompts.yaml) and check its shape."""
    path = path or DEFAULT_PROMPTS
    with open(path) as f:
        raw = load_yaml(f) or {}
    problems = []
    templates = raw.get("templates") or ["{}"]
    if not all(isinstance(t, str) and "{}" in t for t in templates):
        problems.append("every template must be a string containing '{}'")
    parts = raw.get("parts") or {}
    if len(parts) < 2:
        problems.append("'parts' needs at least two classes")
    attributes = raw.get("attributes") or {}
    for group, values in attributes.items():
        if not isinstance(values, dict) or len(values) < 2:
            problems.append(f"attribute group {group!r} needs at least two values")
    for name, prompts in [
        *parts.items(),
        *(
            (f"{g}={v}", p)
            for g, vs in attributes.items()
            if isinstance(vs, dict)
            for v, p in vs.items()
        ),
    ]:
        if not prompts or not all(isinstance(p, str) for p in prompts):
            problems.append(f"{name!r} needs a list of prompt strings")
    if problems:
        raise ValueError(f"invalid prompts file {path}: " + "; ".join(problems))
    return Prompts(
        templates=list(templates),
        parts=dict(parts),
        attributes={g: dict(v) for g, v in attributes.items()},
    )


def attribute_words(name: str) -> str:
    """An attribute name in words: PETA's camel case ('upperBodyShortSleeve' -> 'upper body
    short sleeve') or a vocabulary name ('upper_color=red' -> 'upper color red')."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return re.sub(r"[=_\s]+", " ", spaced).strip().lower()


def attribute_caption(names: Iterable[str]) -> str:
    """The caption of a person from the names of the attributes it has, e.g. 'a photo of a
    person: personal male, hair short' or 'a photo of a person: gender male, hair short'.
    The one caption builder for attribute labels: the teacher fit writes it for PETA's
    labels, pre-training for the teacher's attribute pseudo-labels."""
    return CAPTION_PREFIX + ", ".join(attribute_words(n) for n in names)
