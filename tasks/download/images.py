"""Decode, verify, downscale and re-encode one downloaded image, in bounded memory (DESIGN.md "download").

``process_image`` turns the bytes a server sent into the JPEG the shard stores: short
side ``download.short_side`` (never upsampled), aspect ratio and EXIF orientation
kept, transparency composited on white, 16-bit greyscale scaled (not clipped), or an
``ImageRejected`` with a stable reason: ``not_an_image`` (also any format outside
``IMAGE_FORMATS``), ``decode_error`` (truncated or corrupt), ``image_too_small``,
``too_many_pixels``.

Memory (issue 13). Only ``IMAGE_FORMATS`` are opened, and an image over
``download.max_pixels`` is refused from its header, before decoding. The one
full-size buffer is then the decoder's: the decoded image, at most 4 bytes per pixel
(Pillow keeps RGB, RGBA, CMYK, I and F in 4 bytes, I;16 in 2, L and P in 1); for a
progressive JPEG, libjpeg's DCT coefficients, 2 bytes per sample (up to 8 per pixel
for CMYK); for WebP, libwebp's canvases and the copy Pillow takes of one, ~16 bytes
per pixel, the costliest admitted format. Nothing after decoding copies the full
image: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (``draft``); any other image is
converted and box-reduced strip by strip (``_reduce_to_rgb``), by the factors
Pillow's ``resize(reducing_gap=3.0)`` would take, and only the reduced image is
resized, rotated and encoded. So one decode costs at most 16 bytes x ``max_pixels``
(+ 32 MiB for strips, the reduced image and the encode) over the process's baseline,
and a download process at most ``decode_threads`` times that
(``bench/download_memory.py`` measures each format; BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image

from tasks.config import DownloadConfig

# The formats of images on the web; each has a known decode cost (see above). Pillow
# opens ~40 more (PSD, FITS, JPEG 2000, ...), some with decoders of their own size.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_STRIP_PIXELS = 1 << 18  # pixels of one strip converted at a time (each copy of it ~1 MB)
_REDUCING_GAP = 3.0  # box-reduce while the image is over 3x the target, as resize(reducing_gap=3.0)
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class ProcessedImage:
    jpeg: bytes
    orig_width: int
    orig_height: int
    width: int
    height: int
    sha256: str


class ImageRejected(ValueError):
    """An image that cannot be used; ``reason`` is the stable code recorded per URL."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Size with the short side at ``short_side`` and the aspect ratio kept; never larger."""
    short = min(width, height)
    if short <= short_side:
        return width, height
    if width <= height:
        return short_side, max(short_side, round(height * short_side / width))
    return max(short_side, round(width * short_side / height)), short_side


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit greyscale: convert("L") would clip everything above 255 to white.
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return img.convert("RGB")


def _reduce_to_rgb(img: Image.Image, factor: tuple[int, int]) -> Image.Image:
    """``img`` as RGB, box-reduced by ``factor``, converted strip by strip: no full-size copy.

    Compositing on white commutes with averaging, so converting before reducing gives
    what a premultiplied reduce would.
    """
    if img.mode == "RGB" and factor == (1, 1):
        return img
    fx, fy = factor
    width, height = img.size
    out = Image.new("RGB", (-(-width // fx), -(-height // fy)))
    rows = max(fy, _STRIP_PIXELS // width // fy * fy)  # a multiple of fy: blocks never straddle strips
    for top in range(0, height, rows):
        strip = _to_rgb(img.crop((0, top, width, min(height, top + rows))))
        out.paste(strip.reduce(factor) if factor != (1, 1) else strip, (0, top // fy))
    return out


def _decode(data: bytes, cfg: DownloadConfig) -> tuple[Image.Image, tuple[int, int], int]:
    """The opened, checked and loaded image (JPEG at draft scale), its raw size, its EXIF orientation."""
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.UnidentifiedImageError as exc:
        raise ImageRejected("not_an_image") from exc
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from exc
    except Exception as exc:  # Pillow raises many types on corrupt headers
        raise ImageRejected("decode_error", repr(exc)) from exc
    raw = img.size
    if raw[0] * raw[1] > cfg.max_pixels:
        img.close()
        raise ImageRejected("too_many_pixels", f"{raw[0]}x{raw[1]}")
    if min(raw) < cfg.min_side:
        img.close()
        raise ImageRejected("image_too_small", f"{raw[0]}x{raw[1]}")
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a corrupt EXIF block is no reason to drop the image
        orientation = 1
    try:
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale straight from the DCT
        # coefficients, never below the target size; the big win in decode time.
        img.draft("RGB", target_size(*raw, cfg.short_side))
        img.load()  # the full decode: a truncated file raises here
    except Exception as exc:  # any failure on a hostile file is this image's, not the shard's
        img.close()
        raise ImageRejected("decode_error", repr(exc)) from exc
    return img, raw, orientation


def process_image(data: bytes, cfg: DownloadConfig) -> ProcessedImage:
    """Decode and verify ``data``, downscale (short side ``cfg.short_side``), re-encode JPEG.

    Raises ``ImageRejected`` (see the module docstring for the reasons).
    """
    img, (raw_width, raw_height), orientation = _decode(data, cfg)
    try:
        size = target_size(*img.size, cfg.short_side)
        factor = (int(img.width / size[0] / _REDUCING_GAP) or 1, int(img.height / size[1] / _REDUCING_GAP) or 1)
        small = _reduce_to_rgb(img, factor)
        if size != small.size:
            # The reduced image's exact extent in its own pixels, as resize(reducing_gap) keeps it.
            box = (0, 0, img.width / factor[0], img.height / factor[1])
            small = small.resize(size, _RESAMPLE[cfg.resample], box=box)
        if small is not img:
            img.close()  # the full-size buffer goes before the encode
        if orientation in _UPRIGHT:
            small = small.transpose(_UPRIGHT[orientation])
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=cfg.jpeg_quality)
    except Exception as exc:  # any failure on a hostile file is this image's, not the shard's
        raise ImageRejected("decode_error", repr(exc)) from exc
    finally:
        img.close()
    jpeg = buffer.getvalue()
    swapped = orientation in _SWAPS_AXES
    return ProcessedImage(
        jpeg=jpeg,
        orig_width=raw_height if swapped else raw_width,
        orig_height=raw_width if swapped else raw_height,
        width=small.width,
        height=small.height,
        sha256=hashlib.sha256(jpeg).hexdigest(),
    )
