"""Shards stage: the join, empty optional fields, the seeded shuffle, kill -9 safety, webdataset reads."""

import io
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from storage import DatasetLayout, ShardRecord, ShardWriter, StageRecords, iter_shard, make_key, write_json, write_table
from storage.integrity import file_digest
from tasks.config import PipelineConfig
from tasks.stage import InputDamaged, run_stage
from tasks.shards import TrainingShardsStage

REPO = Path(__file__).resolve().parents[2]
NUM_INPUTS, PER_INPUT = 3, 10


def _jpeg(s: int, i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (40 * s, 20 * i, 7)).save(out, format="JPEG")
    return out.getvalue()


def _put(layout, stage, shard, counts, tag="", **files):
    """A finished upstream record, with the size and checksum of each output (``name=url``), as a stage writes it."""
    outputs = {name: {"path": layout.relative(url), **file_digest(url).as_dict()} for name, url in files.items()}
    StageRecords(layout, stage).put(ShardRecord(shard, f"{stage}-{shard}{tag}", counts, outputs=outputs))


def write_boxes(layout: DatasetLayout, s: int, tag: str = "") -> dict[str, list]:
    shard = f"{s:05d}"
    rows = [
        {"key": make_key(s, i), "width": 8, "height": 6, "has_confident_box": i % 2 == 0,
         "boxes": [{"phrase": f"thing {s}-{i}", "x0": 1.0, "y0": 1.0, "x1": 5.0, "y1": 4.0, "score": 0.25 + i / 16}]}
        for i in range(PER_INPUT) if i % 3 == 0
    ]
    write_table(layout.annotation("boxes", shard), rows, "boxes")
    _put(layout, "boxes", shard, {"with_boxes": len(rows)}, tag, table=layout.annotation("boxes", shard))
    return {r["key"]: r for r in rows}


def build_root(root: Path, boxes_inputs=(0, 1)) -> tuple[DatasetLayout, dict[str, dict]]:
    """Three input shards of ten images; input 0 has one image without a caption row and one with empty captions.

    Phrases on even indices, boxes on every third image of ``boxes_inputs``, VQA except index 1 mod 4
    (index 5 has a VQA error row with no pairs). Returns the layout and, per key, what the shard must hold.
    """
    layout = DatasetLayout(str(root))
    expected: dict[str, dict] = {}
    for s in range(NUM_INPUTS):
        shard = f"{s:05d}"
        downloads, captions, phrases, vqa = [], [], [], []
        with ShardWriter(layout.images_tar(shard)) as tar:
            for i in range(PER_INPUT):
                key, url = make_key(s, i), f"http://img.test/{s}/{i}.jpg"
                tar.write(key, {"jpg": _jpeg(s, i), "json": {"key": key, "url": url, "width": 8, "height": 6}})
                downloads.append({"key": key, "index": i, "url": url, "status": "success"})
                exp = {"jpg": _jpeg(s, i), "url": url, "captions": None, "phrases": [], "boxes": [], "qa": []}
                if not (s == 0 and i == 3):
                    empty = s == 0 and i == 4
                    cap = {"key": key, "url": url, "raw": "" if empty else f"raw {key}",
                           "short": ["", "", ""] if empty else [f"ib {key}", f"sv {key}", f"lla {key}"],
                           "long": ["", "", ""] if empty else [f"IB {key}", f"SV {key}", f"LLA {key}"]}
                    captions.append(cap)
                    exp["captions"] = None if empty else cap
                if i % 2 == 0:
                    exp["phrases"] = [{"text": f"red car {key}", "sentence": f"A red car {key}.", "field": "long.LLA"}]
                    phrases.append({"key": key, "phrases": exp["phrases"]})
                if i % 4 != 1:
                    qa = [] if i == 5 else [{"question": f"What is {key}?", "answer": "a car"}]
                    vqa.append({"key": key, "qa": qa, "raw_output": "{}", "error": "bad_json" if i == 5 else None})
                    exp["qa"] = qa
                expected[key] = exp
            downloads.append({"key": None, "index": PER_INPUT, "url": "http://img.test/404", "status": "failed_to_download",
                              "error_message": "http_404"})
        write_table(layout.images_table(shard), downloads, "downloads")
        _put(layout, "download", shard, {"ok": PER_INPUT, "failed": 1},
             tar=layout.images_tar(shard), table=layout.images_table(shard))
        for kind, rows, counts in (("captions", captions, {"images": PER_INPUT, "captioned": len(captions)}),
                                   ("phrases", phrases, {"with_phrases": len(phrases)}),
                                   ("vqa", vqa, {"with_vqa": len(vqa)})):
            write_table(layout.annotation(kind, shard), rows, kind)
            _put(layout, kind, shard, counts, table=layout.annotation(kind, shard))
        if s in boxes_inputs:
            for key, row in write_boxes(layout, s).items():
                expected[key]["boxes"] = row["boxes"]
                expected[key]["has_confident_box"] = row["has_confident_box"]
    return layout, expected


