"""Webdataset shards: ``<key>.jpg`` + ``<key>.json`` per sample in a plain tar.

Keys are ``{shard:05d}{index:04d}``: unique across the dataset, sortable, no dots
(webdataset splits the key from the extension at the first dot).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import Any

import webdataset as wds

from storage.fs import atomic_write, open_fs

MAX_SAMPLES_PER_SHARD = 10_000  # four index digits in a key


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
        self._tar: wds.TarWriter | None = None

    def __enter__(self) -> ShardWriter:
        self._file = self._ctx.__enter__()
        self._tar = wds.TarWriter(self._file)
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


def iter_shard(url: str, decode_json: bool = True) -> Iterator[dict[str, Any]]:
    """Samples of a tar in file order: ``{"__key__": key, "jpg": bytes, "json": dict, ...}``."""
    fs, path = open_fs(url)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
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
