"""Output digests: sizes and CRC-32 that notice missing, cut and changed files; tars checked while streaming."""

import io
import tarfile
import time
import uuid
import zlib

import pytest

from storage import DatasetLayout, ShardRecord, ShardWriter, StageRecords, iter_shard
from storage.fs import open_fs
from storage.integrity import DigestMismatch, FileDigest, file_digest, file_problem


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    return str(tmp_path / "root") if request.param == "local" else f"memory://goldiclip-test-{uuid.uuid4().hex}"


def _put(url: str, data: bytes) -> None:
    fs, path = open_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def _bytes(url: str) -> bytes:
    fs, path = open_fs(url)
    return fs.cat_file(path)


def _write_tar(url: str, num: int = 5) -> None:
    with ShardWriter(url) as w:
        for i in range(num):
            w.write(f"00000{i:04d}", {"jpg": bytes([i]) * 3000, "json": {"i": i}})


def test_digest_is_size_and_crc32_and_notices_missing_cut_and_changed_files(root):
    url = f"{root}/a/file.bin"
    data = bytes(range(256)) * 40_000  # ~10 MB: several read chunks
    _put(url, data)
    digest = file_digest(url)
    assert digest == FileDigest(len(data), f"crc32:{zlib.crc32(data):08x}")
    assert file_problem(url, digest) is None
    _put(url, data[:-1])
    assert file_problem(url, digest, checksum=False) == f"{len(data) - 1} bytes, its record says {len(data)}"
    _put(url, data[:100] + b"X" + data[101:])  # same size, one byte changed
    assert file_problem(url, digest, checksum=False) is None  # a stat cannot see it
    assert file_problem(url, digest).startswith("checksum crc32:")
    assert file_problem(f"{root}/a/nope.bin", digest) == "missing"


def test_tar_bytes_do_not_depend_on_when_they_were_written(tmp_path):
    """A rewrite of the same samples is the same file, so a downstream stage can skip it."""
    _write_tar(str(tmp_path / "a.tar"))
    time.sleep(1.1)  # tar headers hold whole seconds
    _write_tar(str(tmp_path / "b.tar"))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_iter_shard_checks_the_recorded_digest_while_streaming(root):
    url = f"{root}/images/00000.tar"
    _write_tar(url)
    digest = file_digest(url)
    assert [s["json"]["i"] for s in iter_shard(url, expected=digest)] == [0, 1, 2, 3, 4]
    intact = _bytes(url)

    _put(url, intact[:600] + bytes([intact[600] ^ 0xFF]) + intact[601:])  # inside the first JPEG
    with pytest.raises(DigestMismatch, match=r"images/00000\.tar: checksum crc32:\w+, its record says"):
        list(iter_shard(url, expected=digest))

    _put(url, intact[: len(intact) // 2 + 100])  # cut mid-member: tarfile raises "unexpected end of data"
    with pytest.raises(DigestMismatch, match=rf"images/00000\.tar: \d+ bytes, its record says {digest.size}"):
        list(iter_shard(url, expected=digest))

    # Cut at a member boundary: tarfile ends quietly, and without a digest samples are lost unnoticed.
    with tarfile.open(fileobj=io.BytesIO(intact)) as tar:
        third_sample = tar.getmembers()[4].offset  # two members (jpg, json) per sample
    _put(url, intact[:third_sample])
    assert len(list(iter_shard(url))) == 2
    with pytest.raises(DigestMismatch, match="bytes, its record says"):
        list(iter_shard(url, expected=digest))


def test_invalidated_record_is_not_done_says_why_and_its_outputs_are_checked(root):
    layout = DatasetLayout(root)
    url = layout.images_tar("00003")
    _write_tar(url)
    digest = file_digest(url)
    records = StageRecords(layout, "download")
    records.put(ShardRecord("00003", "fp", {"ok": 5}, outputs={"tar": {"path": "images/00003.tar", **digest.as_dict()}}))
    assert records.output_problems(records.get("00003")) == []
    _put(url, _bytes(url)[:1000])
    assert records.output_problems(records.get("00003"), checksums=False) == [
        f"images/00003.tar: 1000 bytes, its record says {digest.size}"]
    records.invalidate("00003", "images/00003.tar: cut short")
    rec = records.get("00003")
    assert (rec.done, rec.invalidated, rec.counts) == (False, "images/00003.tar: cut short", {"ok": 5})
    assert not records.is_done("00003", "fp")
    assert layout.relative(url) == "images/00003.tar" and layout.absolute("images/00003.tar") == url