def make_config(layout: DatasetLayout, **shards) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"dataset": {"root": layout.root}, "shards": {"shard_size": 8, "shuffle_window": 2, **shards}}
    )


def read_train(layout: DatasetLayout) -> dict[str, list[dict]]:
    names = layout.list_shards(layout.train_dir, ".tar")
    return {n: list(iter_shard(layout.train_tar(n))) for n in names}


def train_bytes(layout: DatasetLayout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(layout.train_dir).iterdir())}


def train_content(layout: DatasetLayout) -> dict[str, list[tuple]]:
    """Every file in train/ and its samples in order (tar headers carry write times, so not bytes)."""
    assert all(p.suffix == ".tar" for p in Path(layout.train_dir).iterdir())
    return {n: [(s["__key__"], s["jpg"], s["json"]) for s in ss] for n, ss in read_train(layout).items()}


@pytest.fixture
def built(tmp_path):
    return build_root(tmp_path / "root")


def test_every_annotation_lands_in_its_sample(built):
    layout, expected = built
    summary = run_stage(TrainingShardsStage(make_config(layout)))
    # window 0 = inputs 0,1: 19 captioned by the records -> 3 outputs; window 1 = input 2 -> 2 outputs
    assert [w["outputs"] for w in summary["windows"]] == [3, 2]
    shards = read_train(layout)
    assert list(shards) == ["00000", "00001", "00002", "00003", "00004"]
    seen = {}
    for name, samples in shards.items():
        for sample in samples:
            doc, key = sample["json"], sample["__key__"]
            exp = expected[key]
            assert sample["jpg"] == exp["jpg"] and doc["key"] == key and doc["url"] == exp["url"]
            assert (doc["width"], doc["height"]) == (8, 6)
            cap = exp["captions"]
            assert doc["captions"] == {"raw": cap["raw"], "short": dict(zip(("IB", "SV", "LLA"), cap["short"])),
                                       "long": dict(zip(("IB", "SV", "LLA"), cap["long"]))}
            assert doc["phrases"] == exp["phrases"] and doc["qa"] == exp["qa"]
            assert doc["boxes"] == exp["boxes"]  # scores exact in float32
            assert doc["has_confident_box"] == exp.get("has_confident_box", False)
            seen[key] = name
    dropped = {make_key(0, 3), make_key(0, 4)}  # no caption row; a row with only empty captions
    assert set(seen) == set(expected) - dropped
    # outputs of a window hold only its inputs' samples and are near-equal slices
    assert {k[:5] for k, n in seen.items() if n in ("00000", "00001", "00002")} == {"00000", "00001"}
    assert [len(shards[n]) for n in shards] == [6, 6, 6, 5, 5]


def test_missing_annotations_are_empty_fields_and_counted(built):
    layout, expected = built
    summary = run_stage(TrainingShardsStage(make_config(layout)))
    kept = {k: e for k, e in expected.items() if e["captions"] is not None}
    assert summary["counts"] == {
        "samples": 28,
        "with_captions": 28,
        "with_phrases": sum(bool(e["phrases"]) for e in kept.values()),
        "with_boxes": sum(bool(e["boxes"]) for e in kept.values()),
        "with_vqa": sum(bool(e["qa"]) for e in kept.values()),
    }
    assert summary["failures"] == {"no_captions": 2}
    bare = next(s["json"] for ss in read_train(layout).values() for s in ss if s["__key__"] == make_key(2, 1))
    assert (bare["phrases"], bare["boxes"], bare["qa"], bare["has_confident_box"]) == ([], [], [], False)


