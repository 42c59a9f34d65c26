"""Peak RSS of one download process decoding the worst images the configuration admits (issue 13).

What it does (``python bench/download_memory.py --write``):

1. generates, under ``bench/out/memory/``, images just under the default
   ``download.max_pixels`` and ``download.max_bytes``: a large RGBA PNG, a 16-bit
   greyscale PNG, a CMYK JPEG, progressive RGB (4:4:4) and CMYK JPEGs (a progressive
   file makes libjpeg keep every DCT coefficient of the image) and an RGBA WebP;
2. in a fresh process per row, runs the stage's own ``process_image`` (decode, verify,
   reduce, convert, re-encode) on one image, then on ``download.decode_threads`` copies
   of the worst one at once, as a download process's decode pool can;
3. reports the process's peak RSS (``VmHWM``) and its rise over the RSS after
   imports, against the pre-fix figures (the anchor) and the bound documented in the
   README and ``tasks/download/images.py``: a rise of at most
   ``decode_threads x (16 bytes x max_pixels + 32 MiB)`` (WebP's decoder, the costliest
   admitted format, holds ~16 bytes per pixel; a progressive JPEG up to 8; anything
   else 4 at most; 32 MiB covers strips, the reduced image and the encode).

Anchor: the same images and method on the code before the fix (commit e81a813:
several full-size copies per image on the RGBA, 16-bit and EXIF paths, and one decode
thread per CPU), measured 2026-12-01 on this sandbox; issue 13 reports ~1.25 GB for one
RGBA image near Pillow's 89 Mpx cap.

    python bench/download_memory.py              # print the table
    python bench/download_memory.py --write      # also replace its section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import report  # noqa: E402  (bench/report.py: sys.path[0] is bench/)

OUT = REPO / "bench" / "out" / "memory"
MB = 2**20
# name -> (format, mode, save options); every image is just under the pixel cap.
IMAGES = {
    "rgba.png": ("PNG", "RGBA", {"compress_level": 1}),
    "grey16.png": ("PNG", "I;16", {"compress_level": 1}),
    "cmyk.jpg": ("JPEG", "CMYK", {"quality": 90}),
    "progressive.jpg": ("JPEG", "RGB", {"quality": 90, "progressive": True, "subsampling": 0}),
    "progressive-cmyk.jpg": ("JPEG", "CMYK", {"quality": 90, "progressive": True}),
    "rgba.webp": ("WEBP", "RGBA", {"lossless": True, "quality": 0, "method": 0}),
}
# Pre-fix rise over the baseline (MB): the same images and worker on commit e81a813's
# process_image (FetchConfig() defaults), 2026-12-01, this sandbox.
ANCHOR_MB = {
    "rgba.png": 978, "grey16.png": 612, "cmyk.jpg": 11, "progressive.jpg": 372, "progressive-cmyk.jpg": 494,
    "rgba.webp": 1470, "rgba.webp x 2": 2936,
}
# The documented bound per decode thread: bytes per pixel of max_pixels, plus a constant.
BOUND_BYTES_PER_PIXEL, BOUND_EXTRA_MB = 16, 32


def image_size(max_pixels: int) -> tuple[int, int]:
    """3:2, as many pixels as the cap admits."""
    height = int((max_pixels / 1.5) ** 0.5)
    return int(max_pixels // height), height


def make_image(name: str, size: tuple[int, int]) -> Path:
    """A smooth colour field with texture (so it compresses like a photo, under max_bytes)."""
    from PIL import Image

    path = OUT / f"{size[0]}x{size[1]}-{name}"
    if path.exists():
        return path
    fmt, mode, options = IMAGES[name]
    ramp = Image.linear_gradient("L").resize(size)
    if mode == "I;16":
        img = ramp.convert("I").point(lambda v: v * 257).convert("I;16")
    else:
        bands = [ramp, ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ramp.transpose(Image.Transpose.ROTATE_180),
                 ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
        img = Image.merge("RGBA", bands)
        img = img.convert(mode) if mode != "RGBA" else img
        del bands
    del ramp
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, fmt, **options)
    tmp.replace(path)
    return path


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process. Not ``ru_maxrss``: Linux carries that
    over fork and exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(paths: list[str]) -> dict:
    """Decode ``paths`` at once in this process; its baseline and peak RSS (run in a fresh process)."""
    from tasks.config import DownloadConfig
    from tasks.download.images import process_image

    cfg = DownloadConfig()
    data = [Path(p).read_bytes() for p in paths]
    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    with ThreadPoolExecutor(len(data)) as pool:
        outs = list(pool.map(lambda d: process_image(d, cfg), data))
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {"baseline_mb": baseline, "peak_mb": peak, "seconds": seconds,
            "sizes": [(o.width, o.height) for o in outs]}


def measure(paths: list[Path]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *map(str, paths)], capture_output=True, text=True,
                          cwd=REPO, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--write", action="store_true", help="replace the section of BENCHMARKS.md")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return

    from tasks.config import DownloadConfig

    cfg = DownloadConfig()
    size = image_size(cfg.max_pixels)
    load_before = os.getloadavg()[0]
    paths = {}
    for name in IMAGES:
        paths[name] = make_image(name, size)
        assert paths[name].stat().st_size <= cfg.max_bytes, f"{name} is over max_bytes"
    bound_mb = cfg.decode_threads * (BOUND_BYTES_PER_PIXEL * cfg.max_pixels / MB + BOUND_EXTRA_MB)
    rows = []
    for name, path in paths.items():
        rows.append({"images": name, "at_once": 1, "file_mb": path.stat().st_size / MB, **measure([path])})
        print(rows[-1], flush=True)
    worst = max(rows, key=lambda r: r["peak_mb"] - r["baseline_mb"])["images"]
    together = [paths[worst]] * cfg.decode_threads
    rows.append({"images": f"{worst} x {cfg.decode_threads}", "at_once": cfg.decode_threads,
                 "file_mb": sum(p.stat().st_size for p in together) / MB, **measure(together)})
    print(rows[-1], flush=True)

    command = "python bench/download_memory.py --write"
    lines = [
        "## download memory",
        "",
        f"Peak RSS of one download process decoding the worst images the default configuration admits "
        f"(`bench/download_memory.py`): {size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.1f} Mpx, just under "
        f"`download.max_pixels` ({cfg.max_pixels:,}), each file under `download.max_bytes`; short side "
        f"{cfg.short_side}, the stage's `process_image`; the last row decodes `download.decode_threads` "
        f"({cfg.decode_threads}) copies of the worst image at once, as a download process's decode pool can. "
        "Rise = peak RSS minus the process's RSS after imports with the files read. Anchor: the same images "
        "and method on the pre-fix code (commit e81a813: one decode thread per CPU, several full-size copies "
        "on the RGBA, 16-bit, WebP and EXIF paths); issue 13 reported ~1.25 GB for one RGBA image near "
        f"Pillow's 89 Mpx cap. Documented bound (README): a rise of at most decode_threads x "
        f"({BOUND_BYTES_PER_PIXEL} bytes x max_pixels + {BOUND_EXTRA_MB} MB) = {bound_mb:,.0f} MB here (WebP's "
        "decoder holds ~16 bytes "
        "per pixel, a progressive JPEG's coefficients up to 8, a PNG 4 at most), plus `concurrency` x "
        "`max_bytes` of bodies in flight. Load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (RSS does not depend on load; seconds do).",
        "",
        "| images | decoded at once | file MB | peak RSS MB | rise MB | pre-fix rise MB (anchor) | seconds "
        "| command | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rise = r["peak_mb"] - r["baseline_mb"]
        anchor = ANCHOR_MB.get(r["images"])
        lines.append(
            f"| {r['images']} | {r['at_once']} | {r['file_mb']:.1f} | {r['peak_mb']:,.0f} | {rise:,.0f} | "
            f"{'-' if anchor is None else f'{anchor:,.0f}'} | {r['seconds']:.1f} | `{command}` | "
            f"2-core CPU sandbox | {report.today()} |"
        )
        assert rise <= bound_mb, f"{r['images']}: {rise:.0f} MB over the documented bound {bound_mb:.0f} MB"
    print("\n".join(lines))
    if args.write:
        report.write_section("\n".join(lines))


if __name__ == "__main__":
    main()
