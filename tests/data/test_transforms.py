"""Multi-crop: label maps, keypoints and pixels follow every crop and flip exactly."""

import numpy as np
import pytest
import torch

from clasp.data.transforms import (
    COCO_FLIP_PAIRS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCrop,
)

GRID = (12, 5)  # a coarse per-patch map over the whole image, like a teacher's labels


def coordinate_sample(h: int, w: int) -> dict:
    """An image whose red and green are ramps in x and y, a label map holding each pixel's
    own index, a coarse grid holding each cell's index, and random keypoints."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack(
        [
            torch.round(255 * (xs + 0.5) / w),
            torch.round(255 * (ys + 0.5) / h),
            torch.full((h, w), 128.0),
        ]
    ).to(torch.uint8)
    keypoints = torch.stack(
        [torch.rand(17) * w, torch.rand(17) * h, torch.randint(0, 3, (17,)).float()], dim=1
    )
    return {
        "image": image,
        "coords": ys * w + xs,
        "grid": torch.arange(GRID[0] * GRID[1]).view(GRID),
        "keypoints": keypoints,
        "pid": 3,
    }


def source_cells(box, out_size, shape):
    """Index of the source cell under each output cell's centre, computed from the box."""
    top, left, height, width, flipped = box.tolist()
    rows, cols = out_size
    j = np.arange(cols)
    if flipped:
        j = cols - 1 - j
    y = top + (np.arange(rows) + 0.5) / rows * height
    x = left + (j + 0.5) / cols * width
    r = np.clip(np.floor(y * shape[0]), 0, shape[0] - 1).astype(np.int64)
    c = np.clip(np.floor(x * shape[1]), 0, shape[1] - 1).astype(np.int64)
    return r, c, y, x


def unnormalise(crop: torch.Tensor) -> torch.Tensor:
    return crop * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(
        3, 1, 1
    )


