"""Drawing one pedestrian image and its ground truth with numpy masks, back to front.

Part labels say what is seen at a pixel: the person's head (face, neck, hair, hat), upper
body (top), arms (sleeves, skin, hands), lower body (trousers, shorts, skirt, bare legs) and
feet (shoes). An occluder is background; a carried bag is IGNORE (no part class fits it).
Keypoint visibility follows COCO: 2 seen, 1 hidden (far side, back of the head, under an
occluder or a bag), 0 outside the image (coordinates then 0).

The image is a detector-like crop: the figure's box spans the camera's `figure_scale` of the
image height (a child too: a detector box is tight), drawn `stretch` times wider than its
body proportions and with the camera's keystone; behind it a `backdrop`, in front an
occluder at times; then the camera's optics (lighting, blur, noise). Masks and keypoints are
those of the drawn shapes before the blur: a blurred edge spills up to `blur_radius(blur)`
pixels outside the mask.

One file on purpose: `render` draws every shape from one set of body measurements, back to
front, and the masks, keypoints and occluder rules depend on that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clasp.data.pedestrians import KEYPOINT_NAMES, VIEWS, Camera, Identity, backdrop

BACKGROUND, HEAD, UPPER, ARMS, LOWER, FEET = range(6)
IGNORE = -1
FIGURE_EXTENT = 0.99  # the box of a standing figure, head to soles, in figure heights


@dataclass
class Rendering:
    image: np.ndarray  # (H, W, 3) uint8
    parts: np.ndarray  # (H, W) int8 over PART_NAMES, IGNORE on bags
    keypoints: np.ndarray  # (17, 3) float32: x, y, visibility (2 seen, 1 hidden, 0 outside)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the figure's labelled pixels
    occluder: tuple[int, int, int, int] | None
    view: str
    blur: float  # the Gaussian sigma applied, in pixels


class _Canvas:
    """An image and its part map painted back to front; each shape is a boolean mask.

    Shapes are given in body coordinates: x about the figure's centre line is divided by
    `width_at(y)` (the stretch and keystone) before it is tested; `pixel_x` maps back."""

    def __init__(self, background: np.ndarray, cx: float, width_at):
        self.image = background
        self.parts = np.zeros(background.shape[:2], np.int8)
        h, w = self.parts.shape
        self.yy, px = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
        self.cx, self.width_at = cx, width_at
        self.xx = cx + (px - cx) / width_at(self.yy)
        self.px = px

    def pixel_x(self, x, y):
        return self.cx + (x - self.cx) * self.width_at(y)

    def paint(self, mask: np.ndarray, rgb, part: int) -> None:
        self.image[mask] = rgb
        self.parts[mask] = part

    def ellipse(self, cx, cy, rx, ry) -> np.ndarray:
        return ((self.xx - cx) / rx) ** 2 + ((self.yy - cy) / ry) ** 2 <= 1.0

    def capsule(self, p, q, radius) -> np.ndarray:
        """Points within `radius` of the segment p-q."""
        dx, dy = q[0] - p[0], q[1] - p[1]
        t = ((self.xx - p[0]) * dx + (self.yy - p[1]) * dy) / max(dx * dx + dy * dy, 1e-6)
        t = np.clip(t, 0.0, 1.0)
        return (self.xx - p[0] - t * dx) ** 2 + (self.yy - p[1] - t * dy) ** 2 <= radius**2

    def band(self, ys, half_widths, centers) -> np.ndarray:
        """Rows ys[0]..ys[-1]; half-width and centre interpolated linearly between knots."""
        y = self.yy[:, 0]
        hw = np.interp(y, ys, half_widths)[:, None]
        cx = np.interp(y, ys, centers)[:, None]
        return (np.abs(self.xx - cx) <= hw) & ((y >= ys[0]) & (y <= ys[-1]))[:, None]

    def rect(self, x0, y0, x1, y1) -> np.ndarray:
        return (self.xx >= x0) & (self.xx < x1) & (self.yy >= y0) & (self.yy < y1)

    def pixel_rect(self, x0, y0, x1, y1) -> np.ndarray:
        return (self.px >= x0) & (self.px < x1) & (self.yy >= y0) & (self.yy < y1)


def blur_radius(sigma: float) -> int:
    """How far (pixels, per axis) `_blur` spreads a pixel; 0 when it does not blur."""
    return int(math.ceil(2.5 * sigma)) if sigma >= 0.2 else 0


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, 3), edges repeated; reaches `blur_radius(sigma)`."""
    r = blur_radius(sigma)
    if r == 0:
        return image
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = image.shape[:2]
    padded = np.pad(image, ((r, r), (0, 0), (0, 0)), mode="edge")
    image = sum(k[i] * padded[i : i + h] for i in range(2 * r + 1))
    padded = np.pad(image, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * padded[:, i : i + w] for i in range(2 * r + 1))


