"""DreamLIP caption rows partitioned by image shard: the on-storage format the captions stage reads.

METHOD.md section 7: every image has seven DreamLIP captions (`raw`, a short and a long
caption from each captioner of `storage.tables.CAPTIONERS`), keyed by image URL, in
CSVs of 6-30 GB. The URL -> image shard assignment is fixed before anything is
downloaded (the download split's `sources/shards/*.parquet`), so one pass over each
CSV sends every row to the image shard its URL belongs to, through a compact
`UrlShardIndex` (sorted 64-bit URL hashes + int32 shard ids, vectorised
`np.searchsorted`); rows whose URL is in no shard are dropped and counted
(`url_not_in_lists`). An image shard then reads only its own rows. Total cost for
Open-30M: one pass over the CSVs plus one read of each shard's own rows (~5,000 rows),
instead of a scan of all caption data per shard.

Layout under `{out_url}/{index}/` (`partition_index`: the download split's
fingerprint, the CSV reader's settings and the captioners, so a new split never mixes
with an old one):
```
{shard:05d}/part-{csv tag}-{attempt}-{flush:06d}.parquet   `caption_schema`, CSV order
_csvs/{csv tag}/_SUCCESS.json                               per finished CSV: its attempt, counts
manifest.json                                               written last: what readers trust
```
Writes are atomic and resumable: rows are buffered per shard in memory and flushed as
one part file per shard when a byte budget is reached (never one open writer per
shard, so thousands of shards work); each part is written under a temporary name and
renamed; parts carry their CSV's tag and a per-attempt id, and `_SUCCESS.json` names the
attempt that finished. Readers read only the finished attempt of each CSV in the
manifest, so a pass killed at any point leaves nothing a reader takes for caption rows,
and a rerun reads again only the CSVs without a `_SUCCESS.json` for their current
content. Whether a pass is needed at all is the captions stage's decision (its record,
`tasks/captions/stage.py`); this module only owns the format.

Imports only numpy, pyarrow and fsspec (the `storage/` rule): the CSV reader is passed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import atomic_write, join, open_fs, read_json, write_json
from storage.layout import shard_name
from storage.tables import CAPTIONERS, read_table

log = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when the partition layout or the part schema changes
CHUNK_ROWS = 20_000  # CSV rows hashed and assigned to shards at once
WRITE_THREADS = 8  # parts written concurrently at a flush (object stores are latency-bound)


@dataclass(frozen=True)
class DreamlipCaptions:
    """One image's DreamLIP captions: what the reader yields and a partition stores."""

    url: str
    raw: str
    short: dict[str, str]  # captioner (one of CAPTIONERS) -> caption
    long: dict[str, str]


# Reads one CSV (path or fsspec URL), counting what it skips into the Counter.
RowReader = Callable[[str, Counter], Iterable[DreamlipCaptions]]


def url_hash(url: str) -> int:
    """Stable 64-bit hash of a URL (blake2b; Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8"), digest_size=8).digest(), "big")


def url_hashes(urls: Iterable[str]) -> np.ndarray:
    """`url_hash` of each URL as a uint64 array."""
    digests = b"".join(hashlib.blake2b(u.encode("utf-8"), digest_size=8).digest() for u in urls)
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


class UrlShardIndex:
    """URL -> image shard as two parallel arrays: sorted 64-bit URL hashes and int32 shard ids.

    12 bytes per URL (Open-30M: ~360 MB) where a dict of URL strings would take
    ~3 GB. Two listed URLs with one hash (a 64-bit collision; the download split
    dedupes URLs, so nothing else) keep the first shard and are counted in
    `collisions`. A hit is only a candidate: the shard's join checks the exact URL
    string, so a collision can cost a caption, never attach a wrong one.
    """

    def __init__(self, hashes: np.ndarray, shards: np.ndarray):
        hashes = np.asarray(hashes, dtype=np.uint64)
        shards = np.asarray(shards, dtype=np.int32)
        order = np.argsort(hashes, kind="stable")
        hashes, shards = hashes[order], shards[order]
        del order
        keep = np.ones(len(hashes), dtype=bool)
        keep[1:] = hashes[1:] != hashes[:-1]
        self.collisions = int(len(hashes) - int(keep.sum()))
        self.hashes = hashes[keep] if self.collisions else hashes
        self.shards = shards[keep] if self.collisions else shards

    @classmethod
    def from_shards(cls, shard_urls: Iterable[tuple[int, Iterable[str]]]) -> UrlShardIndex:
        """Build from `(shard id, URLs of that shard)` pairs."""
        hashes, shards = [], []
        for shard, urls in shard_urls:
            h = url_hashes(urls)
            hashes.append(h)
            shards.append(np.full(len(h), shard, dtype=np.int32))
        if not hashes:
            return cls(np.empty(0, np.uint64), np.empty(0, np.int32))
        return cls(np.concatenate(hashes), np.concatenate(shards))

    def __len__(self) -> int:
        return len(self.hashes)

    def shard_of(self, hashes: np.ndarray) -> np.ndarray:
        """Shard id of each hash (vectorised binary search); -1 where no listed URL has it."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        if not len(self.hashes):
            return np.full(len(hashes), -1, dtype=np.int32)
        pos = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return np.where(self.hashes[pos] == hashes, self.shards[pos], -1).astype(np.int32)


