"""A labelled set's attribute ground truth in the vocabulary's attribute groups, for zero-shot
scoring with the teacher's prompts (`clasp.eval.zeroshot`).

Each format's labels become one value per group (or unknown) and then the vocabulary's flat
binary attributes ('group=value', `Prompts.attribute_names`): 1 for the known value, 0 for
the group's other values, NaN for every value of a group whose value is unknown.
- synth: the set's attributes are the vocabulary's own (columns matched by name);
- peta: PETA's attribute names through `clasp.teacher.fit_data.PETA_TO_GROUP` (as the teacher
  fit reads them: a group is unknown when PETA names none or several of its values);
- market: Market-1501's attributes through `market_values` below.
Values a set never has (PETA's handbag, Market's teenagers) stay 0 where their group is known
or NaN where it is not; `attribute_metrics` then leaves them out as unscored.
"""

from __future__ import annotations

import math

import torch

from clasp.data.reid import MARKET_DOWN_COLORS, MARKET_UP_COLORS
from clasp.teacher.fit_data import peta_targets
from clasp.vocabulary import Prompts

MAPPED_FORMATS = ("synth", "peta", "market")
# Market-1501 attribute -> vocabulary value; None: a value the vocabulary does not name.
VOCABULARY_COLORS = ("black", "white", "red", "yellow", "gray", "blue", "green")
MARKET_UPPER = {f"up{c}": c if c in VOCABULARY_COLORS else None for c in MARKET_UP_COLORS}
MARKET_LOWER = {f"down{c}": c if c in VOCABULARY_COLORS else None for c in MARKET_DOWN_COLORS}
MARKET_AGES = {"age_young": "child", "age_teenager": None, "age_adult": "adult",
               "age_old": "elderly"}  # fmt: skip
MARKET_BAGS = {
    (False, False, False): "none",
    (True, False, False): "backpack",
    (False, False, True): "handbag",
}  # (backpack, bag, handbag) flags -> value


def _one(flags: dict[str, float], names: dict[str, str | None]) -> str | None:
    """The value of the one flag set among `names` {flag: value}; None when any is unknown
    or not exactly one is set."""
    known = [flags.get(n) for n in names]
    if any(v is None or math.isnan(v) for v in known):
        return None
    on = [value for name, value in names.items() if flags[name] == 1]
    return on[0] if len(on) == 1 else None


def market_values(flags: dict[str, float]) -> dict[str, str | None]:
    """One Market-1501 person's attributes ({name: 1/0/NaN}, `clasp.data.reid` names) ->
    {vocabulary group: value or None}."""

    def flag(name):
        value = flags.get(name, math.nan)
        return None if math.isnan(value) else value == 1

    pants, short = flag("lower_pants"), flag("lower_short")
    lower = None
    if pants is False:
        lower = "skirt"  # Market's "dress" covers dresses and skirts
    elif pants and short is not None:
        lower = "shorts" if short else "trousers"
    bags = [flag(n) for n in ("backpack", "bag", "handbag")]
    bag = None if None in bags else MARKET_BAGS.get(tuple(bags))
    sleeve, hair, hat, female = (flag(n) for n in ("sleeve_short", "hair_long", "hat", "female"))
    return {
        "gender": None if female is None else ("female" if female else "male"),
        "age": _one(flags, MARKET_AGES),
        "hair": None if hair is None else ("long" if hair else "short"),
        "upper_type": None if sleeve is None else ("short_sleeve" if sleeve else "long_sleeve"),
        "upper_color": _one(flags, MARKET_UPPER),
        "lower_type": lower,
        "lower_color": _one(flags, MARKET_LOWER),
        "bag": bag,
        "hat": None if hat is None else ("hat" if hat else "none"),
    }


def vocabulary_targets(
    format: str, names: list[str], attributes: torch.Tensor, prompts: Prompts
) -> torch.Tensor:
    """(N, A_set) ground truth (1 / 0, NaN unknown) with the set's attribute `names` ->
    (N, A) over `prompts.attribute_names` (see the module doc)."""
    if format not in MAPPED_FORMATS:
        raise ValueError(
            f"zero-shot attributes read formats {', '.join(MAPPED_FORMATS)}, not {format!r}"
        )
    groups = {g: list(v) for g, v in prompts.attributes.items()}
    out = torch.full((attributes.shape[0], len(prompts.attribute_names)), math.nan)
    if format == "synth":
        column = {n: i for i, n in enumerate(names)}
        for j, name in enumerate(prompts.attribute_names):
            if name in column:
                out[:, j] = attributes[:, column[name]]
        return out
    for i, row in enumerate(attributes.tolist()):
        if format == "peta":
            if all(math.isnan(v) for v in row):
                continue  # a person without a label line
            present = [n for n, v in zip(names, row, strict=True) if v == 1]
            indices = peta_targets(present, groups)
            values = {
                g: groups[g][k] if k >= 0 else None for g, k in zip(groups, indices, strict=True)
            }
        else:
            values = market_values(dict(zip(names, row, strict=True)))
        start = 0
        for group, options in groups.items():
            value = values.get(group)
            if value is not None and value in options:
                out[i, start : start + len(options)] = 0.0
                out[i, start + options.index(value)] = 1.0
            start += len(options)
    return out
