"""DreamLIP caption CSVs: streaming reader, URL join, and a partition by image shard.

METHOD.md section 7: every image has seven DreamLIP captions (`raw_caption`, a short
and a long caption from each of InstructBLIP "IB", ShareGPT4V "SV" and LLaVA-1.5
"LLA"), keyed by the image URL in the `Image Path` column. The released CSVs are
6-30 GB each, so nothing here loads a whole file: rows are streamed with `csv`
over an fsspec text stream (local paths and `s3://...` alike).

Bad rows are counted and skipped, never raised (DESIGN.md, "tolerant of bad data"):
`malformed_row` (wrong column count, broken quoting, an oversized record) and
`empty_url`. A missing required column in the header is a data-format error and
raises `ValueError` before any row is read.

Broken quoting: a field that opens a quote and never closes it makes `csv` read on
through the following lines, which would silently swallow the rest of the file.
`_LineFeed` caps how many lines and characters one record may span. A record
that exceeds the cap, one that spans several lines with the wrong column count,
and (URL in the first column, as released) one with a line after its first that
starts like a new row (`http://...,`) each has its first line dropped (counted as
`malformed_row`) and the lines after it replayed, so the rows that the stray quote
swallowed are recovered.

Two ways to join captions to downloaded images:

* `join_captions`: one streaming pass over the CSVs keeping only wanted URLs.
  Memory is bounded by the wanted set; time is O(CSV size) per call. Right for a
  handful of URLs or a one-off check, never once per shard.
* `partition_by_shard` + `read_shard_captions` (the captions stage): the URL ->
  image shard assignment is fixed before anything is downloaded (the download
  split's `sources/shards/*.parquet`), so one pass over each CSV sends every row
  to the image shard its URL belongs to, through a compact `UrlShardIndex`
  (sorted 64-bit URL hashes + int32 shard ids, vectorised `np.searchsorted`);
  rows whose URL is in no shard are dropped and counted (`url_not_in_lists`).
  An image shard then reads only its own rows. Total cost for Open-30M: one pass
  over the CSVs plus one read of each shard's own rows (~5,000 rows), instead of
  a scan of all caption data per shard.

Partition writes are atomic and resumable: rows are buffered per shard in memory
and flushed as one part file per shard when a byte budget is reached (never one
open writer per shard, so thousands of shards work); each part is written under a
temporary name and renamed; parts carry their CSV's tag and a per-attempt id, and
a `_SUCCESS.json` per CSV names the attempt that finished. `manifest.json`,
written last, is what readers trust, and they read only the finished attempt of
each CSV in it, so a run killed at any point leaves nothing that a reader takes
for caption rows, and a rerun redoes only the CSVs without `_SUCCESS.json`.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import re
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Hashable, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import atomic_write, join, open_fs, read_json, write_json
from storage.layout import shard_name
from storage.tables import read_table

log = logging.getLogger(__name__)

CAPTIONERS = ("IB", "SV", "LLA")
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class DreamlipColumns:
    """Header names of the DreamLIP CSV fields; the defaults are the released files'."""

    url: str = "Image Path"
    raw: str = "raw_caption"
    short: Mapping[str, str] = field(
        default_factory=lambda: {c: f"short{c}_captions" for c in CAPTIONERS}
    )
    long: Mapping[str, str] = field(
        default_factory=lambda: {c: f"long{c}_captions" for c in CAPTIONERS}
    )

    def required(self) -> list[str]:
        return [self.url, self.raw, *self.short.values(), *self.long.values()]


DEFAULT_COLUMNS = DreamlipColumns()


@dataclass(frozen=True)
class DreamlipCaptions:
    url: str
    raw: str
    short: dict[str, str]  # captioner ("IB", "SV", "LLA") -> caption
    long: dict[str, str]


class _RecordTooLong(Exception):
    pass


