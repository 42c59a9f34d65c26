"""Image processing of the download stage: geometry, modes, orientation, rejections, and bounded memory."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tasks.config import DownloadConfig
from tasks.demo.http_server import image_bytes
from tasks.download.images import IMAGE_FORMATS, ImageRejected, process_image, target_size

CFG = DownloadConfig()
JPEG_640x480 = image_bytes(640, 480)
REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("size", "expected"),
    [((640, 480), (341, 256)), ((300, 1000), (256, 853)), ((256, 256), (256, 256)), ((200, 120), (200, 120))],
)
def test_short_side_is_256_and_never_upsampled(size, expected):
    out = process_image(image_bytes(*size), CFG)
    assert (out.width, out.height) == expected
    assert (out.orig_width, out.orig_height) == size
    assert Image.open(io.BytesIO(out.jpeg)).size == expected
    assert out.sha256 == hashlib.sha256(out.jpeg).hexdigest()


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "L"), ("PNG", "1"), ("JPEG", "CMYK"), ("JPEG", "L"), ("WEBP", "RGB")],
)
def test_every_mode_becomes_rgb_jpeg(fmt, mode):
    out = process_image(image_bytes(400, 300, fmt, mode), CFG)
    img = Image.open(io.BytesIO(out.jpeg))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (341, 256))


def test_sixteen_bit_greyscale_keeps_its_range():
    img16 = Image.linear_gradient("L").resize((300, 300)).convert("I").point(lambda v: v * 256)
    buffer = io.BytesIO()
    img16.convert("I;16").save(buffer, "PNG")
    out = Image.open(io.BytesIO(process_image(buffer.getvalue(), CFG).jpeg)).convert("L")
    low, high = out.getextrema()
    assert low < 20 and high > 235  # not clipped to white


def test_exif_rotation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored landscape, shown portrait
    out = process_image(image_bytes(640, 480, exif=exif.tobytes()), CFG)
    assert (out.orig_width, out.orig_height) == (480, 640)
    assert (out.width, out.height) == (256, 341)


@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "box", "lanczos"])
def test_every_resample_filter_keeps_the_geometry(resample):
    out = process_image(JPEG_640x480, DownloadConfig(resample=resample))
    assert (out.width, out.height) == (341, 256)


def test_unknown_resample_filter_fails_fast():
    with pytest.raises(ValueError, match="resample"):
        DownloadConfig(resample="nearest-ish")


def test_process_image_rejects_with_reasons():
    with pytest.raises(ImageRejected) as not_image:
        process_image(b"GIF89a but not really", CFG)
    assert not_image.value.reason in ("not_an_image", "decode_error")
    with pytest.raises(ImageRejected, match="too_many_pixels"):
        process_image(image_bytes(400, 400, "PNG"), DownloadConfig(max_pixels=100_000))


def _rgba(width: int, height: int) -> Image.Image:
    """Colour ramps under an alpha ramp: opaque, half and fully transparent regions."""
    ramp = Image.linear_gradient("L").resize((width, height))
    alpha = ramp.transpose(Image.Transpose.ROTATE_90).resize((width, height))
    return Image.merge("RGBA", (ramp, ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                                ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM), alpha))


def _png(img: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG", compress_level=1, **save)
    return out.getvalue()


@pytest.mark.parametrize("resample", ["bicubic", "box"])
def test_strip_by_strip_reduction_matches_the_full_size_reference(resample):
    """The bounded path gives what compositing the whole image on white, then resize(reducing_gap=3), gives."""
    img = _rgba(2900, 1700)  # reduced by (3, 2) before the filter; strips of 90 rows, a short last one
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    white.alpha_composite(img)
    filters = {"bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX}
    reference = white.convert("RGB").resize(target_size(*img.size, 256), filters[resample], reducing_gap=3.0)
    expected = io.BytesIO()
    reference.save(expected, "JPEG", quality=CFG.jpeg_quality)
    out = process_image(_png(img), DownloadConfig(resample=resample))
    assert (out.width, out.height) == reference.size == (437, 256)
    assert out.jpeg == expected.getvalue()


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (1200, 900), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 600, 900))  # opaque blue left half
    out = Image.open(io.BytesIO(process_image(_png(img), CFG).jpeg)).convert("RGB")
    assert out.size == (341, 256)
    left, right = out.getpixel((40, 128)), out.getpixel((300, 128))
    assert left[2] > 235 and left[0] < 20 and min(right) > 235


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "TGA"])
def test_formats_outside_the_web_formats_are_not_images(fmt):
    """Only IMAGE_FORMATS are opened: each has a known decode cost, the base of the memory bound."""
    assert fmt not in IMAGE_FORMATS
    with pytest.raises(ImageRejected) as rejected:
        process_image(image_bytes(64, 64, fmt), CFG)
    assert rejected.value.reason == "not_an_image"


MEASURE = """
import sys
from pathlib import Path
from tasks.config import DownloadConfig
from tasks.download.images import process_image

def kb(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))

data = Path(sys.argv[1]).read_bytes()
before = kb("VmRSS:")
out = process_image(data, DownloadConfig())
print(out.width, out.height, kb("VmHWM:") - before)
"""


def test_decoding_a_large_rgba_image_makes_no_full_size_copy(tmp_path):
    """Issue 13 item 3: the pre-fix path made ~5 full-size copies (RGBA convert, white canvas, composite,
    RGB convert, EXIF transpose) of a 9 Mpx RGBA PNG: a rise of ~200 MB for 36 MB decoded."""
    width = height = 3000
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: the pre-fix path transposed the full image
    path = tmp_path / "big.png"
    path.write_bytes(_png(_rgba(width, height), exif=exif.tobytes()))
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out_w, out_h, rise_kb = map(int, done.stdout.split())
    decoded_mb = width * height * 4 / 2**20
    assert (out_w, out_h) == (256, 256)
    # The decoded image, a few copies of a 0.25 Mpx strip and the reduced image; no second full-size buffer.
    assert rise_kb / 1024 < decoded_mb * 1.3 + 16, f"{rise_kb / 1024:.0f} MB for {decoded_mb:.0f} MB decoded"


def test_decode_threads_bounds_the_images_decoded_at_once(monkeypatch):
    import asyncio
    import threading
    import time

    from tasks.demo.http_server import LoopbackServer, Reply
    from tasks.download import fetch

    lock, running, peak, threads = threading.Lock(), [0], [0], set()
    real = fetch.process_image

    def counted(data, cfg):  # the real processing, with the overlap measured around it
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            threads.add(threading.current_thread().name)
        time.sleep(0.02)
        try:
            return real(data, cfg)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(fetch, "process_image", counted)
    with LoopbackServer() as server:
        urls = [server.route(f"/t{i}.jpg", Reply(body=JPEG_640x480)) for i in range(12)]
        for decode_threads in (1, 3):
            running[0] = peak[0] = 0
            threads.clear()
            cfg = DownloadConfig(decode_threads=decode_threads, concurrency=12, allow_private_addresses=True)
            results = asyncio.run(fetch.fetch_many(urls, cfg))
            assert [r.status for r in results] == ["ok"] * 12
            assert peak[0] <= decode_threads and len(threads) <= decode_threads
            assert peak[0] == decode_threads or decode_threads > 1  # one thread: strictly one at a time
