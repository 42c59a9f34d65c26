"""A sample gallery of the annotations: a few images with their boxes, phrases, captions and QA.

The first thing a researcher does with a new annotation model is look at its output. After
each annotation stage (phrases, boxes, vqa) the flow draws ``num_samples`` images, chosen
by a seeded draw over the stage's finished shards (a rerun shows the same ones), with every
annotation they have so far: OWLv2 boxes drawn and labelled "phrase 0.42", the phrases, the
short and raw captions, the question-answer pairs. It is written to storage as one
self-contained HTML page (``<root>/galleries/<stage>.html``) and returned as markdown with
the images inline (``data:image/jpeg;base64``), which Prefect's UI renders as an artifact.
Size is bounded: images are drawn at ``max_side`` pixels and JPEG-compressed, text is cut.
The markdown names the HTML page on storage (``storage.fs.markdown_link``: its path or ``s3://``
URI, and an https link when ``GOLDICLIP_STORAGE_PUBLIC_URL`` is set).
"""

from __future__ import annotations

import base64
import html
import io
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from storage import DatasetLayout, StageRecords, atomic_write_bytes, exists, iter_shard, join, read_table
from storage.fs import markdown_link

ANNOTATION_ORDER = ("captions", "phrases", "boxes", "vqa")
BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
MAX_TEXT = 300  # characters of a caption shown


@dataclass
class GallerySample:
    key: str
    image: bytes  # JPEG as stored in images/*.tar
    captions: dict[str, str] = field(default_factory=dict)
    phrases: list[str] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)
    qa: list[dict] = field(default_factory=list)


def _rows_by_key(layout: DatasetLayout, kind: str, shard: str) -> dict[str, dict]:
    path = layout.annotation(kind, shard)
    return {r["key"]: r for r in read_table(path).to_pylist()} if exists(path) else {}


def draw_samples(layout: DatasetLayout, stage: str, num_samples: int, seed: int = 0) -> list[GallerySample]:
    """``num_samples`` images of ``stage``'s finished shards, the same ones for the same seed and shards."""
    # Only shards whose images are there (a stage such as vqa reads captions, not the tars).
    shards = sorted(r.shard for r in StageRecords(layout, stage).all() if r.done and exists(layout.images_tar(r.shard)))
    if not shards or num_samples <= 0:
        return []
    rng = random.Random(seed)
    picked = sorted(rng.sample(shards, min(len(shards), num_samples)))
    per_shard = -(-num_samples // len(picked))  # ceil: a few images from each drawn shard
    samples: list[GallerySample] = []
    for shard in picked:
        tables = {kind: _rows_by_key(layout, kind, shard) for kind in ANNOTATION_ORDER}
        annotated = sorted(tables[stage]) if stage in tables else []
        keys = set(rng.sample(annotated, min(per_shard, len(annotated))))
        for sample in iter_shard(layout.images_tar(shard), decode_json=False):
            if sample["__key__"] in keys and "jpg" in sample:
                samples.append(_annotate(sample["__key__"], sample["jpg"], tables))
    return samples[:num_samples]


def _annotate(key: str, image: bytes, tables: dict[str, dict[str, dict]]) -> GallerySample:
    out = GallerySample(key, image)
    if caption := tables["captions"].get(key):
        out.captions = {"raw": caption.get("raw") or "", "short (SV)": (caption.get("short") or ["", "", ""])[1]}
    if phrases := tables["phrases"].get(key):
        out.phrases = [p["text"] for p in phrases["phrases"] or []]
    if boxes := tables["boxes"].get(key):
        out.boxes = list(boxes["boxes"] or [])
    if qa := tables["vqa"].get(key):
        out.qa = list(qa["qa"] or [])
    return out


def render(sample: GallerySample, max_side: int = 320, quality: int = 80) -> bytes:
    """The image at most ``max_side`` px with each box drawn and labelled "phrase score"; JPEG bytes."""
    with Image.open(io.BytesIO(sample.image)) as img:
        img = img.convert("RGB")
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    draw = ImageDraw.Draw(img)
    for i, box in enumerate(sample.boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        x0, y0, x1, y1 = (box[k] * scale for k in ("x0", "y0", "x1", "y1"))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        label = f"{box['phrase'][:24]} {box['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), label)
        draw.rectangle((left, top, right + 2, bottom), fill=colour)
        draw.text((x0 + 1, y0), label, fill="white")
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def _facts(sample: GallerySample) -> list[tuple[str, str]]:
    facts = [(name, text[:MAX_TEXT]) for name, text in sample.captions.items() if text]
    if sample.phrases:
        facts.append(("phrases", "; ".join(sample.phrases)))
    if sample.boxes:
        facts.append(("boxes", "; ".join(f"{b['phrase']} ({b['score']:.2f})" for b in sample.boxes)))
    facts += [("Q", f"{qa['question']} A: {qa['answer']}") for qa in sample.qa]
    return facts


def gallery_markdown(stage: str, samples: list[GallerySample], rendered: list[bytes]) -> str:
    lines = [f"# {stage}: {len(samples)} sample images", ""]
    for sample, jpeg in zip(samples, rendered):
        lines += [f"## {sample.key}", "", f"![{sample.key}]({_data_uri(jpeg)})", ""]
        lines += [f"- **{name}**: {text.replace(chr(10), ' ')}" for name, text in _facts(sample)] + [""]
    return "\n".join(lines)


def gallery_html(stage: str, samples: list[GallerySample], rendered: list[bytes]) -> str:
    cards = []
    for sample, jpeg in zip(samples, rendered):
        facts = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(t)}</li>" for n, t in _facts(sample))
        cards.append(f'<div class="card"><h3>{sample.key}</h3><img src="{_data_uri(jpeg)}"><ul>{facts}</ul></div>')
    style = ".card{display:inline-block;vertical-align:top;width:340px;margin:8px;font:13px sans-serif}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{stage} gallery</title>"
            f"<style>{style}</style></head><body><h1>{stage}: sample images</h1>{''.join(cards)}</body></html>")


def write_gallery(layout: DatasetLayout, stage: str, num_samples: int = 6, seed: int = 0) -> tuple[str, str] | None:
    """Draw, render and store the gallery; returns (its markdown, the HTML page's URL), or None if empty."""
    samples = draw_samples(layout, stage, num_samples, seed)
    if not samples:
        return None
    rendered = [render(s) for s in samples]
    url = join(layout.root, "galleries", f"{stage}.html")
    atomic_write_bytes(url, gallery_html(stage, samples, rendered).encode())
    title, _, rest = gallery_markdown(stage, samples, rendered).partition("\n")
    return f"{title}\n\nThe same as one HTML page: {markdown_link(url)}\n{rest}", url
