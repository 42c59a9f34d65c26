"""DreamLIP-style CSV rows for the reader and partition tests: quoted newlines, commas and quotes."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from storage.tables import CAPTIONERS

HEADER = ["Image Path", "raw_caption"] + [f"{k}{c}_captions" for c in CAPTIONERS for k in ("short", "long")]


def row(i: int) -> list[str]:
    caps = []
    for c in CAPTIONERS:
        caps += [f"short {c} {i}, with a comma.", f"Long {c} {i} first sentence.\nSecond sentence, \"quoted\"."]
    return [f"http://x/{i}.jpg", f"raw {i}"] + caps


def csv_text(rows: list[list[str]], header: list[str] = HEADER) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8", newline="")
    return str(path)