def test_captionless_samples_kept_when_not_required(built):
    layout, _ = built
    summary = run_stage(TrainingShardsStage(make_config(layout, require_captions=False)))
    assert summary["counts"]["samples"] == 30 and summary["counts"]["with_captions"] == 28
    assert "no_captions" not in summary["failures"]
    nocap = next(s["json"] for ss in read_train(layout).values() for s in ss if s["__key__"] == make_key(0, 3))
    assert nocap["captions"] == {"raw": "", "short": {}, "long": {}}


def test_shuffle_mixes_inputs_is_seeded_and_deterministic(tmp_path):
    layout_a, _ = build_root(tmp_path / "a")
    layout_b, _ = build_root(tmp_path / "b")
    layout_c, _ = build_root(tmp_path / "c")
    run_stage(TrainingShardsStage(make_config(layout_a, shuffle_window=3, shard_size=10)))
    run_stage(TrainingShardsStage(make_config(layout_b, shuffle_window=3, shard_size=10)))
    run_stage(TrainingShardsStage(make_config(layout_c, shuffle_window=3, shard_size=10, seed=1)))
    assert train_content(layout_a) == train_content(layout_b)
    keys_a = [s["__key__"] for ss in read_train(layout_a).values() for s in ss]
    keys_c = [s["__key__"] for ss in read_train(layout_c).values() for s in ss]
    assert keys_a != keys_c and sorted(keys_a) == sorted(keys_c)
    for samples in read_train(layout_a).values():
        keys = [s["__key__"] for s in samples]
        assert len({k[:5] for k in keys}) >= 2  # every output mixes input shards
        assert keys != sorted(keys)


def test_rerun_skips_and_an_upstream_change_redoes_only_its_window(built):
    layout, expected = built
    config = make_config(layout)
    run_stage(TrainingShardsStage(config))
    before = train_bytes(layout)
    again = run_stage(TrainingShardsStage(config))
    assert again["last_run"]["processed"] == []
    write_boxes(layout, 2, tag="-new")  # the boxes stage finishes input shard 2 (window 1)
    redo = run_stage(TrainingShardsStage(config))
    assert redo["last_run"] == {"processed": ["00003", "00004"], "skipped": ["00000", "00001", "00002"]}
    after = train_bytes(layout)
    assert {n: b for n, b in after.items() if n < "00003"} == {n: b for n, b in before.items() if n < "00003"}
    assert redo["counts"]["with_boxes"] == sum(bool(e["boxes"]) for e in expected.values() if e["captions"]) + 4
    smaller = run_stage(TrainingShardsStage(make_config(layout, shard_size=20)))
    assert [w["outputs"] for w in smaller["windows"]] == [1, 1]
    assert sorted(train_bytes(layout)) == ["00000.tar", "00001.tar"]  # outputs of the old plan are gone
    assert smaller["num_shards_done"] == 2


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import tasks.shards as ts
    from tasks.config import PipelineConfig
    from tasks.stage import run_stage

    real_write, written = ts.ShardWriter.write, []
    def write_then_die(self, key, files):
        real_write(self, key, files)
        written.append(key)
        if self.url.endswith("00001.tar") and len(written) > 8:
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of output 00001
    ts.ShardWriter.write = write_then_die
    config = PipelineConfig.model_validate({config!r})
    run_stage(ts.TrainingShardsStage(config))
    """
)


def test_kill_9_mid_shard_leaves_no_shard_and_a_rerun_completes(tmp_path):
    layout, _ = build_root(tmp_path / "root")
    config = make_config(layout)
    script = KILL_SCRIPT.format(repo=str(REPO), config=config.model_dump(mode="json"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    left = sorted(p.name for p in Path(layout.train_dir).iterdir())
    assert left[0] == "00000.tar" and left[1].startswith("00001.tar.tmp-") and len(left) == 2
    assert layout.list_shards(layout.train_dir, ".tar") == ["00000"]  # the leftover is not a shard
    assert StageRecords(layout, "shards").get("00001") is None

    summary = run_stage(TrainingShardsStage(config))
    assert summary["last_run"] == {"processed": ["00001", "00002", "00003", "00004"], "skipped": ["00000"]}
    clean, _ = build_root(tmp_path / "clean")
    run_stage(TrainingShardsStage(make_config(clean)))
    assert train_content(layout) == train_content(clean)  # no temporary left, same as an unbroken run


PAUSE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {repo!r})
    import tasks.shards as ts
    from tasks.config import PipelineConfig
    from tasks.stage import run_stage

    real_write, written = ts.ShardWriter.write, []
    def write_then_pause(self, key, files):
        real_write(self, key, files)
        written.append(key)
        if self.url.endswith("00001.tar") and len(written) == 10:  # mid-output 00001, its temporary on disk
            self._file.flush()
            open({paused!r}, "w").close()
            while not os.path.exists({go!r}):
                time.sleep(0.05)
    ts.ShardWriter.write = write_then_pause
    config = PipelineConfig.model_validate({config!r})
    summary = run_stage(ts.TrainingShardsStage(config))
    print(json.dumps({{"last_run": summary["last_run"], "failed": summary.get("num_shards_failed")}}))
    """
)