def caption_schema(captioners: Iterable[str] = CAPTIONERS) -> pa.Schema:
    """Schema of the partition's parts: one row per CSV row, flat caption columns."""
    captioners = list(captioners)
    return pa.schema(
        [pa.field("url", pa.string(), nullable=False), pa.field("raw", pa.string())]
        + [pa.field(f"short_{c}", pa.string()) for c in captioners]
        + [pa.field(f"long_{c}", pa.string()) for c in captioners]
    )


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def file_stamp(url: str) -> dict:
    """What identifies a CSV's content cheaply: size plus ETag or mtime when the fs has one."""
    fs, path = open_fs(url)
    info = fs.info(path)
    stamp = {"size": info.get("size")}
    for k in ("ETag", "etag", "mtime", "LastModified", "last_modified"):
        if k in info:
            stamp[k] = str(info[k])
    return stamp


def partition_index(split_fingerprint: str, reader_fingerprint: Any, captioners: Sequence[str]) -> str:
    """Name of the partition directory for one download split, CSV reader and captioner list."""
    return _digest({"version": INDEX_VERSION, "split": split_fingerprint, "columns": reader_fingerprint,
                    "captioners": list(captioners)})


def _csv_tag(csv_path: str, fingerprint: dict) -> str:
    """Name of one CSV's parts: a readable stem (no dashes or dots) plus a hash of what built them."""
    stem = csv_path.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", stem)[:48] or "csv"
    return f"{stem}-{_digest(fingerprint)}"


def _part_prefix(tag: str, attempt: str) -> str:
    return f"part-{tag}-{attempt}-"


def _write_part(url: str, table: pa.Table) -> None:
    """One part file, written under a temporary name and renamed (`storage.fs.atomic_write`)."""
    with atomic_write(url, "wb") as f:
        pq.write_table(table, f, compression="zstd")


class _ShardBuffers:
    """Caption rows held in memory per image shard, all flushed together at a byte budget.

    A flush writes one part per shard that has rows, so there is never an open
    writer per shard: thousands of shards cost memory only for their rows.
    """

    def __init__(self, root: str, prefix: str, flush_bytes: int, write_threads: int):
        self.root, self.prefix = root, prefix
        self.flush_bytes, self.write_threads = flush_bytes, write_threads
        self.tables: dict[int, list[pa.Table]] = defaultdict(list)
        self.nbytes = 0
        self.flushes = 0
        self.parts = 0

    def add(self, table: pa.Table, shard_ids: np.ndarray) -> None:
        """Add `table`, whose rows are sorted by `shard_ids` (stable, so CSV order within a shard)."""
        shards, starts = np.unique(shard_ids, return_index=True)
        ends = np.append(starts[1:], len(shard_ids))
        for shard, a, b in zip(shards.tolist(), starts.tolist(), ends.tolist()):
            self.tables[shard].append(table.slice(a, b - a))
        self.nbytes += table.nbytes
        if self.nbytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.tables:
            return
        name = f"{self.prefix}{self.flushes:06d}.parquet"
        items = sorted(self.tables.items())
        self.tables, self.nbytes = defaultdict(list), 0

        def write(item: tuple[int, list[pa.Table]]) -> None:
            shard, tables = item
            _write_part(join(self.root, f"{shard:05d}", name), pa.concat_tables(tables))

        with ThreadPoolExecutor(max_workers=self.write_threads) as pool:
            list(pool.map(write, items))  # re-raises the first error
        self.flushes += 1
        self.parts += len(items)


