"""Image decoding for every entry point (training data, evaluation, chat, server), with the same rules:
EXIF orientation applied, any mode (palette, RGBA, CMYK, 16-bit, grayscale) made 8-bit RGB, and
decompression bombs refused before their pixels are decoded.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from vitune.errors import VituneError

DEFAULT_MAX_PIXELS = 64_000_000


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int | None = DEFAULT_MAX_PIXELS, where: str = "") -> Image.Image:
    """An RGB image from a path, raw bytes or a PIL image; VituneError names `where` on failure."""
    label = where or (str(source) if isinstance(source, (str, Path)) else "image")
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            if isinstance(source, bytes):
                image = Image.open(io.BytesIO(source))
            else:
                image = Image.open(source)
        except FileNotFoundError:
            raise VituneError(f"{label}: image file not found") from None
        except Image.DecompressionBombError as err:  # not an OSError: Pillow's own refusal past 2x MAX_IMAGE_PIXELS
            raise VituneError(f"{label}: image is over the limit of a decodable size ({err})") from None
        except (UnidentifiedImageError, OSError) as err:
            raise VituneError(f"{label}: not a decodable image ({err})") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise VituneError(f"{label}: image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if width < 1 or height < 1:
        raise VituneError(f"{label}: image has no pixels ({width}x{height})")
    try:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as err:
        raise VituneError(f"{label}: image data is truncated or corrupt ({err})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale the range to 8 bits instead of clipping at 255.
        image = image.point(lambda v: v / 256).convert("L") if image.mode != "I" else image.convert("F").point(lambda v: v / 256).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's 'pad': centre the image on a square of the encoder's mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