class _LineFeed:
    """Line iterator for `csv.reader` that bounds one record and can replay lines.

    A class, not a generator: raising `_RecordTooLong` out of a generator would end
    it, and the reader must go on after a bad record.
    """

    def __init__(self, lines: Iterable[str], *, max_record_lines: int, max_record_chars: int):
        self._lines = iter(lines)
        self._replay: deque[str] = deque()
        self.record: list[str] = []  # lines of the record being parsed
        self._record_chars = 0
        self._max_lines = max_record_lines
        self._max_chars = max_record_chars

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        if len(self.record) >= self._max_lines or self._record_chars >= self._max_chars:
            raise _RecordTooLong
        line = self._replay.popleft() if self._replay else next(self._lines)
        self.record.append(line)
        self._record_chars += len(line)
        return line

    def start_record(self) -> None:
        self.record = []
        self._record_chars = 0

    def drop_first_line_and_replay(self) -> None:
        self._replay.extendleft(reversed(self.record[1:]))
        self.start_record()


_URL_FIRST_LINE = re.compile(r'"?[A-Za-z][A-Za-z0-9+.-]*://[^\s,"]*"?,')


class _Records:
    """CSV records of `lines` (header included), with broken quoting contained.

    Iterate for records; call `reject()` right after a record turned out to have
    the wrong column count: when it spans several lines (a stray quote swallowed
    the lines after it) its first line is dropped and the rest replayed.
    """

    def __init__(self, lines: Iterable[str], *, counts: Counter, max_record_lines: int, max_record_chars: int):
        csv.field_size_limit(max(csv.field_size_limit(), max_record_chars + 1))
        self._feed = _LineFeed(lines, max_record_lines=max_record_lines, max_record_chars=max_record_chars)
        self._counts = counts

    def __iter__(self) -> Iterator[list[str]]:
        reader = csv.reader(self._feed)
        while True:
            self._feed.start_record()
            try:
                record = next(reader)
            except StopIteration:
                return
            except (_RecordTooLong, csv.Error):
                self._counts["malformed_row"] += 1
                self._feed.drop_first_line_and_replay()
                continue
            yield record

    def reject(self) -> None:
        if len(self._feed.record) > 1:
            self._feed.drop_first_line_and_replay()

    def swallowed_a_record_start(self) -> bool:
        """Whether a line after the first of the last record begins like a new row.

        Only meaningful when the URL is the first column: a caption's quoted newline
        is never followed by `scheme://...,`, a stray quote that ran into the next
        rows is.
        """
        return any(_URL_FIRST_LINE.match(line) for line in self._feed.record[1:])


def iter_dreamlip_rows(
    path_or_url: str,
    *,
    counts: Counter,
    columns: DreamlipColumns = DEFAULT_COLUMNS,
    max_record_lines: int = 256,
    max_record_chars: int = 1 << 20,
) -> Iterator[DreamlipCaptions]:
    """Stream one DreamLIP CSV (local path or fsspec URL, compression by extension).

    Counts `rows` (yielded), `malformed_row` and `empty_url` in `counts`.
    Raises ValueError when the header lacks a required column.
    """
    with fsspec.open(path_or_url, "rt", newline="", encoding="utf-8", errors="replace", compression="infer") as f:
        parsed = _Records(
            f, counts=counts, max_record_lines=max_record_lines, max_record_chars=max_record_chars
        )
        records = iter(parsed)
        header = next(records, None)
        if header is None:
            raise ValueError(f"{path_or_url}: empty file, expected a DreamLIP CSV header")
        if header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]
        index = {name: i for i, name in enumerate(header)}
        missing = [name for name in columns.required() if name not in index]
        if missing:
            raise ValueError(
                f"{path_or_url}: DreamLIP CSV lacks required column(s) {missing}; header is {header}"
            )
        url_i, raw_i = index[columns.url], index[columns.raw]
        short_i = {c: index[name] for c, name in columns.short.items()}
        long_i = {c: index[name] for c, name in columns.long.items()}
        for record in records:
            if not record:  # blank line
                continue
            if len(record) != len(header) or (url_i == 0 and parsed.swallowed_a_record_start()):
                counts["malformed_row"] += 1
                parsed.reject()
                continue
            url = record[url_i].strip()
            if not url:
                counts["empty_url"] += 1
                continue
            counts["rows"] += 1
            yield DreamlipCaptions(
                url=url,
                raw=record[raw_i],
                short={c: record[i] for c, i in short_i.items()},
                long={c: record[i] for c, i in long_i.items()},
            )