def _partition_one_csv(
    csv_path: str,
    rows: Iterable[DreamlipCaptions],
    counts: Counter,
    buffers: _ShardBuffers,
    url_index: UrlShardIndex,
    *,
    captioners: Sequence[str],
    chunk_rows: int,
) -> None:
    schema = caption_schema(captioners)

    def push(chunk: list[DreamlipCaptions]) -> None:
        ids = url_index.shard_of(url_hashes(r.url for r in chunk))
        kept = np.flatnonzero(ids >= 0)
        if len(kept) < len(chunk):
            counts["url_not_in_lists"] += len(chunk) - len(kept)
        if not len(kept):
            return
        order = kept[np.argsort(ids[kept], kind="stable")].tolist()
        picked = [chunk[i] for i in order]
        data = {"url": [r.url for r in picked], "raw": [r.raw for r in picked]}
        for c in captioners:
            data[f"short_{c}"] = [r.short[c] for r in picked]
            data[f"long_{c}"] = [r.long[c] for r in picked]
        buffers.add(pa.Table.from_pydict(data, schema=schema), ids[order])

    chunk: list[DreamlipCaptions] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= chunk_rows:
            push(chunk)
            chunk = []
    if chunk:
        push(chunk)
    buffers.flush()


def _remove_parts(root: str, tag: str) -> None:
    """Delete parts (and temporaries) a killed run left for CSV `tag`; they are never read anyway."""
    fs, path = open_fs(root)
    if not fs.exists(path):
        return
    for leftover in fs.glob(f"{path}/*/{_part_prefix(tag, '*')}*"):
        with contextlib.suppress(FileNotFoundError):
            fs.rm(leftover)


def index_dir(out_url: str, manifest: dict) -> str:
    """Directory of one partition (`{out_url}/{index}`)."""
    return join(out_url, manifest["index"])


def manifest_url(out_url: str, index: str) -> str:
    return join(out_url, index, "manifest.json")


def read_manifest(out_url: str, index: str) -> dict | None:
    """The manifest of partition `index`, or None when no pass over its CSVs finished."""
    return read_json(manifest_url(out_url, index))


def partition_by_shard(
    csv_paths: Iterable[str],
    out_url: str,
    index: str,
    load_url_index: Callable[[], UrlShardIndex],
    read_rows: RowReader,
    *,
    captioners: Sequence[str] = CAPTIONERS,
    flush_bytes: int = 1 << 30,
    chunk_rows: int = CHUNK_ROWS,
    write_threads: int = WRITE_THREADS,
) -> dict:
    """Write every CSV row whose URL is in an image shard into that shard's parts; one pass per CSV.

    `index` names the partition (`partition_index`). Returns the manifest (written last,
    at `manifest_url`): `index`, `captioners`, `csvs` (each CSV's `_SUCCESS` content, in
    the given order) and total `counts`. A CSV whose `_SUCCESS.json` matches its current size and ETag/mtime is
    not read again, and `load_url_index` is called only when some CSV needs reading. A
    killed CSV is redone under a new attempt id; parts of the killed attempt (deleted here,
    best effort) and temporary files are never read. Memory: the URL index plus
    `flush_bytes` of buffered caption rows (Arrow bytes) plus one chunk of `chunk_rows`
    rows. Counts per CSV: what `read_rows` counts, and `url_not_in_lists`.
    """
    if flush_bytes < 1 or chunk_rows < 1:
        raise ValueError(f"flush_bytes and chunk_rows must be >= 1, got {flush_bytes}, {chunk_rows}")
    root = join(out_url, index)
    url_index: UrlShardIndex | None = None
    entries = []
    for csv_path in dict.fromkeys(csv_paths):  # a CSV listed twice is read once
        content = {"csv": csv_path, "stamp": file_stamp(csv_path), "index": index}
        tag = _csv_tag(csv_path, content)
        success = join(root, "_csvs", tag, "_SUCCESS.json")
        entry = read_json(success)
        if not entry or entry.get("fingerprint") != content:
            if url_index is None:
                url_index = load_url_index()
            _remove_parts(root, tag)
            attempt = uuid.uuid4().hex[:12]
            counts: Counter = Counter()
            buffers = _ShardBuffers(root, _part_prefix(tag, attempt), flush_bytes, write_threads)
            _partition_one_csv(csv_path, read_rows(csv_path, counts), counts, buffers, url_index,
                               captioners=captioners, chunk_rows=chunk_rows)
            entry = {"csv": csv_path, "tag": tag, "attempt": attempt, "fingerprint": content,
                     "counts": dict(counts), "parts": buffers.parts}
            write_json(success, entry)
        entries.append(entry)
    total: Counter = Counter()
    for e in entries:
        total.update(e["counts"])
    manifest = {"index": index, "version": INDEX_VERSION, "captioners": list(captioners), "csvs": entries,
                "counts": dict(total)}
    write_json(manifest_url(out_url, index), manifest)
    removed = remove_stale_partitions(out_url, manifest)
    if removed:
        log.info("captions: removed partitions no manifest can read again: %s", removed)
    return manifest


