"""Image decoding: every broken or unusual image is either handled correctly or rejected by name."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitune.errors import VituneError
from vitune.images import expand_to_square, load_image


def save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    img.save(path, format=fmt, **kw)
    return path


def test_modes_become_8bit_rgb(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (8, 6), (200, 30, 10))
    cases = {
        "cmyk.jpg": save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG", quality=100),
        "palette.png": save(rgb.convert("P", palette=Image.Palette.ADAPTIVE), tmp_path / "palette.png", "PNG"),
        "gray.png": save(rgb.convert("L"), tmp_path / "gray.png", "PNG"),
    }
    for name, path in cases.items():
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (8, 6), name
    assert load_image(cases["palette.png"]).getpixel((0, 0)) == (200, 30, 10)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    img = load_image(save(rgba, tmp_path / "a.png", "PNG"))
    assert img.getpixel((1, 1)) == (255, 255, 255)


def test_16bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    path = save(Image.fromarray(arr), tmp_path / "g16.png", "PNG")
    assert Image.open(path).mode.startswith("I")
    r, g, b = load_image(path).getpixel((0, 0))
    assert r == g == b and 120 <= r <= 136


def test_exif_rotation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = save(img, tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes())
    assert load_image(path).size == (10, 20)


def test_extreme_sizes_load(tmp_path: Path) -> None:
    assert load_image(save(Image.new("RGB", (1, 1)), tmp_path / "1.png", "PNG")).size == (1, 1)
    wide = load_image(save(Image.new("RGB", (10000, 10)), tmp_path / "w.png", "PNG"))
    assert expand_to_square(wide, (1, 2, 3)).size == (10000, 10000)


def test_wrong_extension_is_read_by_content(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (3, 3), (1, 2, 3)), tmp_path / "really_png.jpg", "PNG")
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("content, reason", [
    (b"", "not a decodable image"),
    (b"this is not an image at all", "not a decodable image"),
])
def test_undecodable_files_named(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(VituneError, match=reason) as err:
        load_image(path)
    assert "bad.png" in str(err.value)


def test_truncated_image_named(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(VituneError, match="cut.png: image data is truncated or corrupt"):
        load_image(path)


def test_missing_file_and_bomb(tmp_path: Path) -> None:
    with pytest.raises(VituneError, match="image file not found"):
        load_image(tmp_path / "nope.png")
    path = save(Image.new("L", (3000, 3000)), tmp_path / "big.png", "PNG")
    with pytest.raises(VituneError, match="over the limit of 1000000"):
        load_image(path, max_pixels=1_000_000, where="record 3: image")


def test_bytes_source_with_where() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (5, 6, 7)).save(buf, "PNG")
    assert load_image(buf.getvalue()).getpixel((1, 1)) == (5, 6, 7)
    with pytest.raises(VituneError, match="request image 2"):
        load_image(b"\x89PNG broken", where="request image 2")
