"""The captions stage end to end on a tiny dataset root: partition by image shard, join, resume."""

from __future__ import annotations

import csv
import io
import threading
from pathlib import Path

import pytest

import storage.caption_partitions as caption_partitions
import tasks.captions.stage as captions_mod
from storage import DatasetLayout, ShardRecord, StageRecords, read_table, write_json, write_table
from storage.fs import join
from storage.tables import CAPTIONERS
from tasks.captions.stage import CaptionsStage
from tasks.config import PipelineConfig
from tasks.stage import run_stage

HEADER = ["Image Path", "raw_caption"] + [f"{k}{c}_captions" for c in CAPTIONERS for k in ("short", "long")]
NUM_SHARDS, PER_SHARD = 3, 6
FAILED = {"http://img/1/3.jpg"}  # listed, download failed (it has a caption row all the same)
UNCAPTIONED = "http://img/2/5.jpg"  # downloaded, no caption row anywhere


def _url(shard: int, i: int) -> str:
    return f"http://img/{shard}/{i}.jpg"


def _row(url: str, tag: str = "") -> list[str]:
    caps = []
    for c in CAPTIONERS:
        caps += [f"short {c} {url}{tag}", f"Long {c} {url}{tag}.\nSecond line, \"quoted\"."]
    return [url, f"raw {url}{tag}"] + caps


def _csv(path: Path, rows: list[list[str]], junk: str = "") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    w.writerows(rows[:2])
    buf.write(junk)
    w.writerows(rows[2:])
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    return str(path)


def _dataset(tmp_path: Path, **captions) -> PipelineConfig:
    """URL shards, split manifest, per-shard image tables and download records; two DreamLIP CSVs."""
    root = str(tmp_path / "root")
    layout = DatasetLayout(root)
    for s in range(NUM_SHARDS):
        urls = [_url(s, i) for i in range(PER_SHARD)]
        write_table(layout.url_shard(s), [{"index": i, "url": u, "caption": "", "source": "t"}
                                          for i, u in enumerate(urls)], "urls")
        rows = []
        for i, u in enumerate(urls):
            ok = u not in FAILED
            rows.append({"key": f"{s:05d}{i:04d}" if ok else None, "index": i, "url": u, "source": "t",
                         "caption": "", "status": "success" if ok else "failed_to_download",
                         "error_message": None if ok else "http_404", "attempts": 1})
        write_table(layout.images_table(s), rows, "downloads")
        StageRecords(layout, "download").put(ShardRecord(f"{s:05d}", "download-fp"))
    write_json(join(root, "sources", "manifest.json"), {"fingerprint": "split-fp", "num_shards": NUM_SHARDS})
    everything = [_url(s, i) for s in range(NUM_SHARDS) for i in range(PER_SHARD) if _url(s, i) != UNCAPTIONED]
    half = len(everything) // 2
    a = _csv(tmp_path / "a.csv", [_row(u) for u in everything[:half]],
             junk="http://img/0/bad.jpg,too,few,columns\n")  # malformed
    b = _csv(tmp_path / "b.csv", [_row(u) for u in everything[half:]]
             + [_row(_url(0, 1), " (duplicate)"), _row("http://elsewhere/x.jpg")])
    return PipelineConfig.model_validate(
        {"dataset": {"root": root}, "captions": {"dreamlip_csvs": [a, b], **captions}}
    )


def _expected(shard: int) -> list[dict]:
    out = []
    for i in range(PER_SHARD):
        u = _url(shard, i)
        if u in FAILED or u == UNCAPTIONED:
            continue
        row = _row(u)
        out.append({"key": f"{shard:05d}{i:04d}", "url": u, "raw": row[1],
                    "short": [row[2 + 2 * k] for k in range(len(CAPTIONERS))],
                    "long": [row[3 + 2 * k] for k in range(len(CAPTIONERS))]})
    return out


def _check_outputs(config: PipelineConfig, summary: dict) -> None:
    layout = DatasetLayout(config.dataset.root)
    for s in range(NUM_SHARDS):
        assert read_table(layout.annotation("captions", s)).to_pylist() == _expected(s)
    images = NUM_SHARDS * PER_SHARD - len(FAILED)
    assert summary["counts"] == {"images": images, "captioned": images - 1, "duplicate_url": 1}
    assert summary["failures"] == {"no_caption": 1}
    rows = NUM_SHARDS * PER_SHARD - 1 + 2
    assert summary["csv_counts"] == {"rows": rows, "malformed_row": 1, "url_not_in_lists": 1}


def _index_root(config: PipelineConfig) -> Path:
    (d,) = [p for p in Path(config.dataset.root, "_work", "captions").iterdir() if p.is_dir()]
    return d


def test_captions_stage_joins_each_shard_and_skips_on_rerun(tmp_path, monkeypatch):
    config = _dataset(tmp_path, flush_bytes=1)  # the smallest budget: a flush after every chunk
    summary = run_stage(CaptionsStage(config))
    assert summary["last_run"]["processed"] == ["00000", "00001", "00002"]
    _check_outputs(config, summary)
    assert sorted(p.name for p in _index_root(config).iterdir()) == ["00000", "00001", "00002", "_csvs",
                                                                      "manifest.json"]

    def no_reads(*args, **kwargs):
        raise AssertionError("a rerun must read no CSV and build no URL index")

    monkeypatch.setattr(captions_mod, "iter_dreamlip_rows", no_reads)
    monkeypatch.setattr(captions_mod, "url_shard_index", no_reads)
    again = run_stage(CaptionsStage(config))
    assert again["last_run"] == {"processed": [], "skipped": ["00000", "00001", "00002"]}
    _check_outputs(config, again)


