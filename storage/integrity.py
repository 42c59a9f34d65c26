"""Output checksums: what a shard record keeps to prove a file is still the one its stage wrote.

A record holds each output's size and a CRC-32 of its bytes (``crc32:89abcdef``; the
name says the algorithm, so a later change is never ambiguous). CRC-32 because the
threat is accidental damage (a truncated copy, a partial upload, a flipped block),
not tampering, and it is the fastest check the standard library has: about 2 GB/s
on one core here, against 0.8 GB/s for SHA-256 and 0.3 GB/s for BLAKE2b. An
images tar of 5,000 images (100-150 MB) costs under 0.1 s, nothing next to fetching
it; the 6,000 tars of Open-30M are ~6 core-minutes per full pass. Together with the
size, a changed file keeps its digest with probability 2**-32, which is what the
downstream fingerprints (``tasks.stage``) rely on to notice changed outputs.

Sizes are checked with one ``stat`` (every stage, for every file it reads or skips);
checksums need the whole file, so a stage checks one where it reads the file anyway,
either before it starts (``file_problem``) or while it streams it (``ChecksumReader``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import IO

from storage.fs import open_fs

ALGORITHM = "crc32"
CHUNK_BYTES = 4 * 2**20


@dataclass(frozen=True)
class FileDigest:
    size: int
    checksum: str  # "crc32:<8 hex digits>"

    def as_dict(self) -> dict:
        return {"size": self.size, "checksum": self.checksum}

    @classmethod
    def from_dict(cls, d: dict) -> FileDigest:
        return cls(int(d["size"]), str(d["checksum"]))


class DigestMismatch(ValueError):
    """A file is not what its record says: ``problem`` says how (missing, size, checksum)."""

    def __init__(self, url: str, problem: str):
        super().__init__(f"{url}: {problem}")
        self.url = url
        self.problem = problem


class _RunningCrc:
    def __init__(self) -> None:
        self.value = 0
        self.size = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)
        self.size += len(data)

    def digest(self) -> FileDigest:
        return FileDigest(self.size, f"{ALGORITHM}:{self.value:08x}")


def file_digest(url: str) -> FileDigest:
    """Size and checksum of ``url``, read once in chunks."""
    crc = _RunningCrc()
    fs, path = open_fs(url)
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            crc.update(chunk)
    return crc.digest()


def _compare(actual: FileDigest, expected: FileDigest) -> str | None:
    if actual.size != expected.size:
        return f"{actual.size} bytes, its record says {expected.size}"
    if actual.checksum != expected.checksum:
        return f"checksum {actual.checksum}, its record says {expected.checksum}"
    return None


def file_problem(url: str, expected: FileDigest, *, checksum: bool = True) -> str | None:
    """How ``url`` differs from ``expected`` (None: it matches); the size alone when ``checksum`` is off."""
    fs, path = open_fs(url)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return "missing"
    if size != expected.size:
        return f"{size} bytes, its record says {expected.size}"
    return _compare(file_digest(url), expected) if checksum else None


class ChecksumReader:
    """A read-only binary stream that checksums what passes through it.

    For readers that stream a whole file anyway (a tar): wrap the file, read, then
    ``check(expected)`` reads whatever the reader left (a tar's end padding) and raises
    ``DigestMismatch`` when the file is not the recorded one. No second read of the file.
    """

    def __init__(self, raw: IO[bytes], url: str):
        self._raw = raw
        self._crc = _RunningCrc()
        self.url = url

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._crc.update(data)
        return data

    def check(self, expected: FileDigest) -> None:
        while self.read(CHUNK_BYTES):
            pass
        problem = _compare(self._crc.digest(), expected)
        if problem:
            raise DigestMismatch(self.url, problem)


__all__ = ["ALGORITHM", "ChecksumReader", "DigestMismatch", "FileDigest", "file_digest", "file_problem"]
