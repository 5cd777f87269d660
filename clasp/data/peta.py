"""PETA pedestrian attributes: subsets with `archive/Label.txt`, one line per person.

A line is `<person> attr attr ...`; a person's images are the files in `archive/` whose
name starts with `<person>` followed by `_` or `.`. Attributes are PETA's 61 binary ones
plus its 4 multi-class colour attributes (footwear, hair, lowerBody, upperBody, 11 colours
each) as 44 more binary columns: 105 in all, 1 where listed and 0 where not (PETA's labels
are exhaustive), NaN for an image whose person has no line. Labels that PETA itself
discarded (accessoryFaceMask, accessoryShawl, lowerBodyLogo, lowerBodyThickStripes) are
dropped, and `footwearSneakers` is read as PETA's `footwearSneaker`.

Each (subset, person) gets its own pid, numbered from 0 over the sorted subsets. Splits:
"all", "train" and "test" (a fixed 80/20 division of persons, by a hash of subset/person),
or the name of one subset (case-insensitive). Cameras are not labelled (-1).
"""

from __future__ import annotations

import logging
import os
import zlib

import numpy as np
import torch

from clasp.data.base import LabelReadError, PersonDataset, require_dir
from clasp.data.images import IMAGE_EXTENSIONS

log = logging.getLogger("clasp.data")

PETA_BINARY = (
    "accessoryHeadphone", "personalLess15", "personalLess30", "personalLess45", "personalLess60",
    "personalLarger60", "carryingBabyBuggy", "carryingBackpack", "hairBald", "footwearBoots",
    "lowerBodyCapri", "carryingOther", "carryingShoppingTro", "carryingUmbrella",
    "lowerBodyCasual", "upperBodyCasual", "personalFemale", "carryingFolder", "lowerBodyFormal",
    "upperBodyFormal", "accessoryHairBand", "accessoryHat", "lowerBodyHotPants",
    "upperBodyJacket", "lowerBodyJeans", "accessoryKerchief", "footwearLeatherShoes",
    "upperBodyLogo", "hairLong", "lowerBodyLongSkirt", "upperBodyLongSleeve", "lowerBodyPlaid",
    "lowerBodyThinStripes", "carryingLuggageCase", "personalMale", "carryingMessengerBag",
    "accessoryMuffler", "accessoryNothing", "carryingNothing", "upperBodyNoSleeve",
    "upperBodyPlaid", "carryingPlasticBags", "footwearSandals", "footwearShoes", "hairShort",
    "lowerBodyShorts", "upperBodyShortSleeve", "lowerBodyShortSkirt", "footwearSneaker",
    "footwearStocking", "upperBodyThinStripes", "upperBodySuit", "carryingSuitcase",
    "lowerBodySuits", "accessorySunglasses", "upperBodySweater", "upperBodyThickStripes",
    "lowerBodyTrousers", "upperBodyTshirt", "upperBodyOther", "upperBodyVNeck",
)  # fmt: skip
PETA_COLORS = ("Black", "Blue", "Brown", "Green", "Grey", "Orange", "Pink", "Purple", "Red",
               "White", "Yellow")  # fmt: skip
PETA_MULTICLASS = {
    group: tuple(group + color for color in PETA_COLORS)
    for group in ("footwear", "hair", "lowerBody", "upperBody")
}
PETA_ATTRIBUTES = PETA_BINARY + tuple(n for names in PETA_MULTICLASS.values() for n in names)
PETA_DISCARDED = {"accessoryFaceMask", "accessoryShawl", "lowerBodyLogo", "lowerBodyThickStripes"}
PETA_ALIASES = {"footwearSneakers": "footwearSneaker"}


def find_subsets(root: str) -> dict[str, str]:
    """Subset name -> its archive folder: root/*/archive, or root itself if it is one subset."""
    require_dir(root, "PETA folder")
    if os.path.isfile(os.path.join(root, "archive", "Label.txt")):
        return {os.path.basename(os.path.normpath(root)): os.path.join(root, "archive")}
    if os.path.isfile(os.path.join(root, "Label.txt")):
        return {os.path.basename(os.path.dirname(os.path.normpath(root))): root}
    subsets = {
        name: os.path.join(root, name, "archive")
        for name in sorted(os.listdir(root))
        if os.path.isfile(os.path.join(root, name, "archive", "Label.txt"))
    }
    if not subsets:
        raise FileNotFoundError(f"no PETA subsets (<subset>/archive/Label.txt) found under {root}")
    return subsets


def read_labels(path: str) -> dict[str, np.ndarray]:
    """person -> 0/1 float32 vector over PETA_ATTRIBUTES."""
    column = {name: i for i, name in enumerate(PETA_ATTRIBUTES)}
    labels, unknown = {}, set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise LabelReadError(path, str(error)) from error
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        vector = np.zeros(len(PETA_ATTRIBUTES), np.float32)
        for token in fields[1:]:
            token = PETA_ALIASES.get(token, token)
            if token in column:
                vector[column[token]] = 1.0
            elif token not in PETA_DISCARDED:
                unknown.add(token)
        labels[fields[0]] = vector
    if unknown:
        log.warning("%s: unknown PETA attributes ignored: %s", path, ", ".join(sorted(unknown)))
    return labels


def person_of(filename: str) -> str:
    stem = os.path.splitext(filename)[0]
    return stem.split("_", 1)[0]


class PetaDataset(PersonDataset):
    """PETA subsets; see the module docstring."""

    format = "peta"
    attribute_names = list(PETA_ATTRIBUTES)
    binary_attribute_names = list(PETA_BINARY)
    multiclass_attributes = {g: list(n) for g, n in PETA_MULTICLASS.items()}

    def __init__(self, root: str, split: str = "all", **kwargs):
        super().__init__(root, split, **kwargs)
        subsets = find_subsets(root)
        by_name = {name.lower(): name for name in subsets}
        if split.lower() in by_name:
            subsets = {by_name[split.lower()]: subsets[by_name[split.lower()]]}
        elif split not in ("all", "train", "test"):
            raise ValueError(
                f"PETA split must be all, train, test or a subset ({', '.join(subsets)}), "
                f"got {split!r}"
            )
        entries = []  # (subset, person, path)
        self.labels: dict[tuple[str, str], np.ndarray] = {}
        for subset, archive in subsets.items():
            for person, vector in read_labels(os.path.join(archive, "Label.txt")).items():
                self.labels[(subset, person)] = vector
            for name in sorted(os.listdir(archive)):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    entries.append((subset, person_of(name), os.path.join(archive, name)))
        if split in ("train", "test"):
            entries = [e for e in entries if (_hash(e[0], e[1]) % 5 == 0) == (split == "test")]
        persons = sorted({(s, p) for s, p, _ in entries})
        pid_of = {key: i for i, key in enumerate(persons)}
        self.persons = persons  # pid -> (subset, person as written in the file names)
        self.paths = [e[2] for e in entries]
        self.pids = [pid_of[(s, p)] for s, p, _ in entries]
        self.cameras = [-1] * len(entries)
        self.subsets = [e[0] for e in entries]
        self.check_not_empty("PETA images")

    def load(self, index: int) -> dict:
        sample = self.base_sample(index)
        vector = self.labels.get(self.persons[self.pids[index]])
        if vector is None:
            vector = np.full(len(PETA_ATTRIBUTES), np.nan, np.float32)
        sample["attributes"] = torch.from_numpy(vector.copy())
        return sample


def _hash(subset: str, person: str) -> int:
    return zlib.crc32(f"{subset}/{person}".encode())
