"""Tiny training shards in the shards stage's format (tasks/shards.py), for tests and benchmarks.

Per sample: `<key>.jpg` and one `<key>.json` with key, url, width, height, captions {raw, short
{IB, SV, LLA}, long {...}}, phrases [{text, sentence, field}], boxes [{phrase, x0, y0, x1, y1,
score}] in pixels of the stored image, qa [{question, answer}]. Each image is one coloured
square on grey, and its captions name the colour, so a tiny model can learn something.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

from storage import ShardWriter, make_key

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 205, 30)}


def sample_record(key: str, rng: random.Random, width: int = 96, height: int = 64,
                  with_boxes: bool = True, with_qa: bool = True) -> tuple[bytes, dict]:
    colour = rng.choice(sorted(COLOURS))
    x0, y0 = rng.randint(0, width // 2), rng.randint(0, height // 2)
    x1, y1 = x0 + width // 3, y0 + height // 3
    image = Image.new("RGB", (width, height), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((x0, y0, x1, y1), fill=COLOURS[colour])
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    sentence = f"A {colour} square on a grey background"
    meta = {
        "key": key, "url": f"http://example.invalid/{key}.jpg", "width": width, "height": height,
        "captions": {
            "raw": f"{colour} square",
            "short": {"IB": f"a {colour} square", "SV": f"a {colour} box on grey", "LLA": f"the {colour} square"},
            "long": {"IB": f"{sentence}. It is small.", "SV": f"{sentence}.\nNothing else is there.",
                     "LLA": f"{sentence}.</s>The square is {colour}."},
        },
        "phrases": [{"text": f"{colour} square", "sentence": sentence, "field": "long.LLA"}],
        "boxes": ([{"phrase": f"{colour} square", "x0": float(x0), "y0": float(y0), "x1": float(x1),
                    "y1": float(y1), "score": 0.9}] if with_boxes else []),
        "qa": [{"question": "what colour is the square?", "answer": colour}] if with_qa else [],
    }
    return buf.getvalue(), meta


def write_train_shards(train_dir: str | Path, num_shards: int = 2, per_shard: int = 16, seed: int = 0,
                       **sample_kwargs) -> list[str]:
    rng = random.Random(seed)
    urls = []
    for shard in range(num_shards):
        url = f"{train_dir}/{shard:05d}.tar"
        with ShardWriter(url) as writer:
            for index in range(per_shard):
                key = make_key(shard, index)
                jpg, meta = sample_record(key, rng, **sample_kwargs)
                writer.write(key, {"jpg": jpg, "json": meta})
        urls.append(url)
    return urls
