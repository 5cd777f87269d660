"""Procedural pedestrians: who they are and where they are seen.

An `Identity` is a fixed appearance (attributes from the teacher's vocabulary plus continuous
traits such as skin tone, exact shades, stripes, height and build) derived from (seed, pid).
A `Camera` is a place, a path through it and optics, derived from (seed, camera): each image
shows the person in a detector-like crop in front of another window of the camera's scene,
with passers-by and street objects (`backdrop`). The cameras of a seed share one palette of
walls and floors, so a background tells little about the camera; a camera shows in how it
sees a person (lighting, colour cast, blur, noise, scale, keystone, views).
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
    height: float  # stature; drawn in a tight box it shows as longer or shorter legs
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
    """How one camera sees people, as a detector's crops show them.

    Its place is a panorama (`scene`) that each image shows a different window of; the
    person's box spans `figure_scale` of the crop's height; the camera's height makes a
    keystone (`tilt`), its path the views it mostly sees (`view_weights`); its optics add a
    brightness and colour cast (`gain`), blur and noise."""

    index: int
    view_weights: np.ndarray  # (len(VIEWS),) how often each view is seen
    scene: np.ndarray  # (SCENE_ROWS H, SCENE_COLS W, 3) float32
    horizon: float  # the scene row of the ground line
    gain: np.ndarray  # (3,) brightness times colour cast
    figure_scale: float  # the figure's box height as a fraction of the image height
    tilt: float  # keystone: heads drawn (1 + tilt / 2) times as wide, feet (1 - tilt / 2)
    blur: float  # Gaussian sigma in pixels
    noise: float

    @property
    def view(self) -> str:
        """The view this camera sees most often."""
        return VIEWS[int(np.argmax(self.view_weights))]

    def describe(self) -> dict:
        return {
            "camera": self.index,
            "view": self.view,
            "views": {v: round(float(p), 4) for v, p in zip(VIEWS, self.view_weights, strict=True)},
            "gain": [round(float(g), 4) for g in self.gain],
            "figure_scale": round(self.figure_scale, 4),
            "tilt": round(self.tilt, 4),
            "blur": round(self.blur, 4),
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


SCENE_ROWS, SCENE_COLS = 2, 8  # a camera's panorama, in image heights and widths
FLOOR_RGB = np.array([(72, 72, 76), (150, 150, 146), (182, 168, 138), (140, 84, 68),
                      (92, 122, 72), (110, 104, 96)], dtype=np.float32)  # fmt: skip


def _palette(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Wall and floor colours shared by every camera of a seed: one town, many places.
    Mostly muted (stone, plaster, concrete), a few bright (painted shop fronts)."""
    rng = np.random.default_rng([seed, 4])
    grey = rng.uniform(50, 210, (14, 1))
    spread = np.where(np.arange(14) < 4, 60.0, 22.0)[:, None]
    walls = np.clip(grey + spread * rng.uniform(-1, 1, (14, 3)), 15, 240).astype(np.float32)
    floors = FLOOR_RGB * rng.uniform(0.85, 1.15, (len(FLOOR_RGB), 1)).astype(np.float32)
    return walls, floors


