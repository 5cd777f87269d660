"""Every image mode becomes upright 8-bit RGB; unreadable files fail with the path named."""

import errno
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clasp.data import images
from clasp.data.images import ImageReadError, list_images, read_error, read_rgb


def write_png_rgb16(path, array: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = array.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
    path.write_bytes(png + chunk(b"IEND", b""))


def rgb(path) -> np.ndarray:
    image = read_rgb(str(path))
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_grayscale_and_bilevel(tmp_path):
    gray = np.random.randint(0, 256, (20, 10), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    out = rgb(tmp_path / "l.png")
    assert out.shape == (20, 10, 3) and (out == gray[..., None]).all()
    Image.fromarray(gray > 127).convert("1").save(tmp_path / "bw.png")
    assert set(np.unique(rgb(tmp_path / "bw.png"))) <= {0, 255}


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (200, 10, 20, 255)  # opaque keeps its colour
    rgba[1, 1] = (0, 0, 0, 0)  # transparent becomes white, not black
    rgba[2, 2] = (0, 0, 0, 128)  # half transparent black is mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = rgb(tmp_path / "a.png")
    assert tuple(out[0, 0]) == (200, 10, 20)
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert np.all(np.abs(out[2, 2] - 127) <= 1)
    la = Image.fromarray(rgba[..., [0, 3]].copy(), "LA")
    la.save(tmp_path / "la.png")
    assert tuple(rgb(tmp_path / "la.png")[1, 1]) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (6, 3))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "p.png")
    out = rgb(tmp_path / "p.png")
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[1, 1]) == (255, 0, 0)
    palette.save(tmp_path / "pt.png", transparency=1)
    assert tuple(rgb(tmp_path / "pt.png")[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert np.all(np.abs(rgb(tmp_path / "c.jpg")[8, 8] - (255, 0, 0)) <= 3)


def test_16_bit_greyscale_keeps_its_range(tmp_path):
    bright = np.full((8, 8), 65535, np.uint16)
    bright[0, 0] = 0
    Image.fromarray(bright).save(tmp_path / "bright.png")
    out = rgb(tmp_path / "bright.png")
    assert out[1, 1, 0] == 255 and out[0, 0, 0] == 0
    dark = np.linspace(0, 1000, 64).astype(np.uint16).reshape(8, 8)  # must stay dark
    Image.fromarray(dark).save(tmp_path / "dark.tif")
    assert rgb(tmp_path / "dark.tif").max() <= 4


def test_16_bit_rgb_png(tmp_path):
    array = np.zeros((6, 5, 3), np.uint16)
    array[..., 0], array[..., 1], array[..., 2] = 60000, 30000, 257
    write_png_rgb16(tmp_path / "rgb16.png", array)
    assert np.all(np.abs(rgb(tmp_path / "rgb16.png")[3, 2] - (233, 117, 1)) <= 1)


def test_float_image(tmp_path):
    values = np.linspace(0, 1, 32, dtype=np.float32).reshape(4, 8)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    out = rgb(tmp_path / "f.tif")
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_exif_rotation_is_applied(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)  # left half red, right half black
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    Image.fromarray(wide).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = rgb(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)  # upright: tall
    assert out[5, 10, 0] > 200 and out[35, 10, 0] < 50  # the red half is now on top


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"this is not an image at all", id="garbage"),
        pytest.param(None, id="truncated-jpeg"),
        pytest.param("png", id="truncated-png"),
    ],
)
def test_unreadable_files_raise_with_path(tmp_path, content):
    path = tmp_path / "bad.jpg"
    noise = np.random.randint(0, 256, (64, 64, 3), dtype=np.uint8)
    if content is None or content == "png":
        Image.fromarray(noise).save(path, "JPEG" if content is None else "PNG")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError) as error:
        read_rgb(str(path))
    assert str(path) in str(error.value) and error.value.reason
    assert "BytesIO" not in error.value.reason and " at 0x" not in error.value.reason
    assert read_error(str(path)) == error.value.reason
    if content == b"":
        assert error.value.reason == "empty file (0 bytes)"
    if content == b"this is not an image at all":
        assert error.value.reason.startswith("not an image file PIL can identify")


def _open_denied(path, *args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def test_files_that_cannot_be_opened_are_unreadable_with_the_reason(tmp_path, monkeypatch):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageReadError, match="missing.jpg: FileNotFoundError: No such file"):
        read_rgb(str(missing))
    link = tmp_path / "link.jpg"
    link.symlink_to(tmp_path / "moved.jpg")
    with pytest.raises(ImageReadError) as error:
        read_rgb(str(link))
    assert error.value.reason == f"dangling symbolic link (to {tmp_path / 'moved.jpg'})"
    # Tests run as root, whom chmod 000 does not stop: open() fails as it does for others.
    readable = tmp_path / "denied.png"
    Image.new("RGB", (4, 4)).save(readable)
    assert read_error(str(readable)) is None
    monkeypatch.setattr(images, "open", _open_denied, raising=False)  # read_rgb's open()
    with pytest.raises(ImageReadError) as error:
        read_rgb(str(readable))
    assert error.value.reason == "PermissionError: Permission denied"


def test_missing_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        list_images(str(tmp_path / "missing_dir"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        list_images(str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty"):
        list_images(str(tmp_path / "empty"))


def test_list_images_recursive_and_case_insensitive(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x.JPG", "a/y.png", "a/b/z.jpeg"):
        Image.new("RGB", (2, 2)).save(tmp_path / name, "PNG")
    (tmp_path / "a" / "b" / "skip.txt").write_text("-")
    found = [p.removeprefix(str(tmp_path) + "/") for p in list_images(str(tmp_path))]
    assert found == sorted(["x.JPG", "a/y.png", "a/b/z.jpeg"])
    assert list_images(str(tmp_path), recursive=False) == [str(tmp_path / "x.JPG")]
