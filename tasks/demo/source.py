"""The embedded demo's source data: a synthetic image-text set served on loopback.

DESIGN.md ("The embedded demo"): `make demo` runs offline, so it makes its own
"internet". Each image holds one to three coloured shapes (circle, square,
triangle, star, diamond; six colours; left/right/top/bottom/center; small or large)
on a plain or lightly textured background. Every caption names the colour and
shape of each object and most name its position, so text predicts the image and a
tiny CLIP can beat chance on held-out retrieval.

Written under `out_dir`:
    img/{i:05d}.jpg              training images (sizes from 160x120 to 400x300,
                                 some with short side > 256 so the downloader's
                                 resize shrinks them)
    bad/html.jpg                 an HTML page served as image/jpeg
    bad/truncated.jpg            a JPEG cut in half
    eval/images/{i:05d}.jpg      held-out images, never in the URL list
    eval/pairs.jsonl             {"image": path relative to eval/, "caption": ...}
    demo_spec.json               captions and bad entries, to write the URL lists
    lists/urls.tsv               CC3M-style `caption<TAB>url`, no header  } written by
    lists/dreamlip-{p:02d}.csv   DreamLIP format, all 8 columns         } write_url_lists

The URL lists need the server's base URL, known only once it listens, so they are
written by `write_url_lists(out_dir, base_url)`; it leaves unchanged files alone,
so a rerun on the same port keeps every downstream fingerprint.

Deliberately bad entries, so the demo shows counted failures: in the URL list a 404,
HTML served as a JPEG, a truncated JPEG and a duplicate URL; in the DreamLIP CSVs a
row with too few columns, one with an unterminated quote, and a few images with no
caption row at all (METHOD.md section 7 has the caption fields).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from storage.tables import CAPTIONERS
from tasks.captions.dreamlip import DEFAULT_COLUMNS

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 30),
    "purple": (135, 60, 180),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Centre of each position as a fraction of (width, height); with the radii below
# two large shapes at neighbouring positions touch at most.
POSITIONS = {
    "left": (0.18, 0.5),
    "right": (0.82, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
SIZES = {"small": 0.09, "large": 0.15}  # radius as a fraction of the short side
BACKGROUNDS = {"white": (250, 250, 250), "light gray": (212, 212, 212), "beige": (238, 226, 198)}
DEFAULT_IMAGE_SIZES = ((160, 120), (200, 150), (240, 180), (320, 240), (400, 300), (300, 400))
NUM_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class DemoSource:
    root: Path
    image_dir: Path
    url_list: Path  # CC3M-style TSV; exists once write_url_lists ran
    dreamlip_csvs: tuple[Path, ...]  # exist once write_url_lists ran
    eval_pairs: Path
    num_images: int
    num_eval_images: int
    base_url: str | None = None


# ---------------------------------------------------------------------------
# Scenes and images


def _sample_scene(rng: np.random.Generator, image_sizes: Sequence[tuple[int, int]]) -> dict:
    num_objects = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    positions = rng.choice(list(POSITIONS), size=num_objects, replace=False)
    looks = rng.choice(len(COLOURS) * len(SHAPES), size=num_objects, replace=False)
    objects = [
        {
            "colour": list(COLOURS)[look // len(SHAPES)],
            "shape": SHAPES[look % len(SHAPES)],
            "position": str(position),
            "size": str(rng.choice(list(SIZES))),
        }
        for look, position in zip(looks, positions)
    ]
    width, height = image_sizes[int(rng.integers(len(image_sizes)))]
    return {
        "width": int(width),
        "height": int(height),
        "background": str(rng.choice(list(BACKGROUNDS))),
        "textured": bool(rng.random() < 0.5),
        "objects": objects,
    }


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "star":
        return [
            (cx + rad * math.cos(a), cy + rad * math.sin(a))
            for k in range(10)
            for a, rad in [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.45 * r)]
        ]
    raise AssertionError(shape)


def _render(scene: dict, rng: np.random.Generator) -> bytes:
    w, h = scene["width"], scene["height"]
    img = Image.new("RGB", (w, h), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        fx, fy = POSITIONS[obj["position"]]
        jitter = rng.uniform(-0.02, 0.02, size=2)
        cx, cy = (fx + jitter[0]) * w, (fy + jitter[1]) * h
        r = SIZES[obj["size"]] * min(w, h)
        colour = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif obj["shape"] == "square":
            s = 0.85 * r
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
        else:
            draw.polygon(_shape_points(obj["shape"], cx, cy, r), fill=colour)
    if scene["textured"]:
        pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, size=(h, w, 1)).astype(np.int16)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


# ---------------------------------------------------------------------------
# Captions: faithful to the scene, worded differently per captioner


def _where(position: str, style: int) -> str:
    phrases = {
        "left": ("on the left", "on the left side of the image", "at the left"),
        "right": ("on the right", "on the right side of the image", "at the right"),
        "top": ("at the top", "near the top of the image", "at the top edge"),
        "bottom": ("at the bottom", "near the bottom of the image", "at the bottom edge"),
        "center": ("in the center", "in the middle of the image", "in the middle"),
    }
    return phrases[position][style]


def _named(obj: dict, *, size: bool = False) -> str:
    words = ([obj["size"]] if size else []) + [obj["colour"], obj["shape"]]
    return " ".join(words)


def _listing(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return f"{', '.join(items[:-1])}, and {items[-1]}"


def _background(scene: dict) -> str:
    return f"{'lightly textured' if scene['textured'] else 'plain'} {scene['background']}"


def _captions(scene: dict, rng: np.random.Generator) -> dict:
    objs, n = scene["objects"], len(scene["objects"])
    bg = scene["background"]
    raw_templates = (
        lambda: _listing([_named(o) for o in objs]),
        lambda: f"{_listing([_named(o) for o in objs]).capitalize()} clipart",
        lambda: f"shapes: {', '.join(_named(o) for o in objs)}",
        lambda: f"{_listing([_named(o) for o in objs])} on {bg} background stock image",
    )
    raw = raw_templates[int(rng.integers(len(raw_templates)))]()

    short = {
        "IB": _listing([f"a {_named(o)} {_where(o['position'], 0)}" for o in objs]) + f" on a {bg} background.",
        "SV": "The image features "
        + _listing([f"a {_named(o, size=True)} {_where(o['position'], 1)}" for o in objs])
        + ".",
        "LLA": _listing([f"{_named(o)} {_where(o['position'], 2)}" for o in objs]).capitalize()
        + f", against a {_background(scene)} background.",
    }

    texture = "with a subtle grainy texture" if scene["textured"] else "and plain"
    long_ib = [f"The image shows {NUM_WORDS[n]} simple geometric shape{'s' * (n > 1)} on a {bg} background."]
    long_ib += [f"There is a {_named(o, size=True)} {_where(o['position'], 1)}." for o in objs]
    long_ib += [f"The background is {bg} {texture}."]

    long_sv = ["In this picture, we can see " + _listing([f"a {_named(o)}" for o in objs]) + "."]
    long_sv += [
        f"The {o['colour']} {o['shape']} is {o['size']} and is placed {_where(o['position'], 0)}." for o in objs
    ]
    long_sv += [f"Behind the shapes, the background is {_background(scene)}, with no text or other objects."]

    long_lla = ["The image displays a minimalist composition of colored shapes."]
    long_lla += [
        f"A {_named(o)} is located {_where(o['position'], 1)}, drawn in solid {o['colour']}." for o in objs
    ]
    closing = f"The background is {_background(scene)}, which makes the shapes stand out."
    if n < 3 and rng.random() < 0.5:
        long_lla += [closing, "Overall, the scene is simple and uncluttered."]
    else:
        long_lla += [closing]
    # LLaVA paragraphs often put the closing remark after a blank line.
    lla_text = " ".join(long_lla[:-1]) + ("\n\n" if rng.random() < 0.5 else " ") + long_lla[-1]
    return {
        "raw": raw,
        "short": short,
        "long": {"IB": " ".join(long_ib), "SV": " ".join(long_sv), "LLA": lla_text},
    }


# ---------------------------------------------------------------------------
# Generation


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _demo_source(root: Path, spec: dict, base_url: str | None) -> DemoSource:
    return DemoSource(
        root=root,
        image_dir=root / "img",
        url_list=root / "lists" / "urls.tsv",
        dreamlip_csvs=tuple(root / "lists" / f"dreamlip-{p:02d}.csv" for p in range(spec["num_csv_parts"])),
        eval_pairs=root / "eval" / "pairs.jsonl",
        num_images=spec["num_images"],
        num_eval_images=spec["num_eval_images"],
        base_url=base_url,
    )


def generate_demo_source(
    out_dir: str | Path,
    *,
    num_images: int = 400,
    num_eval_images: int = 100,
    seed: int = 0,
    image_sizes: Sequence[tuple[int, int]] = DEFAULT_IMAGE_SIZES,
    num_csv_parts: int = 2,
    uncaptioned_every: int = 50,
    base_url: str | None = None,
) -> DemoSource:
    """Write the synthetic set under `out_dir` (deterministic in `seed`).

    Every `uncaptioned_every`-th training image gets no DreamLIP row. With
    `base_url` the URL lists are written too (see `write_url_lists`).
    """
    if num_images < 2 or num_csv_parts < 1:
        raise ValueError(f"need num_images >= 2 and num_csv_parts >= 1, got {num_images}, {num_csv_parts}")
    root = Path(out_dir)
    for sub in ("img", "bad", "eval/images", "lists"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    entries = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, 0, i])
        scene = _sample_scene(rng, image_sizes)
        _write_if_changed(root / "img" / f"{i:05d}.jpg", _render(scene, rng))
        entries.append({"path": f"img/{i:05d}.jpg", "scene": scene, **_captions(scene, rng)})

    pairs = []
    for i in range(num_eval_images):
        rng = np.random.default_rng([seed, 1, i])
        scene = _sample_scene(rng, image_sizes)
        _write_if_changed(root / "eval" / "images" / f"{i:05d}.jpg", _render(scene, rng))
        pairs.append({"image": f"images/{i:05d}.jpg", "caption": _captions(scene, rng)["short"]["SV"]})
    _write_if_changed(root / "eval" / "pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs).encode())

    first_jpeg = (root / "img" / "00000.jpg").read_bytes()
    _write_if_changed(root / "bad" / "truncated.jpg", first_jpeg[: len(first_jpeg) // 2])
    _write_if_changed(root / "bad" / "html.jpg", b"<!doctype html><html><body>Not an image</body></html>\n")

    spec = {
        "seed": seed,
        "num_images": num_images,
        "num_eval_images": num_eval_images,
        "num_csv_parts": num_csv_parts,
        "uncaptioned_every": uncaptioned_every,
        "entries": entries,
    }
    _write_if_changed(root / "demo_spec.json", json.dumps(spec, indent=1).encode())
    if base_url is not None:
        return write_url_lists(root, base_url)
    return _demo_source(root, spec, None)


def write_url_lists(out_dir: str | Path, base_url: str) -> DemoSource:
    """Write `lists/urls.tsv` and `lists/dreamlip-*.csv` for a server at `base_url`."""
    root = Path(out_dir)
    spec = json.loads((root / "demo_spec.json").read_text())
    base_url = base_url.rstrip("/")
    entries = spec["entries"]
    url = [f"{base_url}/{e['path']}" for e in entries]

    bad_urls = {  # list position -> (caption, url)
        len(entries) // 5: ("a broken link", f"{base_url}/img/missing-00000.jpg"),
        2 * len(entries) // 5: ("a web page, not a picture", f"{base_url}/bad/html.jpg"),
        3 * len(entries) // 5: ("half of a picture", f"{base_url}/bad/truncated.jpg"),
        4 * len(entries) // 5: (entries[0]["raw"], url[0]),  # duplicate URL
    }
    tsv = io.StringIO()
    for i, e in enumerate(entries):
        if i in bad_urls:
            tsv.write("\t".join(bad_urls[i]) + "\n")
        tsv.write(f"{e['raw']}\t{url[i]}\n")
    _write_if_changed(root / "lists" / "urls.tsv", tsv.getvalue().encode())

    columns = DEFAULT_COLUMNS
    header = [columns.url, columns.raw]
    for c in CAPTIONERS:
        header += [columns.short[c], columns.long[c]]
    num_parts = spec["num_csv_parts"]
    per_part = math.ceil(len(entries) / num_parts)
    for p in range(num_parts):
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        part = range(p * per_part, min((p + 1) * per_part, len(entries)))
        for n, i in enumerate(part):
            if n == len(part) // 3:
                writer.writerow([f"{base_url}/img/no-such-row.jpg", "a row with too few columns"])
            if n == 2 * len(part) // 3:
                out.write(f'{base_url}/img/broken-quote.jpg,"a caption whose quote never closes,,,,,,\n')
            if i % spec["uncaptioned_every"] == spec["uncaptioned_every"] - 1:
                continue
            e = entries[i]
            row = [url[i], e["raw"]]
            for c in CAPTIONERS:
                row += [e["short"][c], e["long"][c]]
            writer.writerow(row)
        _write_if_changed(root / "lists" / f"dreamlip-{p:02d}.csv", out.getvalue().encode())
    return _demo_source(root, spec, base_url)


# ---------------------------------------------------------------------------
# Loopback server


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real image host
    timeout = 30  # an idle keep-alive connection frees its thread

    def log_message(self, format: str, *args) -> None:
        pass


@contextlib.contextmanager
def serve_directory(root_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `root_dir` over HTTP in a background thread; yields the base URL.

    `port=0` picks a free port; pass the previous run's port to keep URLs (and
    so downstream fingerprints) stable. Missing files are real 404s; the bad
    files under `bad/` are served as image/jpeg by their extension.
    """
    handler = partial(_QuietHandler, directory=str(root_dir))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
