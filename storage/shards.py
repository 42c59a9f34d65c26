"""Webdataset shards: ``<key>.jpg`` + ``<key>.json`` per sample in a plain tar.

Keys are ``{shard:05d}{index:04d}``: unique across the dataset, sortable, no dots
(webdataset splits the key from the extension at the first dot).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import Any

from storage.fs import atomic_write, open_fs
from storage.integrity import ChecksumReader, DigestMismatch, FileDigest

MAX_SAMPLES_PER_SHARD = 10_000  # four index digits in a key
# Every member's mtime: a tar written twice from the same samples is the same bytes, so
# its checksum (storage.integrity) says whether a rewrite changed anything downstream.
MEMBER_MTIME = 0


def make_key(shard: int | str, index: int) -> str:
    if not 0 <= index < MAX_SAMPLES_PER_SHARD:
        raise ValueError(f"sample index {index} out of range for a shard (max {MAX_SAMPLES_PER_SHARD})")
    return f"{int(shard):05d}{index:04d}"


class ShardWriter:
    """Write one tar atomically: samples go to a temporary file renamed on ``close``.

    Used as a context manager; an exception inside the block leaves nothing behind.
    """

    def __init__(self, url: str):
        self.url = url
        self._keys: set[str] = set()
        self._ctx = atomic_write(url, "wb")
        self._file = None
        self._tar = None

    def __enter__(self) -> ShardWriter:
        import webdataset as wds  # imports torch (~1.5 s): only writers pay for it, not every `import storage`

        self._file = self._ctx.__enter__()
        self._tar = wds.TarWriter(self._file, mtime=MEMBER_MTIME)
        return self

    def write(self, key: str, files: dict[str, Any]) -> None:
        """Add one sample; ``files`` maps extension (``jpg``, ``json``) to bytes or a JSON-able object."""
        if "." in key or not key:
            raise ValueError(f"invalid sample key {key!r}: keys must be non-empty and contain no dots")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.url}")
        self._keys.add(key)
        sample = {"__key__": key}
        for ext, value in files.items():
            sample[ext] = value if isinstance(value, bytes) else json.dumps(value).encode()
        self._tar.write(sample)

    def __len__(self) -> int:
        return len(self._keys)

    def __exit__(self, exc_type, exc, tb) -> bool:
        # TarWriter.close() would close the file the atomic writer still owns;
        # closing only the tar stream writes the end-of-archive blocks.
        self._tar.tarstream.close()
        return self._ctx.__exit__(exc_type, exc, tb)


def iter_shard(url: str, decode_json: bool = True, expected: FileDigest | None = None) -> Iterator[dict[str, Any]]:
    """Samples of a tar in file order: ``{"__key__": key, "jpg": bytes, "json": dict, ...}``.

    With ``expected`` (the digest its shard record holds) the tar is checksummed as it
    streams and ``DigestMismatch`` is raised at its end, or where it breaks, when it is
    not that file; samples already yielded then came from a damaged file.
    """
    fs, path = open_fs(url)
    with fs.open(path, "rb") as raw:
        f = ChecksumReader(raw, url) if expected is not None else raw
        try:
            yield from _samples(f, decode_json)
        except (tarfile.TarError, EOFError) as e:
            if expected is not None:
                try:
                    f.check(expected)
                except DigestMismatch as mismatch:
                    raise mismatch from e
            raise
        if expected is not None:
            f.check(expected)


def _samples(f, decode_json: bool) -> Iterator[dict[str, Any]]:
    with tarfile.open(fileobj=f, mode="r|") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = json.loads(data) if decode_json and ext == "json" else data
        if current is not None:
            yield current
