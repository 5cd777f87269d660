"""Procedural pedestrians: who they are and where they are seen.

An `Identity` is a fixed appearance (attributes from the teacher's vocabulary plus continuous
traits such as skin tone, exact shades, stripes, height and build) derived from (seed, pid).
A `Camera` is a fixed background, lighting and viewpoint derived from (seed, camera).
`clasp.data.render.render` draws an identity seen by a camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The part classes the renderer labels, in label order (the teacher's prompt file must agree).
PART_NAMES = ("background", "head", "upper_body", "arms", "lower_body", "feet")

KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip

VIEWS = ("front", "back", "side_right", "side_left")  # side_*: walking toward that image side

COLOR_RGB = {
    "black": (28, 28, 32), "white": (236, 236, 230), "red": (200, 32, 36),
    "blue": (36, 64, 190), "green": (40, 150, 64), "yellow": (232, 200, 40),
    "gray": (128, 128, 128), "grey": (128, 128, 128), "brown": (122, 76, 40),
    "pink": (240, 140, 182), "purple": (122, 52, 152), "orange": (240, 130, 32),
}  # fmt: skip

# What the renderer can draw, per attribute group (the prompt file may use a subset).
DRAWABLE = {
    "gender": ("male", "female"),
    "age": ("child", "adult", "elderly"),
    "hair": ("short", "long"),
    "upper_type": ("short_sleeve", "long_sleeve"),
    "upper_color": tuple(COLOR_RGB),
    "lower_type": ("trousers", "shorts", "skirt"),
    "lower_color": tuple(COLOR_RGB),
    "bag": ("none", "backpack", "handbag"),
    "hat": ("none", "hat"),
}
DEFAULT_VALUES = {
    "upper_color": ("black", "white", "red", "blue", "green", "yellow", "gray"),
    "lower_color": ("black", "white", "red", "blue", "green", "yellow", "gray"),
}

SKIN_TONES = np.array([(240, 200, 170), (225, 175, 140), (198, 140, 100), (150, 100, 70),
                       (100, 66, 46)], dtype=np.float32)  # fmt: skip
HAIR_COLORS = np.array([(20, 18, 18), (60, 40, 28), (100, 70, 40), (190, 150, 90)], np.float32)
OLD_HAIR_COLORS = np.array([(150, 150, 150), (200, 200, 200), (228, 228, 224)], np.float32)
SHOE_COLORS = np.array([(20, 20, 20), (70, 50, 35), (235, 235, 235), (90, 90, 100)], np.float32)
ACCESSORY_COLORS = np.array([(30, 30, 30), (110, 70, 40), (60, 80, 40), (150, 30, 40),
                             (40, 40, 110), (200, 180, 120)], dtype=np.float32)  # fmt: skip


def check_vocabulary(groups: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """The values to sample per group: the prompt file's where it names the group, else ours.

    Raises ValueError naming every group or value the renderer cannot draw."""
    problems = [f"group {g!r}" for g in groups if g not in DRAWABLE]
    for group, values in groups.items():
        problems += [
            f"{group}={v}" for v in values if group in DRAWABLE and v not in DRAWABLE[group]
        ]
    if problems:
        raise ValueError(
            "the synthetic renderer cannot draw "
            + ", ".join(problems)
            + f"; drawable groups and values: {DRAWABLE}"
        )
    return {g: tuple(groups.get(g) or DEFAULT_VALUES.get(g, vs)) for g, vs in DRAWABLE.items()}


@dataclass(frozen=True)
class Identity:
    pid: int
    attributes: dict[str, str]  # group -> value, every drawable group
    skin: np.ndarray
    hair_rgb: np.ndarray
    upper_rgb: np.ndarray
    lower_rgb: np.ndarray
    shoe_rgb: np.ndarray
    accessory_rgb: np.ndarray
    stripe_period: float  # in figure heights; 0 = plain top
    height: float
    build: float
    arm_swing: float


def _pick(rng: np.random.Generator, allowed: tuple[str, ...], weights: dict[str, float]) -> str:
    p = np.array([weights.get(v, 1.0) for v in allowed], dtype=np.float64)
    return allowed[rng.choice(len(allowed), p=p / p.sum())]


def _shade(rng: np.random.Generator, rgb, spread: float = 0.08) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) * rng.uniform(1 - spread, 1 + spread, 3), 0, 255)


def sample_identity(seed: int, pid: int, values: dict[str, tuple[str, ...]]) -> Identity:
    """A fixed appearance for (seed, pid); `values` from `check_vocabulary`."""
    rng = np.random.default_rng([seed, 1, pid])
    a: dict[str, str] = {}
    a["gender"] = _pick(rng, values["gender"], {})
    a["age"] = _pick(rng, values["age"], {"child": 0.15, "adult": 0.7, "elderly": 0.15})
    female = a["gender"] == "female"
    a["hair"] = _pick(rng, values["hair"], {"long": 3.0 if female else 0.2, "short": 1.0})
    a["upper_type"] = _pick(rng, values["upper_type"], {})
    a["upper_color"] = _pick(rng, values["upper_color"], {})
    a["lower_type"] = _pick(
        rng, values["lower_type"], {"trousers": 1.0, "shorts": 0.5, "skirt": 1.0 if female else 0.0}
    )
    a["lower_color"] = _pick(rng, values["lower_color"], {})
    a["bag"] = _pick(rng, values["bag"], {"none": 2.0, "backpack": 1.0, "handbag": 1.0})
    a["hat"] = _pick(rng, values["hat"], {"none": 3.0, "hat": 1.0})
    hair_palette = OLD_HAIR_COLORS if a["age"] == "elderly" else HAIR_COLORS
    return Identity(
        pid=pid,
        attributes=a,
        skin=_shade(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 0.05),
        hair_rgb=_shade(rng, hair_palette[rng.integers(len(hair_palette))]),
        upper_rgb=_shade(rng, COLOR_RGB[a["upper_color"]]),
        lower_rgb=_shade(rng, COLOR_RGB[a["lower_color"]]),
        shoe_rgb=_shade(rng, SHOE_COLORS[rng.integers(len(SHOE_COLORS))]),
        accessory_rgb=_shade(rng, ACCESSORY_COLORS[rng.integers(len(ACCESSORY_COLORS))]),
        stripe_period=float(rng.uniform(0.03, 0.06)) if rng.random() < 0.35 else 0.0,
        height=float(rng.uniform(0.94, 1.05)),
        build=float(rng.uniform(0.9, 1.15)),
        arm_swing=float(rng.uniform(0.15, 0.45)),
    )


@dataclass(frozen=True)
class Camera:
    index: int
    view: str
    background: np.ndarray  # (H, W, 3) float32
    gain: np.ndarray  # (3,) brightness times colour cast
    figure_scale: float  # figure height as a fraction of the image height
    noise: float

    def describe(self) -> dict:
        return {
            "camera": self.index,
            "view": self.view,
            "gain": [round(float(g), 4) for g in self.gain],
            "figure_scale": round(self.figure_scale, 4),
            "noise": round(self.noise, 3),
        }


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: tuple[int, int], ch=3):
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.uniform(-1, 1, (cells[0] + 1, cells[1] + 1, ch)).astype(np.float32)
    ys = np.linspace(0, cells[0], size[0], dtype=np.float32)
    xs = np.linspace(0, cells[1], size[1], dtype=np.float32)
    y0 = np.minimum(ys.astype(int), cells[0] - 1)
    x0 = np.minimum(xs.astype(int), cells[1] - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def setup_camera(seed: int, index: int, size: tuple[int, int]) -> Camera:
    """A fixed background, lighting and viewpoint for (seed, camera index)."""
    rng = np.random.default_rng([seed, 2, index])
    h, w = size
    view_offset = int(np.random.default_rng([seed, 3]).integers(len(VIEWS)))
    wall = rng.uniform(40, 215, 3).astype(np.float32)
    floor = rng.uniform(40, 200, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = h * rng.uniform(0.55, 0.8)
    background = np.where((yy >= horizon)[..., None], floor, wall)
    background = background + 25 * _smooth_noise(rng, size, (4, 2))
    texture = rng.integers(3)
    if texture == 0:  # bricks or tiles on the wall
        period_y, period_x = rng.uniform(6, 14) * h / 128, rng.uniform(10, 24) * w / 64
        row = np.floor(yy / period_y)
        lines = ((yy % period_y) < 1) | (((xx + (row % 2) * period_x / 2) % period_x) < 1)
        background[lines & (yy < horizon)] *= 0.7
    elif texture == 1:  # vertical poles or shop fronts
        for _ in range(int(rng.integers(1, 4))):
            x0, width = rng.uniform(0, w), rng.uniform(2, 8) * w / 64
            background[:, (xx[0] >= x0) & (xx[0] < x0 + width)] = rng.uniform(30, 220, 3)
    else:  # a gradient, as with uneven light
        background *= (0.75 + 0.5 * xx / max(w - 1, 1))[..., None]
    return Camera(
        index=index,
        view=VIEWS[(index + view_offset) % len(VIEWS)],
        background=np.clip(background, 0, 255).astype(np.float32),
        gain=(rng.uniform(0.75, 1.2) * rng.uniform(0.9, 1.1, 3)).astype(np.float32),
        figure_scale=float(rng.uniform(0.74, 0.88)),
        noise=float(rng.uniform(2.0, 6.0)),
    )
