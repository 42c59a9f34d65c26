"""DreamLIP CSV streaming, join and the hash-partitioned caption index."""
from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import pytest

from tasks.dreamlip import (
    CAPTIONERS,
    DreamlipCaptions,
    DreamlipColumns,
    bucket_of,
    iter_dreamlip_rows,
    join_captions,
    lookup_captions,
    partition_captions,
)

HEADER = ["Image Path", "raw_caption"] + [f"{k}{c}_captions" for c in CAPTIONERS for k in ("short", "long")]


def _row(i: int) -> list[str]:
    caps = []
    for c in CAPTIONERS:
        caps += [f"short {c} {i}, with a comma.", f"Long {c} {i} first sentence.\nSecond sentence, \"quoted\"."]
    return [f"http://x/{i}.jpg", f"raw {i}"] + caps


def _csv_text(rows: list[list[str]], header: list[str] = HEADER) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8", newline="")
    return str(path)


def test_streams_rows_with_quoted_newlines_and_commas(tmp_path):
    path = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(5)]))
    counts = Counter()
    rows = list(iter_dreamlip_rows(path, counts=counts))
    assert [r.url for r in rows] == [f"http://x/{i}.jpg" for i in range(5)]
    assert rows[2] == DreamlipCaptions(
        url="http://x/2.jpg",
        raw="raw 2",
        short={c: f"short {c} 2, with a comma." for c in CAPTIONERS},
        long={c: f'Long {c} 2 first sentence.\nSecond sentence, "quoted".' for c in CAPTIONERS},
    )
    assert counts == Counter(rows=5)


def test_bad_rows_are_counted_not_fatal(tmp_path):
    text = _csv_text([_row(0)])
    text += "http://x/short.jpg,too,few\n"
    text += _csv_text([_row(1), [""] + _row(2)[1:], _row(3)]).split("\n", 1)[1]
    path = _write(tmp_path / "a.csv", text)
    counts = Counter()
    assert [r.url for r in iter_dreamlip_rows(path, counts=counts)] == ["http://x/0.jpg", "http://x/1.jpg", "http://x/3.jpg"]
    assert counts == Counter(rows=3, malformed_row=1, empty_url=1)


@pytest.mark.parametrize("where", ["middle", "last"])
def test_unterminated_quote_does_not_swallow_the_file(tmp_path, where):
    good = [_row(i) for i in range(40)]
    bad = 'http://x/bad.jpg,"raw caption that never closes its quote,a,b,c,d,e,f\n'
    lines = _csv_text(good).splitlines(keepends=True)
    head, body = lines[0], "".join(lines[1:])
    split = body.index("http://x/20.jpg")
    if where == "middle":
        text = head + body[:split] + bad + body[split:]
    else:
        text = head + body + bad
    counts = Counter()
    rows = list(iter_dreamlip_rows(_write(tmp_path / "a.csv", text), counts=counts, max_record_lines=30))
    assert [r.url for r in rows] == [f"http://x/{i}.jpg" for i in range(40)]
    assert rows[25].long["SV"] == 'Long SV 25 first sentence.\nSecond sentence, "quoted".'
    assert counts["malformed_row"] >= 1 and counts["rows"] == 40


def test_missing_required_column_is_a_value_error(tmp_path):
    header = [h for h in HEADER if h != "longSV_captions"]
    path = _write(tmp_path / "a.csv", _csv_text([], header=header))
    with pytest.raises(ValueError, match="longSV_captions"):
        list(iter_dreamlip_rows(path, counts=Counter()))


def test_configurable_column_names_and_extra_columns(tmp_path):
    columns = DreamlipColumns(url="url", raw="alt", short={"A": "s"}, long={"A": "l"})
    path = _write(tmp_path / "a.csv", "id,url,alt,s,l\n7,http://x/1.jpg,alt text,short,long one. long two.\n")
    (row,) = iter_dreamlip_rows(path, counts=Counter(), columns=columns)
    assert row == DreamlipCaptions("http://x/1.jpg", "alt text", {"A": "short"}, {"A": "long one. long two."})


