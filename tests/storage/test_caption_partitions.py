"""The partition of DreamLIP caption rows by image shard (storage/caption_partitions.py), read with the real reader."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import storage.caption_partitions as caption_partitions
from storage.caption_partitions import (
    UrlShardIndex,
    partition_by_shard,
    partition_index,
    read_shard_captions,
    url_hash,
    url_hashes,
)
from storage.tables import CAPTIONERS
from tasks.captions.dreamlip import DEFAULT_COLUMNS, iter_dreamlip_rows
from tests.tasks.captions.csv_rows import csv_text as _csv_text
from tests.tasks.captions.csv_rows import row as _row
from tests.tasks.captions.csv_rows import write as _write


def read_rows(path, counts):
    return iter_dreamlip_rows(path, counts=counts)


def _index(shards: dict[int, list[int]]) -> UrlShardIndex:
    return UrlShardIndex.from_shards((s, [f"http://x/{i}.jpg" for i in ids]) for s, ids in shards.items())


def test_url_shard_index_maps_hashes_to_shards():
    index = _index({0: [0, 1, 2], 7: [10, 11], 3: [20]})
    assert len(index) == 6 and index.collisions == 0
    urls = ["http://x/11.jpg", "http://x/missing.jpg", "http://x/0.jpg", "http://x/20.jpg"]
    assert index.shard_of(url_hashes(urls)).tolist() == [7, -1, 0, 3]
    assert url_hashes(["http://x/0.jpg"])[0] == url_hash("http://x/0.jpg")
    assert UrlShardIndex.from_shards([]).shard_of(url_hashes(urls)).tolist() == [-1] * 4
    # One hash in two shards (a collision): the first shard keeps it.
    dup = UrlShardIndex(np.array([5, 9, 5], np.uint64), np.array([1, 2, 3], np.int32))
    assert dup.collisions == 1 and dup.shard_of(np.array([5, 9], np.uint64)).tolist() == [1, 2]


def _partition(csvs, out, index, split="split-fp", **kw):
    calls = []

    def load():
        calls.append(1)
        return index

    name = partition_index(split, DEFAULT_COLUMNS.required(), CAPTIONERS)
    manifest = partition_by_shard(csvs, out, name, load, read_rows, **kw)
    return manifest, len(calls)


def test_partition_by_shard_round_trip(tmp_path):
    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(0, 30)]))
    b = _write(tmp_path / "b.csv", _csv_text([_row(i) for i in range(30, 60)] + [_row(5), _row(99)]))
    index = _index({0: list(range(0, 20)), 1: list(range(20, 40)), 2: list(range(40, 60))})
    out = str(tmp_path / "parts")
    manifest, loads = _partition([a, b], out, index, flush_bytes=4000, chunk_rows=7)
    assert loads == 1
    assert manifest["counts"] == {"rows": 62, "url_not_in_lists": 1}
    assert [e["counts"] for e in manifest["csvs"]] == [{"rows": 30}, {"rows": 32, "url_not_in_lists": 1}]
    root = tmp_path / "parts" / manifest["index"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["00000", "00001", "00002", "_csvs"]
    assert len(list((root / "00000").glob("part-*.parquet"))) > 2  # the small budget made several flushes
    expected = {r.url: r for path in (a, b) for r in iter_dreamlip_rows(path, counts=Counter())}
    for shard, ids in {0: range(0, 20), 1: range(20, 40), 2: range(40, 60)}.items():
        urls = {f"http://x/{i}.jpg" for i in ids}
        counts = Counter()
        got = read_shard_captions(out, manifest, shard, urls, counts=counts)
        assert got == {u: expected[u] for u in urls}
        assert counts == (Counter(duplicate_url=1) if shard == 0 else Counter())
    assert got["http://x/59.jpg"].long["LLA"] == 'Long LLA 59 first sentence.\nSecond sentence, "quoted".'
    # No directory for a shard without rows: nothing found, nothing raised.
    assert read_shard_captions(out, manifest, 4, {"http://x/1.jpg"}, counts=Counter()) == {}


def test_partition_verifies_urls_against_hash_collisions(tmp_path):
    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(4)]))
    # Pretend http://x/3.jpg collides with a URL of shard 1 that has no caption row.
    hashes = url_hashes([f"http://x/{i}.jpg" for i in range(4)])
    index = UrlShardIndex(hashes, np.array([0, 0, 0, 1], np.int32))
    out = str(tmp_path / "parts")
    manifest, _ = _partition([a], out, index)
    counts = Counter()
    assert read_shard_captions(out, manifest, 1, {"http://x/other.jpg"}, counts=counts) == {}
    assert counts == Counter(url_hash_collision=1)


def test_partition_resumes_and_ignores_leftovers(tmp_path):
    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(20)]))
    index = _index({0: list(range(10)), 1: list(range(10, 20))})
    out = str(tmp_path / "parts")
    manifest, _ = _partition([a], out, index)
    shard_dir = tmp_path / "parts" / manifest["index"] / "00000"
    # Junk a killed run might leave: a temporary file and a part of an unfinished attempt.
    tag = manifest["csvs"][0]["tag"]
    (shard_dir / f"part-{tag}-{manifest['csvs'][0]['attempt']}-000000.parquet.tmp-deadbeef").write_bytes(b"junk")
    (shard_dir / f"part-{tag}-deadbeef0000-000000.parquet").write_bytes(b"junk")
    got = read_shard_captions(out, manifest, 0, {"http://x/4.jpg"}, counts=Counter())
    assert got["http://x/4.jpg"].raw == "raw 4"
    stamp = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.parquet")}
    again, loads = _partition([a], out, index)
    assert again == manifest and loads == 0  # nothing re-read, no index built
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.parquet")} == stamp


def test_killed_partition_is_not_visible(tmp_path, monkeypatch):

    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(20)]))
    index = _index({0: list(range(10)), 1: list(range(10, 20))})
    out = tmp_path / "parts"
    real = caption_partitions._write_part
    written = []

    def killed(url, table):
        if written:
            raise KeyboardInterrupt  # stands in for SIGKILL after the first part
        real(url, table)
        written.append(url)

    monkeypatch.setattr(caption_partitions, "_write_part", killed)
    with pytest.raises(KeyboardInterrupt):
        _partition([a], str(out), index, write_threads=1)
    monkeypatch.undo()
    assert len(list(out.rglob("part-*.parquet"))) == 1
    assert not list(out.rglob("_SUCCESS.json")) and not list(out.rglob("manifest.json"))
    manifest, loads = _partition([a], str(out), index)
    assert loads == 1
    assert not list(out.rglob("*.tmp-*"))
    assert len(list(out.rglob("part-*.parquet"))) == 2  # the killed attempt's part was removed
    got = read_shard_captions(str(out), manifest, 0, {f"http://x/{i}.jpg" for i in range(10)}, counts=Counter())
    assert len(got) == 10


def test_partition_removes_what_can_never_be_read_again(tmp_path):
    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(20)]))
    b = _write(tmp_path / "b.csv", _csv_text([_row(i) for i in range(20, 30)]))
    index = _index({0: list(range(10)), 1: list(range(10, 30))})
    out = tmp_path / "parts"
    first, _ = _partition([a, b], str(out), index)
    old_a, kept_b = (e["tag"] for e in first["csvs"])

    _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(5)]))  # a new version of a.csv
    second, loads = _partition([a], str(out), index)  # b.csv no longer listed
    assert loads == 1 and second["index"] == first["index"]
    new_a = second["csvs"][0]["tag"]
    tags = {p.name for p in (out / first["index"] / "_csvs").iterdir()}
    assert tags == {new_a, kept_b}  # the old a.csv's parts go; b.csv's stay (it may be listed again)
    assert not list(out.rglob(f"part-{old_a}-*")) and list(out.rglob(f"part-{kept_b}-*"))
    got = read_shard_captions(str(out), second, 0, {f"http://x/{i}.jpg" for i in range(10)}, counts=Counter())
    assert sorted(got) == sorted(f"http://x/{i}.jpg" for i in range(5))
    again, loads = _partition([a, b], str(out), index)
    assert loads == 0  # b.csv's kept parts served it without another pass

    third, _ = _partition([a, b], str(out), index, split="another-split")
    assert [p.name for p in out.iterdir()] == [third["index"]]  # the old split's index is gone


def test_partition_on_memory_filesystem(tmp_path):
    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(10)]))
    manifest, _ = _partition([a], "memory://dreamlip-parts", _index({3: list(range(10))}))
    got = read_shard_captions("memory://dreamlip-parts", manifest, 3, {"http://x/7.jpg"}, counts=Counter())
    assert got["http://x/7.jpg"].raw == "raw 7"