def _facade(rng: np.random.Generator, block: np.ndarray, colour: np.ndarray, h: int, w: int):
    """Paints one wall segment (rows, cols, 3) in place: plain, tiles, windows, shutters or
    foliage."""
    rows, cols = block.shape[:2]
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    block[:] = colour
    kind = rng.integers(5)
    if kind == 1:  # bricks or tiles
        py, px = rng.uniform(5, 14) * h / 128, rng.uniform(10, 26) * w / 64
        lines = ((y % py) < 1) | (((x + (np.floor(y / py) % 2) * px / 2) % px) < 1)
        block[lines] *= 0.72
    elif kind == 2:  # windows or shop fronts
        py, px = rng.uniform(18, 40) * h / 128, rng.uniform(12, 30) * w / 64
        glass = ((y % py) > 0.3 * py) & ((x % px) > 0.15 * px) & ((x % px) < 0.85 * px)
        glass_rgb = rng.uniform(20, 120) + rng.uniform(-15, 15, 3)
        block[glass] = glass_rgb + 30 * _smooth_noise(rng, (rows, cols), (3, 2))[glass]
    elif kind == 3:  # shutters or slats
        period = rng.uniform(2.5, 5) * h / 128
        block[(y % period) < 1] *= 0.8
    elif kind == 4:  # hedges and trees
        cells = (max(1, rows * 8 // h), max(1, cols * 8 // w))
        block[:] = rng.uniform(0.7, 1.1) * np.array((60, 100, 50), np.float32)
        block += 35 * _smooth_noise(rng, (rows, cols), cells)
    block *= 1 + 0.12 * _smooth_noise(rng, (rows, cols), (3, 2), 1)


def setup_camera(seed: int, index: int, size: tuple[int, int]) -> Camera:
    """A place (a panorama of walls, shop fronts, hedges and pavement from the seed's
    palette), a path through it (views) and optics for (seed, camera index)."""
    rng = np.random.default_rng([seed, 2, index])
    h, w = size
    walls, floors = _palette(seed)
    rows, cols = SCENE_ROWS * h, SCENE_COLS * w
    scene = np.empty((rows, cols, 3), np.float32)
    horizon = int(rows * 0.5)
    x0 = 0
    while x0 < cols:  # wall segments, then floor segments, left to right
        x1 = min(cols, x0 + int(rng.uniform(0.3, 1.4) * w) + 1)
        colour = walls[rng.integers(len(walls))] * rng.uniform(0.85, 1.15)
        _facade(rng, scene[:horizon, x0:x1], colour, h, w)
        x0 = x1
    yy = np.arange(rows - horizon, dtype=np.float32)[:, None, None]
    joints = (np.sqrt(yy * 128 / h) * rng.uniform(0.5, 0.9)) % 1.0 < 0.12  # wider apart nearby
    x0 = 0
    while x0 < cols:
        x1 = min(cols, x0 + int(rng.uniform(0.8, 3.0) * w) + 1)
        floor = floors[rng.integers(len(floors))] * rng.uniform(0.9, 1.1, 3)
        ground = scene[horizon:, x0:x1]
        ground[:] = floor * np.where(joints, 0.85, 1.0)
        ground *= 1 + 0.1 * _smooth_noise(rng, ground.shape[:2], (4, 3), 1)
        x0 = x1
    scene[horizon : horizon + max(1, h // 64)] *= 0.6  # kerb
    for _ in range(int(rng.integers(3, 9))):  # lamp posts and sign poles
        x = int(rng.uniform(0, cols))
        width = max(1, int(rng.uniform(1.5, 4) * w / 64))
        top = int(rng.uniform(0, horizon))
        scene[top : horizon + h // 16, x : x + width] = rng.uniform(25, 120) * rng.uniform(
            0.85, 1.15, 3
        )
    for _ in range(int(rng.integers(6, 16))):  # posters, signs, lit windows, parked things
        y0, x0 = int(rng.uniform(0, rows * 0.75)), int(rng.uniform(0, cols))
        tall, wide = int(rng.uniform(0.04, 0.2) * h) + 1, int(rng.uniform(0.08, 0.4) * w) + 1
        scene[y0 : y0 + tall, x0 : x0 + wide] = rng.uniform(20, 235, 3)
    scene *= 1 + 0.15 * _smooth_noise(rng, (rows, cols), (3, 12), 1)  # uneven light
    # surface grain: stone, plaster, leaves and dirt are never flat
    scene += 14 * _smooth_noise(rng, (rows, cols), (rows // 3, cols // 3), 1)

    axis = (index + int(np.random.default_rng([seed, 3]).integers(2))) % 2
    along = rng.uniform(0.7, 0.85)  # of the views along the camera's path
    split = rng.uniform(0.4, 0.6)
    weights = np.full(len(VIEWS), (1 - along) / 2)
    weights[2 * axis], weights[2 * axis + 1] = along * split, along * (1 - split)
    return Camera(
        index=index,
        view_weights=weights,
        scene=np.clip(scene, 0, 255).astype(np.float32),
        horizon=float(horizon),
        gain=(rng.uniform(0.8, 1.15) * rng.uniform(0.93, 1.07, 3)).astype(np.float32),
        figure_scale=float(rng.uniform(0.86, 0.93)),
        tilt=float(rng.uniform(-0.05, 0.2)),
        blur=float(rng.uniform(0.3, 1.1)),
        noise=float(rng.uniform(2.0, 6.0)),
    )


def backdrop(camera: Camera, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """What is behind the person in one image (H, W, 3) float32: a window of the camera's
    scene at a random place and zoom, with passers-by and street objects in it."""
    h, w = size
    rows, cols = camera.scene.shape[:2]
    zoom = rng.uniform(0.8, 1.25)
    x0 = rng.uniform(0, cols - w * zoom)
    y0 = np.clip(camera.horizon - rng.uniform(0.3, 0.75) * h * zoom, 0, rows - h * zoom)
    # bilinear resampling, rows then columns, of the window's block of the scene
    ys = np.clip(y0 + (np.arange(h) + 0.5) * zoom - 0.5, 0, rows - 1.001).astype(np.float32)
    xs = np.clip(x0 + (np.arange(w) + 0.5) * zoom - 0.5, 0, cols - 1.001).astype(np.float32)
    iy, ix = ys.astype(int), xs.astype(int)
    block = camera.scene[iy[0] : iy[-1] + 2, ix[0] : ix[-1] + 2]
    iy, ix = iy - iy[0], ix - ix[0]
    fy, fx = (ys % 1.0)[:, None, None], (xs % 1.0)[None, :, None]
    block = block[iy] * (1 - fy) + block[iy + 1] * fy
    image = block[:, ix] * (1 - fx) + block[:, ix + 1] * fx
    if rng.random() < 0.5:
        image = np.ascontiguousarray(image[:, ::-1])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    ground = (camera.horizon - y0) / zoom  # the ground line's row in this image
    for _ in range(int(rng.choice(3, p=(0.4, 0.4, 0.2)))):
        _street_object(rng, image, yy, xx, ground)
    for _ in range(int(rng.choice(3, p=(0.55, 0.35, 0.1)))):
        _passer_by(rng, image, yy, xx)
    return image


def _window(shape, y0, y1, x0, x1) -> tuple[slice, slice]:
    """The pixel rows and columns of the box [y0, y1) x [x0, x1), cut to the image."""
    h, w = shape[:2]
    return (
        slice(int(np.clip(y0, 0, h)), int(np.clip(np.ceil(y1), 0, h))),
        slice(int(np.clip(x0, 0, w)), int(np.clip(np.ceil(x1), 0, w))),
    )


def _street_object(rng, image, yy, xx, ground) -> None:
    """A pole, a bin or a bicycle standing on the ground (or low in the image)."""
    h, w = yy.shape
    kind = rng.integers(3)
    rgb = np.clip(rng.uniform(25, 230) * rng.uniform(0.8, 1.2, 3), 0, 255)
    x = rng.uniform(0, w)
    base = float(np.clip(max(ground, 0.4 * h) + rng.uniform(0, 0.5) * h, 0, h))
    if kind == 0:  # pole
        half = rng.uniform(1, 3) * w / 64
        image[_window(image.shape, 0, base, x - half, x + half)] = rgb
    elif kind == 1:  # bin, bollard, box
        half, tall = rng.uniform(4, 10) * w / 64, rng.uniform(0.1, 0.3) * h
        image[_window(image.shape, base - tall, base, x - half, x + half)] = rgb
    else:  # bicycle: two wheels and a frame
        r = rng.uniform(0.06, 0.1) * h
        cy = base - r
        win = _window(image.shape, cy - r - 1, base + 1, x - 2.4 * r, x + 2.4 * r)
        yy, xx = yy[win], xx[win]
        mask = np.zeros(yy.shape, bool)
        for cx in (x - 1.3 * r, x + 1.3 * r):
            d = np.hypot(xx - cx, yy - cy)
            mask |= (d < r) & (d > r - max(1.0, 0.15 * r))
        mask |= (np.abs(yy - (cy - 0.6 * r)) < 1) & (np.abs(xx - x) < 1.3 * r)
        mask |= (np.abs(xx - x - (yy - cy) * 0.3) < 1) & (yy > cy - 0.8 * r) & (yy < cy)
        image[win][mask] = rgb


def _passer_by(rng, image, yy, xx) -> None:
    """Another pedestrian: near the camera and cut by the crop's edge, or further away."""
    h, w = yy.shape
    near = rng.random() < 0.7
    fh = h * (rng.uniform(0.8, 1.05) if near else rng.uniform(0.35, 0.6))
    if near:
        side = 1.0 if rng.random() < 0.5 else -1.0
        cx = w / 2 + side * (w / 2 + rng.uniform(-0.05, 0.3) * w)
    else:
        cx = rng.uniform(0, w)
    top = h * rng.uniform(0.02, 0.12) if near else rng.uniform(0.1, 0.5) * h
    colours = list(COLOR_RGB.values())
    upper, lower = (np.array(colours[rng.integers(len(colours))], np.float32) for _ in range(2))
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))]
    hair = HAIR_COLORS[rng.integers(len(HAIR_COLORS))]
    wide = rng.uniform(1.0, 1.4)  # resized to the crop like the main figure
    hw = rng.uniform(0.1, 0.13) * fh * wide
    lean = rng.uniform(-0.05, 0.05) * fh
    win = _window(image.shape, top, top + fh, cx - 1.5 * hw, cx + 1.5 * hw)
    image, xx = image[win], xx[win] - cx
    y = (yy[win] - top) / fh  # 0 at the head's top, 1 at the feet
    legs = (y > 0.5) & (np.abs(np.abs(xx) - 0.045 * fh * wide) < 0.04 * fh * wide)
    body = (y > 0.17) & (y <= 0.55) & (np.abs(xx - lean * (0.55 - y)) < hw)
    head = ((xx - 0.5 * lean) / (0.055 * fh * wide)) ** 2 + ((y - 0.08) / 0.075) ** 2 <= 1
    for mask, rgb in ((legs, lower), (body, upper), (head, skin)):
        image[mask] = rgb * rng.uniform(0.8, 1.1)
    image[head & (y < 0.06)] = hair
