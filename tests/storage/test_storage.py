import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from storage import (
    DatasetLayout,
    ShardRecord,
    ShardWriter,
    StageRecords,
    atomic_write,
    iter_shard,
    make_key,
    read_table,
    write_table,
)
from storage.fs import remove_stale_temporaries
from storage.tables import SCHEMAS


def _jpeg(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    import uuid

    return f"memory://goldiclip-test-{uuid.uuid4().hex}"


def test_keys_are_unique_sortable_and_dotless():
    keys = [make_key(s, i) for s in (0, 1, 12) for i in (0, 1, 9999)]
    assert len(set(keys)) == len(keys)
    assert keys == sorted(keys)
    assert all("." not in k and len(k) == 9 for k in keys)
    with pytest.raises(ValueError):
        make_key(0, 10_000)


def test_shard_round_trip(root):
    layout = DatasetLayout(root)
    samples = [(make_key(3, i), _jpeg((i * 40, 0, 0)), {"url": f"http://x/{i}.jpg", "i": i}) for i in range(5)]
    with ShardWriter(layout.images_tar(3)) as w:
        for key, jpg, meta in samples:
            w.write(key, {"jpg": jpg, "json": meta})
    got = list(iter_shard(layout.images_tar(3)))
    assert [s["__key__"] for s in got] == [k for k, _, _ in samples]
    assert [s["json"] for s in got] == [m for _, _, m in samples]
    assert all(s["jpg"] == jpg for s, (_, jpg, _) in zip(got, samples))
    # webdataset itself reads it (the training loader will use it)
    if root.startswith("/"):
        import webdataset as wds

        ds = wds.WebDataset(layout.images_tar(3), shardshuffle=False).decode()
        assert [s["__key__"] for s in ds] == [k for k, _, _ in samples]


def test_shard_writer_rejects_bad_and_duplicate_keys(tmp_path):
    with ShardWriter(str(tmp_path / "a.tar")) as w:
        with pytest.raises(ValueError, match="no dots"):
            w.write("a.b", {"jpg": b"x"})
        w.write("k1", {"jpg": b"x"})
        with pytest.raises(ValueError, match="duplicate"):
            w.write("k1", {"jpg": b"x"})


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "images" / "00000.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(str(target)) as w:
            w.write("000000000", {"jpg": b"x"})
            raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "images").iterdir()) == []


def test_atomic_write_is_invisible_until_complete(root):
    layout = DatasetLayout(root)
    url = layout.annotation("captions", 0)
    with atomic_write(url) as f:
        f.write(b"partial")
        assert layout.list_shards(f"{root}/annotations/captions", ".parquet") == []
    assert layout.list_shards(f"{root}/annotations/captions", ".parquet") == ["00000"]


def test_stale_temporaries_are_ignored_and_removed(tmp_path):
    layout = DatasetLayout(str(tmp_path))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "00001.tar.tmp-abc123").write_bytes(b"half a tar")
    assert layout.list_shards(layout.images_dir, ".tar") == []
    assert remove_stale_temporaries(layout.images_dir) == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_temporaries_a_writer_may_still_use_are_kept(where, tmp_path, request):
    """``in_flight`` keeps the temporaries of writers at work (another run's, under a live lease); the rest go."""
    from storage.fs import atomic_write_bytes, join, open_fs

    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_server").prefix("temporaries")
    directory = join(root, "train")
    atomic_write_bytes(join(directory, "00000.tar"), b"a whole tar")
    for name in ("00001.tar.tmp-live", "00002.tar.tmp-dead", "00003.tar.tmp-dead"):
        atomic_write_bytes(join(directory, name), b"half a tar")  # complete objects under temporary names
    asked = []

    def in_flight(path: str) -> bool:
        asked.append(path.rsplit("/", 1)[-1])
        return "-live" in path

    assert remove_stale_temporaries(directory, in_flight=in_flight) == 2
    fs, path = open_fs(directory)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) == ["00000.tar", "00001.tar.tmp-live"]
    assert sorted(asked) == ["00001.tar.tmp-live", "00002.tar.tmp-dead", "00003.tar.tmp-dead"]  # never a whole file
    assert remove_stale_temporaries(directory) == 1  # no writer left: every temporary goes
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] == ["00000.tar"]


@pytest.mark.parametrize(
    "kind,row",
    [
        ("urls", {"index": 0, "url": "http://a", "caption": "c", "source": "cc3m"}),
        ("captions", {"key": "000000000", "url": "http://a", "raw": "r", "short": ["a", "b", "c"], "long": ["x", "y", "z"]}),
        ("phrases", {"key": "000000000", "phrases": [{"text": "a red ball", "sentence": "A red ball.", "field": "LLA"}]}),
        ("boxes", {"key": "000000000", "width": 10, "height": 8, "has_confident_box": True,
                   "boxes": [{"phrase": "ball", "x0": 1.0, "y0": 2.0, "x1": 3.0, "y1": 4.0, "score": 0.5}]}),
        ("vqa", {"key": "000000000", "qa": [{"question": "What?", "answer": "A"}], "raw_output": "{}", "error": None}),
    ],
)
def test_tables_round_trip_with_their_schema(root, kind, row):
    url = f"{root}/t/{kind}.parquet"
    assert write_table(url, [row, row], kind) == 2
    table = read_table(url)
    assert table.schema.equals(SCHEMAS[kind], check_metadata=False)
    assert table.to_pylist() == [row, row]


def test_table_rejects_rows_that_do_not_fit(tmp_path):
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TypeError)):
        write_table(str(tmp_path / "x.parquet"), [{"key": "k", "phrases": "not a list"}], "phrases")
    assert not (tmp_path / "x.parquet").exists()


def test_stage_records_and_summary(root):
    layout = DatasetLayout(root)
    records = StageRecords(layout, "download")
    assert records.get("00000") is None
    records.put(ShardRecord("00000", "fp1", {"urls": 10, "ok": 8}, {"http_404": 2}, 1.5))
    records.put(ShardRecord("00001", "fp1", {"urls": 5, "ok": 5}, {}, 0.5))
    assert records.is_done("00000", "fp1")
    assert not records.is_done("00000", "fp2")
    summary = records.write_summary()
    assert summary["counts"] == {"urls": 15, "ok": 13}
    assert summary["failures"] == {"http_404": 2}
    assert summary["num_shards_done"] == 2
    from storage import read_json

    on_disk = read_json(layout.stage_summary("download"))
    assert json.loads(json.dumps(summary)) == on_disk


def test_records_keep_their_node_and_older_records_without_one_still_load(tmp_path):
    from storage import DatasetLayout, ShardRecord, StageRecords, write_json

    layout = DatasetLayout(str(tmp_path))
    records = StageRecords(layout, "phrases")
    node = {"node_id": "ab12", "ip": "127.0.0.2", "host": "worker-1", "pid": 4242}
    records.put(ShardRecord("00000", "fp", {"images": 3}, node=node))
    old = {"shard": "00001", "fingerprint": "fp", "counts": {"images": 2}, "failures": {}, "seconds": 1.0,
           "done": True, "finished_at": 0.0}  # written before nodes (and outputs) were recorded
    write_json(layout.stage_shard_record("phrases", "00001"), old)
    assert records.get("00000").node == node
    assert records.get("00001").node is None and records.get("00001").counts == {"images": 2}
    summary = records.write_summary()
    assert summary["shards"]["00000"]["node"] == node and summary["shards"]["00001"]["node"] is None