def join_captions(
    csv_paths: Iterable[str],
    wanted_urls: set[str] | Mapping[str, K],
    *,
    counts: Counter,
    columns: DreamlipColumns = DEFAULT_COLUMNS,
) -> dict[K | str, DreamlipCaptions]:
    """Captions of the wanted URLs in one streaming pass over `csv_paths`.

    `wanted_urls` is a set of URLs (result keyed by URL) or a mapping URL -> key
    (result keyed by that key, e.g. the sample key). The first row of a URL wins
    (`duplicate_url` counts later ones only while the URL is still being scanned
    for); scanning stops once every wanted URL is found.
    """
    key_of = wanted_urls if isinstance(wanted_urls, Mapping) else {u: u for u in wanted_urls}
    found: dict[K | str, DreamlipCaptions] = {}
    for path in csv_paths:
        for row in iter_dreamlip_rows(path, counts=counts, columns=columns):
            if row.url not in key_of:
                continue
            key = key_of[row.url]
            if key in found:
                counts["duplicate_url"] += 1
                continue
            found[key] = row
            if len(found) == len(key_of):
                return found
    return found


# ---------------------------------------------------------------------------
# Caption rows partitioned by image shard

INDEX_VERSION = 1  # bump when the partition layout or the part schema changes
CHUNK_ROWS = 20_000  # CSV rows hashed and assigned to shards at once
WRITE_THREADS = 8  # parts written concurrently at a flush (object stores are latency-bound)


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


def _file_stamp(url: str) -> dict:
    """What identifies a CSV's content cheaply: size plus ETag or mtime when the fs has one."""
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    stamp = {"size": info.get("size")}
    for k in ("ETag", "etag", "mtime", "LastModified", "last_modified"):
        if k in info:
            stamp[k] = str(info[k])
    return stamp


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
    root: str,
    prefix: str,
    url_index: UrlShardIndex,
    *,
    columns: DreamlipColumns,
    schema: pa.Schema,
    flush_bytes: int,
    chunk_rows: int,
    write_threads: int,
) -> tuple[Counter, int]:
    counts: Counter = Counter()
    buffers = _ShardBuffers(root, prefix, flush_bytes, write_threads)
    short, long = list(columns.short), list(columns.long)

    def push(rows: list[DreamlipCaptions]) -> None:
        ids = url_index.shard_of(url_hashes(r.url for r in rows))
        kept = np.flatnonzero(ids >= 0)
        if len(kept) < len(rows):
            counts["url_not_in_lists"] += len(rows) - len(kept)
        if not len(kept):
            return
        order = kept[np.argsort(ids[kept], kind="stable")].tolist()
        picked = [rows[i] for i in order]
        data = {"url": [r.url for r in picked], "raw": [r.raw for r in picked]}
        for c in short:
            data[f"short_{c}"] = [r.short[c] for r in picked]
        for c in long:
            data[f"long_{c}"] = [r.long[c] for r in picked]
        buffers.add(pa.Table.from_pydict(data, schema=schema), ids[order])

    rows: list[DreamlipCaptions] = []
    for row in iter_dreamlip_rows(csv_path, counts=counts, columns=columns):
        rows.append(row)
        if len(rows) >= chunk_rows:
            push(rows)
            rows = []
    if rows:
        push(rows)
    buffers.flush()
    return counts, buffers.parts


def _remove_parts(root: str, tag: str) -> None:
    """Delete parts (and temporaries) a killed run left for CSV `tag`; they are never read anyway."""
    fs, path = open_fs(root)
    if not fs.exists(path):
        return
    for leftover in fs.glob(f"{path}/*/{_part_prefix(tag, '*')}*"):
        with contextlib.suppress(FileNotFoundError):
            fs.rm(leftover)