def test_a_second_run_leaves_the_first_runs_temporary_alone(tmp_path):
    """Run B starts (and cleans up train/) while run A is half-way through writing output 00001: A's
    temporary survives B's start, A finishes and records 00001, B does the rest; every output once."""
    layout, _ = build_root(tmp_path / "root")
    config = make_config(layout)
    paused, go = tmp_path / "paused", tmp_path / "go"
    script = PAUSE_SCRIPT.format(repo=str(REPO), config=config.model_dump(mode="json"), paused=str(paused),
                                 go=str(go))
    run_a = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert run_a.poll() is None and time.monotonic() < deadline, run_a.communicate()[1][-3000:]
            time.sleep(0.05)
        temporaries = [p.name for p in Path(layout.train_dir).iterdir() if ".tmp-" in p.name]
        assert len(temporaries) == 1 and temporaries[0].startswith("00001.tar.tmp-")

        run_b = TrainingShardsStage(config)
        run_b.prepare()  # run B starts: its clean-up of killed writers' leftovers
        assert (Path(layout.train_dir) / temporaries[0]).exists()
        result: dict = {}
        b = threading.Thread(target=lambda: result.update(run_stage(run_b)))
        b.start()  # B does 00002-00004, then waits for A's 00001
        while not all(StageRecords(layout, "shards").get(f"{n:05d}") for n in (2, 3, 4)):
            assert b.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        go.touch()
        out, err = run_a.communicate(timeout=120)
        b.join(timeout=120)
    finally:
        go.touch()
        if run_a.poll() is None:
            run_a.kill()
    assert run_a.returncode == 0, err[-3000:]
    summary_a = json.loads(out.strip().splitlines()[-1])
    assert summary_a["last_run"] == {"processed": ["00000", "00001"], "skipped": ["00002", "00003", "00004"]}
    assert result["last_run"] == {"processed": ["00002", "00003", "00004"], "skipped": ["00000", "00001"]}
    clean, _ = build_root(tmp_path / "clean")
    run_stage(TrainingShardsStage(make_config(clean)))
    assert train_content(layout) == train_content(clean)  # no temporary left, the same outputs


def test_clean_up_removes_only_temporaries_no_live_run_is_writing(built):
    """A temporary whose shard another live run holds the lease of is kept; one whose lease is stale (a dead
    process of this host, or not renewed for the TTL) or absent is removed."""
    layout, _ = built
    config = make_config(layout)
    train = Path(layout.train_dir)
    train.mkdir(parents=True, exist_ok=True)
    other = TrainingShardsStage(config)  # another run, writing output 00001
    lease, _ = other.leases.try_acquire("00001")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_json(other.leases.path("00002"), {"run_id": "crashed", "host": socket.gethostname(), "pid": int(dead.stdout),
                                            "renewed_at": time.time(), "token": "t-dead"})
    long_ago = time.time() - 2 * config.dataset.lease_ttl_s
    write_json(other.leases.path("00003"), {"run_id": "hung", "host": "elsewhere", "pid": 7, "renewed_at": long_ago,
                                            "token": "t-old"})
    names = ["00000.tar.tmp-nolease", "00001.tar.tmp-inflight", "00002.tar.tmp-crashed", "00003.tar.tmp-stale"]
    for name in names:
        (train / name).write_bytes(b"half a tar")
    try:
        assert TrainingShardsStage(config)._remove_stale_temporaries() == 3
        assert sorted(p.name for p in train.iterdir()) == ["00001.tar.tmp-inflight"]
    finally:
        lease.release()
    assert TrainingShardsStage(config)._remove_stale_temporaries() == 1  # released: a leftover now
    assert list(train.iterdir()) == []