def _towards(p, q, fraction):
    return (p[0] + fraction * (q[0] - p[0]), p[1] + fraction * (q[1] - p[1]))


def render(
    identity: Identity,
    camera: Camera,
    rng: np.random.Generator,
    size: tuple[int, int],
    *,
    occlusion: float = 0.3,
    draw_figure: bool = True,
) -> Rendering:
    """Draw one image of `identity` seen by `camera`.

    Every random draw comes first and in a fixed order, so `draw_figure=False` renders the
    very same background, occluder, lighting and noise without the person (tests use it to
    check that the part mask covers exactly the pixels the figure changed)."""
    h, w = size
    a = identity.attributes
    view = VIEWS[rng.choice(len(VIEWS), p=camera.view_weights)]
    phase = rng.uniform(0, 2 * math.pi)
    fill = camera.figure_scale * rng.uniform(0.975, 1.025)
    width_fill = rng.uniform(0.82, 0.95)
    shift_x, shift_y = rng.normal(0, 0.025), rng.uniform(-0.015, 0.015)
    abduction = rng.uniform(0.05, 0.2)
    tints = rng.uniform(0.93, 1.07, (5, 3)).astype(np.float32)
    image_gain = rng.uniform(0.85, 1.15) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    light_angle, light_slope = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.12)
    blur = camera.blur * rng.uniform(0.8, 1.2)
    scene = backdrop(camera, np.random.default_rng(rng.integers(2**63)), size)
    occluded = rng.random() < occlusion
    occluder_kind, occluder_extent, occluder_offset = (
        rng.integers(3),
        rng.uniform(0.2, 0.45),
        rng.random(),
    )
    occluder_rgb = (rng.uniform(30, 220) + rng.uniform(-25, 25, 3)).astype(np.float32)
    noise = rng.normal(0, camera.noise, (h, w, 3)).astype(np.float32)

    child, elderly = a["age"] == "child", a["age"] == "elderly"
    female = a["gender"] == "female"
    fh = h * fill / FIGURE_EXTENT
    ground = h * (0.5 + fill / 2 + shift_y)  # the soles
    top = ground - FIGURE_EXTENT * fh
    cx = w / 2  # the body's centre line; moved below to centre the figure's box
    side_view = view.startswith("side")
    facing = 1.0 if view == "side_right" else -1.0  # side views: +1 walks toward image right
    flat = 0.62 if side_view else 1.0  # a body seen from the side is narrower

    def at(fraction):
        return top + fraction * fh

    head_ry = (0.085 if child else 0.066) * fh
    head_rx = 0.78 * head_ry
    head_cy = top + head_ry + (0.012 * fh if elderly else 0.0)
    head_cx = cx + (facing * 0.02 * fh if side_view and elderly else 0.0)
    shoulder_y = at(0.22 if child else 0.18) + (0.01 * fh if elderly else 0.0)
    legs = 0.3 * (identity.height - 1.0)  # a tight box hides stature, not proportions
    waist_y, hip_y = at((0.45 if child else 0.42) - legs), at((0.55 if child else 0.52) - legs)
    knee_y, ankle_y = at((0.76 if child else 0.74) - legs / 2), at(0.95)
    b = identity.build
    shoulder_hw = (0.105 if female else 0.125) * fh * b
    waist_hw = (0.08 if female else 0.10) * fh * b
    hip_hw = (0.115 if female else 0.10) * fh * b
    arm_r = (0.027 if female else 0.031) * fh * b
    thigh_r, calf_r, hand_r = 0.045 * fh * b, 0.035 * fh * b, 0.028 * fh
    upper_arm, forearm = (0.15 if child else 0.16) * fh, (0.14 if child else 0.15) * fh
    thigh, calf = knee_y - hip_y, ankle_y - knee_y

    # Joints per body side ("left" = the person's left). Front and back views mirror the
    # lateral axis; side views swing the limbs in the image plane.
    joints: dict[str, tuple[float, float]] = {}
    near = "right" if facing > 0 else "left"  # the side facing the camera in a side view
    for side, sign in (("left", 1.0), ("right", -1.0)):
        swing = identity.arm_swing * math.sin(phase) * sign
        if side_view:
            stoop = facing * 0.02 * fh if elderly else 0.0
            shoulder = (cx + stoop, shoulder_y + 0.5 * arm_r)
            elbow = (
                shoulder[0] + facing * upper_arm * math.sin(swing),
                shoulder[1] + upper_arm * math.cos(swing),
            )
            bend = swing + 0.25
            wrist = (
                elbow[0] + facing * forearm * math.sin(bend),
                elbow[1] + forearm * math.cos(bend),
            )
            stride = -0.35 * math.sin(phase) * sign
            hip = (cx, hip_y)
            knee = (cx + facing * thigh * math.sin(stride), hip_y + thigh * math.cos(stride))
            shin = stride - 0.5 * max(0.0, -stride)
            ankle = (knee[0] + facing * calf * math.sin(shin), knee[1] + calf * math.cos(shin))
        else:
            lateral = sign * (1.0 if view == "front" else -1.0)  # image x direction of this side
            foreshorten = 1.0 - 0.2 * abs(swing)
            shoulder = (cx + lateral * (shoulder_hw - 0.6 * arm_r), shoulder_y + 0.5 * arm_r)
            elbow = (
                shoulder[0] + lateral * upper_arm * math.sin(abduction),
                shoulder[1] + upper_arm * math.cos(abduction) * foreshorten,
            )
            wrist = (
                elbow[0] + lateral * forearm * math.sin(0.6 * abduction),
                elbow[1] + forearm * math.cos(0.6 * abduction) * foreshorten,
            )
            lift = 0.035 * fh * max(0.0, math.sin(phase) * sign)
            hip = (cx + lateral * 0.5 * hip_hw, hip_y)
            knee = (cx + lateral * (0.5 * hip_hw + 0.005 * fh), knee_y - 0.5 * lift)
            ankle = (cx + lateral * (0.5 * hip_hw + 0.01 * fh), ankle_y - lift)
        for name, point in (
            ("shoulder", shoulder),
            ("elbow", elbow),
            ("wrist", wrist),
            ("hip", hip),
            ("knee", knee),
            ("ankle", ankle),
        ):
            joints[f"{side}_{name}"] = point

    # A detector's box is tight around the person and resized to the crop: the figure is
    # drawn `stretch` times wider so that its width fills `width_fill` of the image (within
    # the aspect limits of such boxes), and its box is centred.
    reach = max(thigh_r, arm_r, 0.045 * fh)
    xs = [x for x, _ in joints.values()] + [head_cx - 1.3 * head_rx, head_cx + 1.3 * head_rx]
    left, right = min(xs) - reach, max(xs) + reach
    stretch = float(np.clip(width_fill * w / (right - left), 0.9, 1.5))
    dx = w * (0.5 + shift_x) - (cx + stretch * ((left + right) / 2 - cx))
    cx, head_cx = cx + dx, head_cx + dx
    joints = {name: (x + dx, y) for name, (x, y) in joints.items()}

    def width_at(y):  # pixel width per body width at row y: stretch and keystone
        return stretch * (1.0 + camera.tilt * (0.5 - np.clip((y - top) / fh, 0.0, 1.0)))

    canvas = _Canvas(scene, cx, width_at)
    skin = identity.skin * tints[0]
    upper_rgb, lower_rgb = identity.upper_rgb * tints[1], identity.lower_rgb * tints[2]
    hair_rgb, shoe_rgb = identity.hair_rgb * tints[3], identity.shoe_rgb
    accessory_rgb = identity.accessory_rgb * tints[4]

    def draw_leg(side):
        hip, knee, ankle = (joints[f"{side}_{j}"] for j in ("hip", "knee", "ankle"))
        bare = a["lower_type"] != "trousers"
        leg = canvas.capsule(hip, knee, thigh_r) | canvas.capsule(knee, ankle, calf_r)
        canvas.paint(leg, skin if bare else lower_rgb, LOWER)
        if a["lower_type"] == "shorts":
            canvas.paint(
                canvas.capsule(hip, _towards(hip, knee, 0.6), 1.12 * thigh_r), lower_rgb, LOWER
            )
        forward = facing * 0.02 * fh if side_view else 0.0
        foot = canvas.ellipse(
            ankle[0] + forward,
            ankle[1] + 0.02 * fh,
            (0.045 if side_view else 0.035) * fh,
            0.022 * fh,
        )
        canvas.paint(foot, shoe_rgb, FEET)

    def draw_arm(side):
        shoulder, elbow, wrist = (joints[f"{side}_{j}"] for j in ("shoulder", "elbow", "wrist"))
        short = a["upper_type"] == "short_sleeve"
        arm = canvas.capsule(shoulder, elbow, arm_r) | canvas.capsule(elbow, wrist, 0.9 * arm_r)
        canvas.paint(arm, skin if short else upper_rgb, ARMS)
        if short:
            canvas.paint(
                canvas.capsule(shoulder, _towards(shoulder, elbow, 0.55), 1.12 * arm_r),
                upper_rgb,
                ARMS,
            )
        canvas.paint(canvas.ellipse(wrist[0], wrist[1] + 0.3 * hand_r, hand_r, hand_r), skin, ARMS)

    def hair_shape():
        if view == "front":
            cap = canvas.ellipse(head_cx, head_cy - 0.12 * head_ry, 1.06 * head_rx, 0.95 * head_ry)
            return cap & (canvas.yy < head_cy - 0.3 * head_ry)
        if view == "back":
            cap = canvas.ellipse(head_cx, head_cy - 0.05 * head_ry, 1.05 * head_rx, 1.02 * head_ry)
            return cap & (canvas.yy < head_cy + 0.55 * head_ry)
        cap = canvas.ellipse(
            head_cx - facing * 0.05 * head_rx,
            head_cy - 0.1 * head_ry,
            1.06 * head_rx,
            0.97 * head_ry,
        )
        return cap & (
            (canvas.yy < head_cy - 0.3 * head_ry)
            | (facing * (canvas.xx - head_cx) < -0.15 * head_rx)
        )

    long_hair = a["hair"] == "long"
    hair_end = shoulder_y + (0.12 if female else 0.06) * fh
    if draw_figure:
        if long_hair and view == "front":
            canvas.paint(
                canvas.band([head_cy, hair_end], [1.15 * head_rx] * 2, [head_cx] * 2),
                hair_rgb,
                HEAD,
            )
        if side_view:
            if a["bag"] == "backpack":
                back_x = cx - facing * (flat * shoulder_hw + 0.03 * fh)
                pack = canvas.band(
                    [shoulder_y + 0.01 * fh, waist_y + 0.02 * fh], [0.05 * fh] * 2, [back_x] * 2
                )
                canvas.paint(pack, accessory_rgb, IGNORE)
            far = "left" if near == "right" else "right"
            draw_arm(far)
            draw_leg(far)
            draw_leg(near)
        else:
            draw_leg("left")
            draw_leg("right")
        if a["lower_type"] != "skirt":
            pelvis = canvas.band(
                [waist_y, hip_y + 0.05 * fh], [flat * waist_hw, flat * hip_hw], [cx, cx]
            )
            canvas.paint(pelvis, lower_rgb, LOWER)
        neck = canvas.band([head_cy, shoulder_y + 0.01 * fh], [0.028 * fh] * 2, [head_cx, cx])
        canvas.paint(neck, skin, HEAD)
        torso_x = cx + (facing * 0.02 * fh if side_view and elderly else 0.0)
        torso = canvas.band(
            [shoulder_y, waist_y, hip_y + 0.01 * fh],
            [flat * shoulder_hw, flat * waist_hw, flat * hip_hw * 0.98],
            [torso_x, cx, cx],
        ) | canvas.capsule(joints["left_shoulder"], joints["right_shoulder"], 1.1 * arm_r)
        canvas.paint(torso, upper_rgb, UPPER)
        if identity.stripe_period:
            stripes = torso & (((canvas.yy - top) / (identity.stripe_period * fh)) % 1.0 < 0.3)
            darker = upper_rgb * 0.6 if upper_rgb.mean() > 60 else upper_rgb + 45
            canvas.image[stripes] = darker
        if a["lower_type"] == "skirt":
            skirt = canvas.band(
                [hip_y - 0.05 * fh, knee_y - 0.03 * fh],
                [flat * hip_hw, flat * 1.45 * hip_hw],
                [cx, cx],
            )
            canvas.paint(skirt, lower_rgb, LOWER)
        if a["bag"] == "backpack" and view == "back":
            pack = canvas.band(
                [shoulder_y + 0.02 * fh, waist_y + 0.02 * fh], [0.75 * shoulder_hw] * 2, [cx, cx]
            )
            canvas.paint(pack, accessory_rgb, IGNORE)
        elif a["bag"] == "backpack" and view == "front":
            for lateral in (-1.0, 1.0):
                strap = canvas.capsule(
                    (cx + lateral * 0.55 * shoulder_hw, shoulder_y),
                    (cx + lateral * 0.5 * shoulder_hw, waist_y - 0.05 * fh),
                    0.013 * fh,
                )
                canvas.paint(strap, accessory_rgb, IGNORE)
        for side in (near,) if side_view else ("left", "right"):
            draw_arm(side)
        canvas.paint(canvas.ellipse(head_cx, head_cy, head_rx, head_ry), skin, HEAD)
        if side_view:
            nose = canvas.ellipse(
                head_cx + facing * 0.95 * head_rx,
                head_cy + 0.1 * head_ry,
                0.25 * head_rx,
                0.2 * head_ry,
            )
            canvas.paint(nose, skin, HEAD)
        canvas.paint(hair_shape(), hair_rgb, HEAD)
        if long_hair and view != "front":
            if view == "back":
                hang = canvas.band([head_cy, hair_end], [1.1 * head_rx] * 2, [head_cx] * 2)
            else:
                hang = canvas.band(
                    [head_cy - 0.5 * head_ry, hair_end],
                    [0.45 * head_rx] * 2,
                    [head_cx - facing * 0.65 * head_rx] * 2,
                )
            canvas.paint(hang, hair_rgb, HEAD)
        elif long_hair:
            for lateral in (-1.0, 1.0):
                strand = canvas.capsule(
                    (head_cx + lateral * head_rx, head_cy - 0.3 * head_ry),
                    (head_cx + lateral * 1.05 * head_rx, head_cy + 1.3 * head_ry),
                    0.28 * head_rx,
                )
                canvas.paint(strand, hair_rgb, HEAD)
        if view == "front":
            for lateral in (-0.38, 0.38):
                eye = canvas.ellipse(
                    head_cx + lateral * head_rx, head_cy - 0.05 * head_ry, 0.6, 0.6
                )
                canvas.image[eye] = (30, 25, 25)
        if a["hat"] == "hat":
            head_top = head_cy - head_ry
            reach = facing * 0.5 * head_rx if side_view else 0.0
            brim = canvas.band(
                [head_top + 0.25 * head_ry, head_top + 0.42 * head_ry],
                [1.3 * head_rx] * 2,
                [head_cx + reach] * 2,
            )
            crown = canvas.ellipse(
                head_cx, head_top + 0.2 * head_ry, 1.05 * head_rx, 0.55 * head_ry
            )
            canvas.paint(
                brim | (crown & (canvas.yy < head_top + 0.35 * head_ry)), accessory_rgb, HEAD
            )
        if a["bag"] == "handbag":
            wx, wy = joints[f"{near if side_view else 'right'}_wrist"]
            bag = canvas.rect(wx - 0.045 * fh, wy + 0.02 * fh, wx + 0.045 * fh, wy + 0.11 * fh)
            canvas.paint(
                bag | canvas.capsule((wx, wy), (wx, wy + 0.02 * fh), 0.01 * fh),
                accessory_rgb,
                IGNORE,
            )
        figure = canvas.parts != BACKGROUND
        shade = 1.0 - 0.18 * np.clip(((canvas.xx - cx) / (1.3 * shoulder_hw)) ** 2, 0.0, 1.0)
        canvas.image[figure] *= shade[figure][:, None]

    occluder = None
    if occluded:
        if occluder_kind == 0:  # something low in front: a bench, a car, a railing
            y0 = ground - occluder_extent * fh
            x0 = w * 0.5 * occluder_offset * 0.5
            occluder = (x0, y0, w - x0 * occluder_offset, h)
        else:  # something at the side: a pole, a passer-by
            # it covers `occluder_extent` of the figure's width, from one side
            half = (flat * shoulder_hw + arm_r) * width_at(waist_y)
            edge = -1.0 if occluder_kind == 1 else 1.0
            reach = cx + edge * half * (1.0 - 2.0 * occluder_extent)
            y0 = h * 0.3 * occluder_offset
            occluder = (0.0, y0, reach, h) if occluder_kind == 1 else (reach, y0, float(w), h)
        occluder = tuple(
            int(round(min(max(v, 0), lim))) for v, lim in zip(occluder, (w, h, w, h), strict=True)
        )
        canvas.paint(canvas.pixel_rect(*occluder), occluder_rgb, BACKGROUND)

    light = light_slope * (
        math.cos(light_angle) * (canvas.px / w - 0.5)
        + math.sin(light_angle) * (canvas.yy / h - 0.5)
    )
    image = _blur(canvas.image, blur) * (camera.gain * image_gain)
    image = image * (1.0 + light[..., None]) + noise
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    keypoints = _keypoints(joints, view, facing, near, head_cx, head_cy, head_rx, head_ry)
    keypoints[:, 0] = canvas.pixel_x(keypoints[:, 0], keypoints[:, 1])
    _hide_keypoints(keypoints, canvas.parts, occluder, size, draw_figure)
    rows, cols = np.nonzero(canvas.parts)
    box = (
        (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        if rows.size
        else (0, 0, 0, 0)
    )
    return Rendering(image, canvas.parts, keypoints, box, occluder, view, float(blur))


def _keypoints(joints, view, facing, near, head_cx, head_cy, head_rx, head_ry) -> np.ndarray:
    points = {name: (*joints[name], 2.0) for name in joints}
    if view.startswith("side"):
        far = "left" if near == "right" else "right"
        for name in joints:
            if name.startswith(far):
                points[name] = (*joints[name], 1.0)
        eye = (head_cx + facing * 0.6 * head_rx, head_cy - 0.1 * head_ry)
        ear = (head_cx - facing * 0.1 * head_rx, head_cy)
        points["nose"] = (head_cx + facing * 1.05 * head_rx, head_cy + 0.1 * head_ry, 2.0)
        for side in ("left", "right"):
            seen = 2.0 if side == near else 1.0
            points[f"{side}_eye"] = (*eye, seen)
            points[f"{side}_ear"] = (*ear, seen)
    else:
        front = view == "front"
        face = 2.0 if front else 1.0
        points["nose"] = (head_cx, head_cy + 0.15 * head_ry, face)
        for side, sign in (("left", 1.0), ("right", -1.0)):
            lateral = sign * (1.0 if front else -1.0)
            points[f"{side}_eye"] = (
                head_cx + lateral * 0.38 * head_rx,
                head_cy - 0.05 * head_ry,
                face,
            )
            points[f"{side}_ear"] = (head_cx + lateral * head_rx, head_cy, 2.0)
    return np.array([points[name] for name in KEYPOINT_NAMES], dtype=np.float32)


def _hide_keypoints(keypoints, parts, occluder, size, drawn) -> None:
    """Occluded or bagged keypoints become hidden (1); those outside the image absent (0)."""
    h, w = size
    for k in keypoints:
        x, y = k[0], k[1]
        if not (0 <= x < w and 0 <= y < h) or not drawn:
            k[:] = 0.0
            continue
        under_occluder = occluder is not None and (
            occluder[0] <= x < occluder[2] and occluder[1] <= y < occluder[3]
        )
        if k[2] == 2 and (under_occluder or parts[int(y), int(x)] == IGNORE):
            k[2] = 1.0
