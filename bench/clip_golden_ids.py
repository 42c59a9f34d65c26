"""Golden CLIP token ids from open_clip's own ``SimpleTokenizer``, for the tokenizer parity test.

Run once, where open_clip's tokenizer module can be imported (it needs ftfy, regex, numpy
and torch, not torchvision); the test then needs neither open_clip nor a network:

    pip download --no-deps -d /tmp/oc open_clip_torch==3.3.0
    unzip -qo /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl -d /tmp/oc/site
    python bench/clip_golden_ids.py /tmp/oc/site/open_clip tests/assets/clip_golden_ids.json

The strings are web-like alt-text (CC3M/CC12M/YFCC style) with what CLIP's cleaning is for:
HTML entities (once and twice escaped), ftfy's fixes (ligatures, mojibake, curly quotes),
runs of white space, the special tokens written literally, non-Latin scripts, emoji, URLs,
and captions longer than the 77-token context. They are drawn from a seeded generator and
stored with the ids, so the test does not depend on this script.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

BASES = [
    "a photo of a cat", "Two dogs playing in the snow", "the view from the top of the Eiffel Tower at night",
    "A red double-decker bus on a London street", "close-up of a bee on a sunflower", "bride and groom dancing",
    "vintage car parked outside a diner", "stock photo: businessman using laptop in office",
    "aerial view of the city skyline", "a bowl of ramen with egg and green onions", "hand-drawn map of the island",
    "people walking on the beach at sunset", "an old man reading a newspaper", "modern kitchen with white cabinets",
    "a child blowing out candles on a birthday cake", "mountain landscape with a lake and pine trees",
    "the 2012 Olympic Games opening ceremony", "portrait of a young woman with curly hair",
    "illustration of a rocket launching into space", "a plate of sushi on a wooden table",
]
DECORATIONS = [
    lambda s: s.replace(" and ", " &amp; "), lambda s: s + " &amp;amp; more", lambda s: f"&lt;b&gt;{s}&lt;/b&gt;",
    lambda s: s.replace("'", "&#39;") + " &quot;quoted&quot;", lambda s: s + "&nbsp;&nbsp;(c)",
    lambda s: s.replace("fi", "\ufb01").replace("fl", "\ufb02"), lambda s: s.replace("e", "\u00c3\u00a9", 1),
    lambda s: f"\u201c{s}\u201d \u2014 it\u2019s great", lambda s: f"  {s}\n\n\tlisted   twice  ",
    lambda s: f"<|startoftext|>{s}<|endoftext|>", lambda s: s + " <|endoftext|> trailing",
    lambda s: s.upper(), lambda s: s.title() + "!!!", lambda s: s + " \U0001f600\U0001f431\u2764\ufe0f",
    lambda s: s + " \u6771\u4eac\u30bf\u30ef\u30fc \u0645\u0631\u062d\u0628\u0627 \u041f\u0440\u0438\u0432\u0435\u0442",
    lambda s: s + " https://example.com/img_01.jpg?w=640&amp;h=480 #travel @user",
    lambda s: s + " 1,234,567 photos from 1999-2024, 3.5mm f/1.8",
    lambda s: s + " caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe",
    lambda s: " ".join([s] * 8),  # past the 77-token context: truncated, the end token kept
    lambda s: s + " can't won't I'm we've they'll she'd it's",
]


def golden_strings(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [base for base in BASES] + [d(BASES[i % len(BASES)]) for i, d in enumerate(DECORATIONS)]
    while len(texts) < count:
        text = rng.choice(BASES)
        for decorate in rng.sample(DECORATIONS, rng.randint(1, 3)):
            text = decorate(text)
        texts.append(text)
    return texts


def main(open_clip_dir: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", Path(open_clip_dir) / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the tokenizer module alone: no torchvision, no model code
    tokenizer = module.SimpleTokenizer()
    texts = golden_strings()
    ids = tokenizer(texts, context_length=77).tolist()
    cases = [{"text": t, "ids": row[: row.index(tokenizer.eot_token_id) + 1]} for t, row in zip(texts, ids)]
    version = (Path(open_clip_dir) / "version.py").read_text().split("=")[-1].strip().strip("'\"")
    Path(out).write_text(json.dumps({
        "source": f"open_clip {version} open_clip.tokenizer.SimpleTokenizer, context_length=77 (ids up to "
                  "and including the end token; padding not stored)",
        "command": "python bench/clip_golden_ids.py /tmp/oc/site/open_clip tests/assets/clip_golden_ids.json",
        "cases": cases,
    }, ensure_ascii=False, indent=0) + "\n")
    print(f"{len(cases)} cases -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
