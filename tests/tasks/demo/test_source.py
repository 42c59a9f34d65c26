"""The demo's synthetic source: deterministic, faithful captions, parseable lists, a server."""
from __future__ import annotations

import csv
import json
import re
import socket
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tasks.demo.source import COLOURS, SHAPES, generate_demo_source, serve_directory, write_url_lists
from storage.tables import CAPTIONERS
from tasks.captions.dreamlip import iter_dreamlip_rows

BASE = "http://127.0.0.1:9"


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_demo_source(tmp_path_factory.mktemp("demo"), num_images=60, num_eval_images=10, seed=3, base_url=BASE)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    again = generate_demo_source(tmp_path / "a", num_images=60, num_eval_images=10, seed=3, base_url=BASE)
    assert _files(again.root) == _files(demo.root)
    other = generate_demo_source(tmp_path / "b", num_images=60, num_eval_images=10, seed=4, base_url=BASE)
    assert _files(other.root)["img/00000.jpg"] != _files(demo.root)["img/00000.jpg"]


def test_layout_and_counts(demo):
    assert len(list(demo.image_dir.glob("*.jpg"))) == 60
    sizes = {Image.open(p).size for p in demo.image_dir.glob("*.jpg")}
    assert any(min(s) > 256 for s in sizes) and any(min(s) < 256 for s in sizes)
    lines = demo.url_list.read_text().splitlines()
    assert len(lines) == 60 + 4 and all(len(line.split("\t")) == 2 for line in lines)
    urls = [line.split("\t")[1] for line in lines]
    assert sum(u.endswith("/img/00000.jpg") for u in urls) == 2
    assert {f"{BASE}/bad/html.jpg", f"{BASE}/bad/truncated.jpg", f"{BASE}/img/missing-00000.jpg"} <= set(urls)
    with pytest.raises(OSError, match="truncated"):
        Image.open(demo.root / "bad" / "truncated.jpg").load()
    pairs = [json.loads(line) for line in demo.eval_pairs.read_text().splitlines()]
    assert len(pairs) == 10
    assert all((demo.eval_pairs.parent / p["image"]).is_file() and p["caption"] for p in pairs)
    assert not set(urls) & {f"{BASE}/eval/{p['image']}" for p in pairs}


def test_dreamlip_csvs_parse_with_bad_rows_counted(demo):
    for path in demo.dreamlip_csvs:
        with open(path, newline="") as f:
            header = next(csv.reader(f))
        assert header == ["Image Path", "raw_caption"] + [f"{k}{c}_captions" for c in CAPTIONERS for k in ("short", "long")]
    counts = Counter()
    rows = [r for path in demo.dreamlip_csvs for r in iter_dreamlip_rows(str(path), counts=counts)]
    assert len(rows) == 60 - 1  # every 50th image has no caption row
    assert counts["malformed_row"] >= 2 * len(demo.dreamlip_csvs)  # too few columns + broken quote, per file
    assert any("\n" in r.long["LLA"] for r in rows)  # quoted newlines survive
    assert {r.url for r in rows} <= {f"{BASE}/img/{i:05d}.jpg" for i in range(60)}


def test_captions_are_faithful_and_long_ones_are_paragraphs(demo):
    scenes = {f"{BASE}/{e['path']}": e["scene"] for e in json.loads((demo.root / "demo_spec.json").read_text())["entries"]}
    for row in (r for p in demo.dreamlip_csvs for r in iter_dreamlip_rows(str(p), counts=Counter())):
        objects = scenes[row.url]["objects"]
        for text in [row.raw, *row.short.values(), *row.long.values()]:
            for o in objects:
                assert f"{o['colour']} {o['shape']}" in text.lower(), (o, text)
        for c in CAPTIONERS:
            assert len(sentences(row.short[c])) == 1
            assert 3 <= len(sentences(row.long[c])) <= 5
            assert all(o["position"] in row.long[c].replace("middle", "center") for o in objects)
        assert len(set(row.long.values())) == 3 and len(set(row.short.values())) == 3
        assert all(o["colour"] in COLOURS and o["shape"] in SHAPES for o in objects)


def test_write_url_lists_leaves_unchanged_files_alone(demo):
    before = {p: p.stat().st_mtime_ns for p in [demo.url_list, *demo.dreamlip_csvs]}
    write_url_lists(demo.root, BASE)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_server_serves_files_and_bad_routes_then_closes(demo):
    with serve_directory(demo.root) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        with urllib.request.urlopen(f"{base_url}/img/00001.jpg", timeout=5) as resp:
            assert resp.headers["Content-Type"] == "image/jpeg"
            assert resp.read() == (demo.image_dir / "00001.jpg").read_bytes()
        with urllib.request.urlopen(f"{base_url}/bad/html.jpg", timeout=5) as resp:
            assert resp.headers["Content-Type"] == "image/jpeg" and resp.read().startswith(b"<!doctype html>")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base_url}/img/missing-00000.jpg", timeout=5)
        assert err.value.code == 404
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