def remove_stale_partitions(out_url: str, manifest: dict) -> list[str]:
    """Delete, after `manifest` is written, what no run with this split and these CSVs can read.

    That is every other index directory under `out_url` (built for an earlier download
    split: a new split names a new index, and the old one's shard numbers mean other
    images), and, in this index, the parts of a listed CSV built from an earlier version of
    the file (its tag hashes the file's size and ETag/mtime). Parts of a CSV that is no
    longer listed are kept: listing it again must not cost another pass over it. Returns
    what was removed (index names and CSV tags).
    """
    fs, path = open_fs(out_url)
    removed = []
    for other in fs.ls(path, detail=False):
        name = other.rstrip("/").rsplit("/", 1)[-1]
        if name != manifest["index"] and fs.isdir(other):
            fs.rm(other, recursive=True)
            removed.append(name)
    root = index_dir(out_url, manifest)
    current = {e["csv"]: e["tag"] for e in manifest["csvs"]}
    fs, csvs_path = open_fs(join(root, "_csvs"))
    for success in fs.glob(f"{csvs_path}/*/_SUCCESS.json"):
        tag = success.rsplit("/", 2)[-2]
        entry = read_json(join(root, "_csvs", tag, "_SUCCESS.json")) or {}
        if entry.get("csv") in current and current[entry["csv"]] != tag:
            _remove_parts(root, tag)
            fs.rm(success.rsplit("/", 1)[0], recursive=True)
            removed.append(tag)
    return removed


def read_shard_captions(
    out_url: str,
    manifest: dict,
    shard: int | str,
    urls: Collection[str],
    *,
    counts: Counter,
) -> dict[str, DreamlipCaptions]:
    """Captions of one image shard's `urls` from a `partition_by_shard` manifest.

    Reads only `{index}/{shard}/`, and there only the parts of each CSV's finished
    attempt (CSV order, then flush order), never a temporary file. A row whose URL
    is not exactly one of `urls` (a 64-bit hash collision) is dropped and counted
    as `url_hash_collision`; the first row of a URL wins, later ones count as
    `duplicate_url`.
    """
    shard_dir = join(index_dir(out_url, manifest), shard_name(shard))
    fs, path = open_fs(shard_dir)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        names = []
    wanted = urls if isinstance(urls, (set, frozenset, dict)) else set(urls)
    captioners = manifest["captioners"]
    found: dict[str, DreamlipCaptions] = {}
    for entry in manifest["csvs"]:
        prefix = _part_prefix(entry["tag"], entry["attempt"])
        pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.parquet")
        parts = sorted((int(m.group(1)), n) for n in names if (m := pattern.fullmatch(n)))
        for _, name in parts:
            for r in read_table(join(shard_dir, name)).to_pylist():
                url = r["url"]
                if url not in wanted:
                    counts["url_hash_collision"] += 1
                elif url in found:
                    counts["duplicate_url"] += 1
                else:
                    found[url] = DreamlipCaptions(
                        url=url,
                        raw=r["raw"],
                        short={c: r[f"short_{c}"] for c in captioners},
                        long={c: r[f"long_{c}"] for c in captioners},
                    )
    return found