@pytest.mark.parametrize(
    "h,w,flip_p",
    [
        pytest.param(96, 40, 0.0, id="small-noflip"),
        pytest.param(96, 40, 1.0, id="small-flip"),
        pytest.param(77, 45, 0.5, id="odd-mixed"),
        pytest.param(640, 256, 0.5, id="large-downscaled"),
    ],
)
def test_multicrop_labels_keypoints_and_pixels_follow_the_crop(h, w, flip_p):
    transform = MultiCrop(
        global_size=(64, 32),
        local_size=(32, 16),
        n_global=2,
        n_local=5,
        flip_p=flip_p,
        color_jitter=None,
        grayscale_p=0.0,
        label_keys={"coords": "pixel", "grid": "patch", "soft": "patch"},
        patch_size=8,
    )
    sample = coordinate_sample(h, w)
    # soft labels with a leading class dim, e.g. a teacher's probabilities per patch
    sample["soft"] = torch.stack([sample["grid"].float(), -sample["grid"].float()])
    out = transform(sample)
    assert set(out) == {"pid", "crops", "crop_boxes", "crop_labels", "crop_keypoints"}
    boxes = out["crop_boxes"]
    assert boxes.dtype == torch.float64 and boxes.shape == (7, 5)
    assert ((boxes[:, :2] >= 0) & (boxes[:, :2] + boxes[:, 2:4] <= 1 + 1e-12)).all()
    if flip_p in (0.0, 1.0):
        assert (boxes[:, 4] == flip_p).all()
    perm = np.arange(17)
    for a, b in COCO_FLIP_PAIRS:
        perm[a], perm[b] = b, a
    for i, box in enumerate(boxes):
        size = (64, 32) if i < 2 else (32, 16)
        crop = out["crops"][i]
        assert crop.shape == (3, *size) and crop.dtype == torch.float32
        r, c, y, x = source_cells(box, size, (h, w))
        coords = out["crop_labels"]["coords"][i]
        assert torch.equal(coords, torch.from_numpy(r[:, None] * w + c[None, :]))
        gr, gc, _, _ = source_cells(box, (size[0] // 8, size[1] // 8), GRID)
        grid = out["crop_labels"]["grid"][i]
        assert torch.equal(grid, torch.from_numpy(gr[:, None] * GRID[1] + gc[None, :]))
        assert torch.equal(
            out["crop_labels"]["soft"][i], torch.stack([grid.float(), -grid.float()])
        )
        # pixels: the red/green ramps read at the same source positions (interior only,
        # where bilinear sampling of a linear ramp is exact up to the ramp's rounding)
        rgb = unnormalise(crop)
        margin = 2.0 / min(64 / np.sqrt(0.4), h) if h > 200 else 1.0 / w
        inner_x = (x > margin) & (x < 1 - margin)
        inner_y = (y > 1.0 / h * (4 if h > 200 else 1)) & (y < 1 - 1.0 / h * (4 if h > 200 else 1))
        red, green = rgb[0][:, inner_x], rgb[1][inner_y, :]
        tolerance = (3.0 if h > 200 else 1.0) / 255
        assert torch.allclose(
            red, torch.from_numpy(x[inner_x]).float().expand_as(red), atol=tolerance
        )
        assert torch.allclose(
            green, torch.from_numpy(y[inner_y]).float()[:, None].expand_as(green), atol=tolerance
        )
        # keypoints
        kp_in = sample["keypoints"].double().numpy()
        top, left, height, width, flipped = box.tolist()
        kx = (kp_in[:, 0] / w - left) / width * size[1]
        ky = (kp_in[:, 1] / h - top) / height * size[0]
        if flipped:
            kx, ky, vis = (size[1] - kx)[perm], ky[perm], kp_in[perm, 2]
        else:
            vis = kp_in[:, 2]
        inside = (kx >= 0) & (kx < size[1]) & (ky >= 0) & (ky < size[0]) & (vis > 0)
        expected = np.where(inside[:, None], np.stack([kx, ky, vis], 1), 0.0)
        assert np.allclose(out["crop_keypoints"][i].numpy(), expected, atol=1e-4)


def test_crop_scales_and_aspect():
    transform = MultiCrop(n_global=2, n_local=30, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4))
    out = transform({"image": torch.zeros(3, 128, 64, dtype=torch.uint8)})
    area = out["crop_boxes"][:, 2] * out["crop_boxes"][:, 3]
    assert ((area[:2] >= 0.4 - 1e-9) & (area[:2] <= 1 + 1e-9)).all()
    assert ((area[2:] >= 0.05 - 1e-9) & (area[2:] <= 0.4 + 1e-9)).all()
    aspect = out["crop_boxes"][2:, 2] * 128 / (out["crop_boxes"][2:, 3] * 64)
    assert ((aspect > 2 * 0.75 - 1e-9) & (aspect < 2 * 4 / 3 + 1e-9)).all()
    assert "crop_labels" in out and out["crop_labels"] == {}


def test_local_crops_fall_on_the_labelled_person():
    """With focus_key, local boxes lie inside the box around the map's cells > 0, their area a
    local_scale fraction of it; globals still span the image; no person = whole image."""
    parts = torch.zeros(8, 4, dtype=torch.int64)
    parts[2:7, 1:3] = 3  # the person: rows 2-6, columns 1-2 of the grid
    parts[0, 0] = -1  # unknown cells are not the person
    transform = MultiCrop(
        n_global=2, n_local=40, local_scale=(0.1, 0.4), label_keys={"parts": "patch"},
        patch_size=16, focus_key="parts",
    )  # fmt: skip
    image = torch.zeros(3, 128, 64, dtype=torch.uint8)
    boxes = transform({"image": image, "parts": parts})["crop_boxes"]
    top, left, height, width = boxes[2:, :4].unbind(1)
    person = (2 / 8, 1 / 4, 5 / 8, 2 / 4)
    assert (top >= person[0] - 1e-9).all() and (left >= person[1] - 1e-9).all()
    assert (top + height <= person[0] + person[2] + 1e-9).all()
    assert (left + width <= person[1] + person[3] + 1e-9).all()
    area = height * width / (person[2] * person[3])
    assert ((area >= 0.1 - 1e-9) & (area <= 0.4 + 1e-9)).all()
    assert (boxes[:2, 2] * boxes[:2, 3] >= 0.4 - 1e-9).all()  # globals: of the whole image

    background_only = torch.zeros(8, 4, dtype=torch.int64)
    boxes = transform({"image": image, "parts": background_only})["crop_boxes"]
    outside = (boxes[2:, 0] < person[0]) | (boxes[2:, 1] + boxes[2:, 3] > person[1] + person[3])
    assert outside.any()  # no foreground: locals anywhere in the image


def colour_pair(jitter, seed=0):
    """Global crops without and with a colour setting, from the same crop boxes."""
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(32), indexing="ij")
    image = torch.stack([80 + xs * 2, 90 + ys, 170 - ys]).to(torch.uint8)  # no clamping needed
    outs = []
    for setting in (None, jitter):
        torch.manual_seed(seed)
        kwargs = {"color_jitter": setting, "jitter_p": 1.0, "grayscale_p": 0.0, "n_local": 0}
        outs.append(MultiCrop(global_size=(64, 32), **kwargs)({"image": image}))
    assert torch.equal(outs[0]["crop_boxes"], outs[1]["crop_boxes"])
    return [torch.stack([unnormalise(c) for c in o["crops"]]) for o in outs]