def test_output_reads_with_webdataset(built):
    layout, expected = built
    run_stage(TrainingShardsStage(make_config(layout)))
    urls = [layout.train_tar(n) for n in layout.list_shards(layout.train_dir, ".tar")]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("__key__", "jpg", "json")
    rows = list(dataset)
    assert len(rows) == 28
    for key, image, doc in rows:
        assert image.size == (8, 6) and doc["key"] == key and doc["captions"]["long"]["LLA"] == f"LLA {key}"
        assert json.dumps(doc)  # plain JSON all the way down


def test_a_cut_images_tar_is_named_and_its_download_shard_marked_to_redo(built):
    """Issue #13 item 1: never counted as ``image_missing``, never a ReadError that names no file."""
    layout, _ = built
    config = make_config(layout)
    run_stage(TrainingShardsStage(config))
    tar = Path(layout.images_tar("00001"))
    intact = tar.read_bytes()
    tar.write_bytes(intact[: len(intact) // 2])  # its record is left as it was
    with pytest.raises(InputDamaged, match=(
            rf"images/00001\.tar \(download shard 00001\) is damaged: {len(intact) // 2} bytes, its record says "
            rf"{len(intact)}; download shard 00001 is marked to be redone: rerun download, then shards")):
        run_stage(TrainingShardsStage(config), force=True)
    rec = StageRecords(layout, "download").get("00001")
    assert not rec.done and rec.invalidated.startswith("images/00001.tar: ")
    again = TrainingShardsStage(config)
    again.prepare()
    assert again.list_shards() == ["00000", "00001", "00002", "00003", "00004"]  # its window keeps its place
    with pytest.raises(InputDamaged, match="download shard 00001 is marked to be redone"):
        again.run_shard("00000")

    tar.write_bytes(intact)  # the download stage redoes the shard (byte for byte, as a deterministic rerun)
    _put(layout, "download", "00001", {"ok": PER_INPUT, "failed": 1},
         tar=layout.images_tar("00001"), table=layout.images_table("00001"))
    summary = run_stage(TrainingShardsStage(config))
    assert summary["last_run"]["processed"] == []  # same bytes as when the outputs were written
    forced = run_stage(TrainingShardsStage(config), force=True)
    assert "image_missing" not in forced["failures"] and forced["counts"]["samples"] == 28


def test_a_same_size_corruption_of_an_images_tar_is_caught_while_it_streams(built):
    layout, _ = built
    tar = Path(layout.images_tar("00000"))
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF  # inside the first JPEG: the tar still parses
    tar.write_bytes(bytes(data))
    with pytest.raises(InputDamaged, match=r"images/00000\.tar \(download shard 00000\) is damaged: checksum crc32:"):
        run_stage(TrainingShardsStage(make_config(layout)))
    assert StageRecords(layout, "download").get("00000").invalidated


def test_only_the_annotations_a_window_reads_decide_its_outputs(built):
    """Rewriting an input with the same bytes redoes nothing; changing one redoes its window only."""
    layout, _ = built
    config = make_config(layout)
    run_stage(TrainingShardsStage(config))
    phrases = Path(layout.annotation("phrases", "00002"))
    same = phrases.read_bytes()
    phrases.unlink()
    phrases.write_bytes(same)
    _put(layout, "phrases", "00002", {"with_phrases": 5}, tag="-forced", table=str(phrases))  # a new fingerprint
    assert run_stage(TrainingShardsStage(config))["last_run"]["processed"] == []
    write_table(str(phrases), [{"key": make_key(2, 0), "phrases": [{"text": "new", "sentence": "", "field": ""}]}],
                "phrases")
    _put(layout, "phrases", "00002", {"with_phrases": 1}, table=str(phrases))
    assert run_stage(TrainingShardsStage(config))["last_run"]["processed"] == ["00003", "00004"]