def test_process_reads_only_its_own_shard(tmp_path, monkeypatch):
    config = _dataset(tmp_path)
    run_stage(CaptionsStage(config))
    index_root = _index_root(config)
    for other in ("00000", "00002"):
        for p in (index_root / other).iterdir():
            p.unlink()
        (index_root / other).rmdir()
    opened = []
    real = caption_partitions.read_table
    monkeypatch.setattr(caption_partitions, "read_table", lambda url, *a, **k: opened.append(url) or real(url, *a, **k))
    stage = CaptionsStage(config)
    stage.prepare()
    result = stage.run_shard("00001", force=True)
    assert result.counts == {"images": PER_SHARD - 1, "captioned": PER_SHARD - 1}
    assert opened and all(f"/{index_root.name}/00001/part-" in u for u in opened)
    assert len(opened) == 2  # one part per CSV
    assert read_table(DatasetLayout(config.dataset.root).annotation("captions", 1)).to_pylist() == _expected(1)


def test_killed_partition_leaves_nothing_readable_and_rerun_finishes(tmp_path, monkeypatch):
    config = _dataset(tmp_path)
    real_write = caption_partitions._write_part
    lock, b_parts = threading.Lock(), []

    def crash_after_first_part_of_b(url, table):
        if "/part-b-" in url:
            with lock:
                if b_parts:
                    raise KeyboardInterrupt  # stands in for kill -9 mid-partition
                b_parts.append(url)
        real_write(url, table)

    monkeypatch.setattr(caption_partitions, "_write_part", crash_after_first_part_of_b)
    with pytest.raises(KeyboardInterrupt):
        run_stage(CaptionsStage(config))
    monkeypatch.undo()
    layout = DatasetLayout(config.dataset.root)
    index_root = _index_root(config)
    assert not (index_root / "manifest.json").exists()
    assert [p.parent.name.split("-")[0] for p in index_root.glob("_csvs/*/_SUCCESS.json")] == ["a"]
    assert len(list(index_root.glob("*/part-b-*.parquet"))) == 1  # the killed attempt's one part
    assert not any(Path(layout.annotation("captions", s)).exists() for s in range(NUM_SHARDS))

    # The rerun reads only the unfinished CSV; even if the killed attempt's part stayed
    # on disk it is not read (no extra duplicate_url, no stale rows).
    read_csvs = []
    real_rows = captions_mod.iter_dreamlip_rows
    monkeypatch.setattr(captions_mod, "iter_dreamlip_rows",
                        lambda path, **kw: read_csvs.append(Path(path).name) or real_rows(path, **kw))
    monkeypatch.setattr(caption_partitions, "_remove_parts", lambda root, tag: None)
    summary = run_stage(CaptionsStage(config))
    assert read_csvs == ["b.csv"]
    assert len(list(index_root.glob("*/part-b-*.parquet"))) == 1 + NUM_SHARDS
    assert not list(index_root.rglob("*.tmp-*"))
    _check_outputs(config, summary)


def test_missing_split_manifest_fails_before_reading(tmp_path):
    config = _dataset(tmp_path)
    Path(config.dataset.root, "sources", "manifest.json").unlink()
    with pytest.raises(ValueError, match="run the download stage first"):
        run_stage(CaptionsStage(config))


def test_csv_change_redoes_only_that_csv(tmp_path, monkeypatch):
    config = _dataset(tmp_path)
    run_stage(CaptionsStage(config))
    b = Path(config.captions.dreamlip_csvs[1])
    b.write_text(b.read_text().replace("http://elsewhere/x.jpg", "http://elsewhere/yy.jpg"), newline="")
    read_csvs = []
    real_rows = captions_mod.iter_dreamlip_rows
    monkeypatch.setattr(captions_mod, "iter_dreamlip_rows",
                        lambda path, **kw: read_csvs.append(Path(path).name) or real_rows(path, **kw))
    summary = run_stage(CaptionsStage(config))
    assert read_csvs == ["b.csv"]
    assert summary["last_run"]["processed"] == ["00000", "00001", "00002"]  # new index fingerprint
    _check_outputs(config, summary)


def test_partition_pass_is_recorded_like_a_shard(tmp_path):
    """The pass over the CSVs follows the stage contract as one unit: fingerprinted, counted, timed."""
    config = _dataset(tmp_path)
    stage = CaptionsStage(config)
    summary = run_stage(stage)
    records = StageRecords(DatasetLayout(config.dataset.root), captions_mod.PARTITION_STAGE)
    record = records.get(captions_mod.PARTITION_UNIT)
    assert record.done and record.counts == summary["csv_counts"] and record.seconds > 0
    assert record.fingerprint == stage.partition_fingerprint == stage.extra_fingerprint()
    # The record vouches for the manifest by its checksum: one that changed is written again.
    manifest = Path(config.dataset.root, record.outputs["manifest"]["path"])
    written = manifest.read_text()
    manifest.write_text(written.replace('"version"', '"versio_"'))
    CaptionsStage(config).prepare()
    assert manifest.read_text() == written and not records.output_problems(records.get(captions_mod.PARTITION_UNIT))
    # New caption rows change the pass's fingerprint, and with it every captions shard's.
    b = Path(config.captions.dreamlip_csvs[1])
    with b.open("a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(_row("http://img/0/0.jpg", " again"))
    again = CaptionsStage(config)
    again.prepare()
    assert again.partition_fingerprint != record.fingerprint
    assert again.pending() == ["00000", "00001", "00002"]