def luma(x):
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def test_colour_jitter_semantics():
    plain, bright = colour_pair((0.4, 0, 0, 0))
    ratio = bright / plain
    assert torch.allclose(ratio, ratio.flatten(1)[:, :1, None, None].expand_as(ratio), atol=1e-4)
    plain, contrast = colour_pair((0, 0.4, 0, 0))
    assert torch.allclose(luma(contrast).mean((1, 2)), luma(plain).mean((1, 2)), atol=1e-4)
    assert not torch.allclose(contrast, plain, atol=1e-3)
    plain, saturated = colour_pair((0, 0, 0.5, 0))
    assert torch.allclose(luma(saturated), luma(plain), atol=1e-4)
    plain, hued = colour_pair((0, 0, 0, 0.3))
    assert torch.allclose(luma(hued), luma(plain), atol=1e-3)
    assert not torch.allclose(hued, plain, atol=1e-3)
    torch.manual_seed(1)
    grey = MultiCrop(color_jitter=None, grayscale_p=1.0)(
        {"image": torch.randint(0, 256, (3, 90, 50), dtype=torch.uint8)}
    )
    for crop in grey["crops"]:
        rgb = unnormalise(crop)
        assert torch.allclose(rgb[0], rgb[1], atol=1e-5) and torch.allclose(
            rgb[1], rgb[2], atol=1e-5
        )
        assert rgb.min() >= -1e-6 and rgb.max() <= 1 + 1e-6


def test_multicrop_rejects_bad_settings():
    with pytest.raises(ValueError, match="patch_size"):
        MultiCrop(label_keys={"parts": "patch"})
    with pytest.raises(ValueError, match="multiple"):
        MultiCrop(patch_size=16, local_size=(40, 20))
    with pytest.raises(ValueError, match="global_scale"):
        MultiCrop(global_scale=(0.0, 1.0))


def test_eval_transform():
    sample = coordinate_sample(96, 40)
    out = EvalTransform((64, 32), label_keys={"coords": "pixel", "grid": "patch"}, patch_size=8)(
        sample
    )
    assert out["image"].shape == (3, 64, 32) and out["pid"] == 3
    r, c, _, _ = source_cells(torch.tensor([0, 0, 1, 1, 0.0]), (64, 32), (96, 40))
    assert torch.equal(out["coords"], torch.from_numpy(r[:, None] * 40 + c[None, :]))
    assert out["grid"].shape == (8, 4)
    kp = sample["keypoints"]
    seen = kp[:, 2] > 0
    assert torch.allclose(
        out["keypoints"][seen, :2], kp[seen, :2] * torch.tensor([32 / 40, 64 / 96]), atol=1e-4
    )
    assert (out["keypoints"][~seen] == 0).all()