def index_dir(out_url: str, manifest: dict) -> str:
    """Directory of one partition (`{out_url}/{index fingerprint}`)."""
    return join(out_url, manifest["index"])


def partition_by_shard(
    csv_paths: Iterable[str],
    out_url: str,
    split_fingerprint: str,
    load_url_index: Callable[[], UrlShardIndex],
    *,
    columns: DreamlipColumns = DEFAULT_COLUMNS,
    flush_bytes: int = 1 << 30,
    chunk_rows: int = CHUNK_ROWS,
    write_threads: int = WRITE_THREADS,
) -> dict:
    """Write every CSV row whose URL is in an image shard into that shard's parts; one pass per CSV.

    Layout under `{out_url}/{index}/` (`index` hashes `split_fingerprint`, the
    download split's, and the column names, so a new split never mixes with an old one):
    `{shard:05d}/part-{csv tag}-{attempt}-{flush:06d}.parquet` (`caption_schema`,
    CSV order), `_csvs/{csv tag}/_SUCCESS.json` per finished CSV (attempt, counts)
    and `manifest.json`, written last and returned: `index`, `captioners`, `csvs`
    (each CSV's `_SUCCESS` content, in configured order), total `counts`, and a
    `fingerprint` covering the index and every CSV's path, size and ETag/mtime.

    Resume: a CSV with a matching `_SUCCESS.json` is not read again, and
    `load_url_index` is called only when some CSV needs reading. A killed CSV is
    redone under a new attempt id; readers take only the attempt named in its
    `_SUCCESS.json`, so parts of the killed attempt (deleted here, best effort) and
    temporary files are never read. Memory: the URL index plus `flush_bytes` of
    buffered caption rows (Arrow bytes) plus one chunk of `chunk_rows` rows.
    Counts per CSV: `rows`, `malformed_row`, `empty_url` (`iter_dreamlip_rows`) and
    `url_not_in_lists` (dropped: the URL is in no image shard).
    """
    if flush_bytes < 1 or chunk_rows < 1:
        raise ValueError(f"flush_bytes and chunk_rows must be >= 1, got {flush_bytes}, {chunk_rows}")
    if list(columns.short) != list(columns.long):
        raise ValueError("short and long captioners must match")
    schema = caption_schema(columns.short)
    index = _digest(
        {"version": INDEX_VERSION, "split": split_fingerprint, "columns": columns.required(),
         "captioners": list(columns.short)}
    )
    root = join(out_url, index)
    url_index: UrlShardIndex | None = None
    entries = []
    for csv_path in dict.fromkeys(csv_paths):  # a CSV listed twice is read once
        fingerprint = {"csv": csv_path, "stamp": _file_stamp(csv_path), "index": index}
        tag = _csv_tag(csv_path, fingerprint)
        success = join(root, "_csvs", tag, "_SUCCESS.json")
        entry = read_json(success)
        if not entry or entry.get("fingerprint") != fingerprint:
            if url_index is None:
                url_index = load_url_index()
            _remove_parts(root, tag)
            attempt = uuid.uuid4().hex[:12]
            counts, parts = _partition_one_csv(
                csv_path, root, _part_prefix(tag, attempt), url_index,
                columns=columns, schema=schema, flush_bytes=flush_bytes,
                chunk_rows=chunk_rows, write_threads=write_threads,
            )
            entry = {"csv": csv_path, "tag": tag, "attempt": attempt, "fingerprint": fingerprint,
                     "counts": dict(counts), "parts": parts}
            write_json(success, entry)
        entries.append(entry)
    total: Counter = Counter()
    for e in entries:
        total.update(e["counts"])
    manifest = {
        "index": index,
        "version": INDEX_VERSION,
        "captioners": list(columns.short),
        "csvs": entries,
        "counts": dict(total),
        "fingerprint": _digest([index] + [e["fingerprint"] for e in entries]),
    }
    write_json(join(root, "manifest.json"), manifest)
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