def test_join_keeps_only_wanted_urls_across_files(tmp_path):
    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(0, 10)]))
    b = _write(tmp_path / "b.csv", _csv_text([_row(i) for i in range(10, 20)] + [_row(3)]))
    counts = Counter()
    got = join_captions([a, b], {"http://x/3.jpg": "k3", "http://x/15.jpg": "k15", "http://x/99.jpg": "k99"}, counts=counts)
    assert set(got) == {"k3", "k15"}
    assert got["k15"].raw == "raw 15"
    assert set(join_captions([a, b], {"http://x/4.jpg"}, counts=Counter())) == {"http://x/4.jpg"}


def test_partition_and_lookup_round_trip(tmp_path):
    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(0, 30)]))
    b = _write(tmp_path / "b.csv", _csv_text([_row(i) for i in range(30, 60)] + [["dup"] + _row(5)[1:]]))
    index = str(tmp_path / "index")
    counts = Counter()
    manifest = partition_captions([a, b], index, 4, counts, rows_per_group=7)
    assert counts["rows"] == 61 and manifest["counts"]["rows"] == 61
    assert len(manifest["parts"]) == 2 and manifest["num_buckets"] == 4
    wanted = ["http://x/0.jpg", "http://x/33.jpg", "http://x/59.jpg", "http://x/missing.jpg"]
    got = lookup_captions(index, wanted)
    assert set(got) == set(wanted[:3])
    expected = {r.url: r for r in iter_dreamlip_rows(a, counts=Counter())}
    assert got["http://x/0.jpg"] == expected["http://x/0.jpg"]
    assert got["http://x/59.jpg"].long["LLA"] == 'Long LLA 59 first sentence.\nSecond sentence, "quoted".'
    assert {bucket_of(u, 4) for u in expected} == set(range(4))


def test_partition_resumes_and_ignores_leftover_temp_files(tmp_path):
    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(20)]))
    index = tmp_path / "index"
    manifest = partition_captions([a], str(index), 3, Counter())
    part_dir = index / manifest["parts"][0]["dir"]
    bucket = bucket_of("http://x/4.jpg", 3)
    # A killed run leaves a temporary file full of junk next to a bucket: never read.
    (part_dir / f"{bucket:05d}.parquet.tmp-deadbeef").write_bytes(b"not parquet")
    assert lookup_captions(str(index), ["http://x/4.jpg"])["http://x/4.jpg"].raw == "raw 4"
    stamp = {p.name: p.stat().st_mtime_ns for p in part_dir.glob("*.parquet")}
    again = partition_captions([a], str(index), 3, Counter())
    assert again == manifest
    assert {p.name: p.stat().st_mtime_ns for p in part_dir.glob("*.parquet")} == stamp


def test_killed_partition_is_not_visible(tmp_path, monkeypatch):
    import tasks.dreamlip as dreamlip

    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(20)]))
    index = tmp_path / "index"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for SIGKILL before the renames

    monkeypatch.setattr(dreamlip.fsspec.implementations.local.LocalFileSystem, "mv", killed)
    with pytest.raises(KeyboardInterrupt):
        partition_captions([a], str(index), 2, Counter())
    monkeypatch.undo()
    assert not list(index.rglob("*.parquet")) and not (index / "manifest.json").exists()
    with pytest.raises(ValueError, match="manifest"):
        lookup_captions(str(index), ["http://x/1.jpg"])
    partition_captions([a], str(index), 2, Counter())
    assert not list(index.rglob("*.tmp-*"))
    assert lookup_captions(str(index), ["http://x/1.jpg"])["http://x/1.jpg"].raw == "raw 1"


def test_partition_on_memory_filesystem(tmp_path):
    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(10)]))
    partition_captions([a], "memory://dreamlip-index", 2, Counter())
    assert lookup_captions("memory://dreamlip-index", ["http://x/7.jpg"])["http://x/7.jpg"].raw == "raw 7"
