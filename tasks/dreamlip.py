"""DreamLIP caption CSVs: streaming reader, URL join and a hash-partitioned index.

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
  Memory is bounded by the wanted set; time is O(CSV size) per call. Right for one
  shard, the demo, or a wanted set that covers many shards at once.
* `partition_captions` + `lookup_captions`: one pass writes every row into
  `num_buckets` parquet files keyed by a stable hash of the URL; a lookup reads only
  the buckets its URLs hash to, filtered by `url`. The trade-off: URLs of one
  image shard are spread uniformly over the buckets, so a 5,000-URL shard touches
  `1 - exp(-5000 / num_buckets)` of them; a per-shard lookup is cheap only when
  `num_buckets` is large against the shard (or the lookup is made for many
  shards at once, which reads each bucket once for all of them). For Open-30M
  (30 GB of CSV against ~6,000 shards) the scalable order is bucket-major: for
  each bucket, look up the downloaded URLs that hash to it (`bucket_of`) across
  all shards, so the CSV bytes are read once at partition time and once more in
  total at lookup time, instead of once per shard.

Partition writes are atomic: each bucket is written under a temporary name and
renamed only after the whole CSV is through; a per-CSV `_SUCCESS.json` marks a CSV
done (a rerun skips it) and `manifest.json`, written last, is all `lookup_captions`
trusts, so a killed run leaves nothing that a reader takes for a complete bucket.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Hashable, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
# Hash-partitioned caption index


def bucket_of(url: str, num_buckets: int) -> int:
    """Stable bucket of a URL (Python's `hash` is salted per process, so not that)."""
    digest = hashlib.blake2b(url.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_buckets


def caption_schema(captioners: Iterable[str] = CAPTIONERS) -> pa.Schema:
    captioners = list(captioners)
    return pa.schema(
        [pa.field("url", pa.string(), nullable=False), pa.field("raw", pa.string())]
        + [pa.field(f"short_{c}", pa.string()) for c in captioners]
        + [pa.field(f"long_{c}", pa.string()) for c in captioners]
    )


def _bucket_name(bucket: int) -> str:
    return f"{bucket:05d}.parquet"


def _part_name(csv_path: str, fingerprint: dict) -> str:
    """Directory of one CSV's buckets: readable stem plus a hash of what built them.

    A changed CSV or setting gets a new directory, so rebuilding never touches the
    buckets that an existing manifest points to.
    """
    stem = csv_path.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0] or "csv"
    return f"{stem}-{_digest(fingerprint)}"


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


def _write_json_atomic(fs, path: str, obj) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    fs.mv(tmp, path)


def _read_json(fs, path: str):
    with fs.open(path, "r") as f:
        return json.load(f)


def _partition_one_csv(
    csv_path: str,
    fs,
    part_dir: str,
    num_buckets: int,
    *,
    columns: DreamlipColumns,
    schema: pa.Schema,
    rows_per_group: int,
    max_buffer_chars: int,
) -> Counter:
    counts: Counter = Counter()
    fs.makedirs(part_dir, exist_ok=True)
    for leftover in fs.glob(f"{part_dir}/*.tmp-*"):  # from a killed run
        fs.rm(leftover)
    token = uuid.uuid4().hex
    tmp_paths = [f"{part_dir}/{_bucket_name(b)}.tmp-{token}" for b in range(num_buckets)]
    files = [fs.open(p, "wb") for p in tmp_paths]
    writers = [pq.ParquetWriter(f, schema, compression="zstd") for f in files]
    buffers: list[list[DreamlipCaptions]] = [[] for _ in range(num_buckets)]
    buffered_chars = 0

    def flush(b: int) -> None:
        rows = buffers[b]
        if not rows:
            return
        data = {"url": [r.url for r in rows], "raw": [r.raw for r in rows]}
        for kind in ("short", "long"):
            for c in columns.short if kind == "short" else columns.long:
                data[f"{kind}_{c}"] = [getattr(r, kind)[c] for r in rows]
        writers[b].write_table(pa.Table.from_pydict(data, schema=schema))
        buffers[b] = []

    try:
        for row in iter_dreamlip_rows(csv_path, counts=counts, columns=columns):
            b = bucket_of(row.url, num_buckets)
            buffers[b].append(row)
            buffered_chars += len(row.url) + len(row.raw) + sum(map(len, row.short.values())) + sum(
                map(len, row.long.values())
            )
            if len(buffers[b]) >= rows_per_group:
                flush(b)
            if buffered_chars >= max_buffer_chars:
                for i in range(num_buckets):
                    flush(i)
                buffered_chars = 0
        for b in range(num_buckets):
            flush(b)
    finally:
        for w, f in zip(writers, files):
            w.close()
            f.close()
    for b, tmp in enumerate(tmp_paths):
        fs.mv(tmp, f"{part_dir}/{_bucket_name(b)}")
    return counts


def partition_captions(
    csv_paths: Iterable[str],
    out_url_prefix: str,
    num_buckets: int,
    counts: Counter,
    *,
    columns: DreamlipColumns = DEFAULT_COLUMNS,
    rows_per_group: int = 4096,
    max_buffer_chars: int = 256 << 20,
) -> dict:
    """Write every CSV row into `num_buckets` parquet buckets keyed by `bucket_of(url)`.

    Layout: `{prefix}/{csv stem}-{fingerprint}/{bucket:05d}.parquet` plus a
    `_SUCCESS.json` per CSV, and `{prefix}/manifest.json` (returned): `num_buckets`,
    `captioners`, `parts` (per CSV in order: csv, dir, fingerprint, counts), total
    `counts` and a `fingerprint` of the whole index. Resumable per CSV: the
    fingerprint covers the CSV's path, size and ETag/mtime, `num_buckets` and the
    column names, and a CSV whose directory has `_SUCCESS.json` is skipped.
    Memory: one open writer per bucket (so `num_buckets` is bounded by the open-file
    limit) and at most `max_buffer_chars` of buffered captions. Adds the CSV row
    counts to `counts`.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    fs, prefix = fsspec.core.url_to_fs(out_url_prefix)
    prefix = prefix.rstrip("/")
    schema = caption_schema(columns.short)
    assert list(columns.short) == list(columns.long), "short and long captioners must match"
    settings = {"num_buckets": num_buckets, "columns": columns.required()}
    parts = []
    for csv_path in csv_paths:
        fingerprint = {**settings, "csv": csv_path, "stamp": _file_stamp(csv_path)}
        part = _part_name(csv_path, fingerprint)
        part_dir = f"{prefix}/{part}"
        success = f"{part_dir}/_SUCCESS.json"
        if fs.exists(success):
            csv_counts = Counter(_read_json(fs, success)["counts"])
        else:
            csv_counts = _partition_one_csv(
                csv_path,
                fs,
                part_dir,
                num_buckets,
                columns=columns,
                schema=schema,
                rows_per_group=rows_per_group,
                max_buffer_chars=max_buffer_chars,
            )
            _write_json_atomic(fs, success, {"fingerprint": fingerprint, "counts": dict(csv_counts)})
        counts.update(csv_counts)
        parts.append({"csv": csv_path, "dir": part, "fingerprint": fingerprint, "counts": dict(csv_counts)})
    total: Counter = Counter()
    for p in parts:
        total.update(p["counts"])
    manifest = {
        "num_buckets": num_buckets,
        "captioners": list(columns.short),
        "schema": [f.name for f in schema],
        "parts": parts,
        "counts": dict(total),
        "fingerprint": _digest([p["fingerprint"] for p in parts]),
    }
    _write_json_atomic(fs, f"{prefix}/manifest.json", manifest)
    return manifest


def lookup_captions(
    bucket_prefix: str,
    urls: Iterable[str],
    *,
    counts: Counter | None = None,
    batch_size: int = 8192,
) -> dict[str, DreamlipCaptions]:
    """Captions of `urls` from a `partition_captions` index, reading only their buckets.

    Only the buckets listed in `manifest.json` are read (never a leftover temporary
    file); the first row of a URL in CSV order wins, later ones count as
    `duplicate_url` in `counts`.
    """
    fs, prefix = fsspec.core.url_to_fs(bucket_prefix)
    prefix = prefix.rstrip("/")
    manifest_path = f"{prefix}/manifest.json"
    if not fs.exists(manifest_path):
        raise ValueError(f"{bucket_prefix}: no manifest.json; run partition_captions first")
    manifest = _read_json(fs, manifest_path)
    num_buckets, captioners = manifest["num_buckets"], manifest["captioners"]
    by_bucket: dict[int, set[str]] = {}
    for url in urls:
        by_bucket.setdefault(bucket_of(url, num_buckets), set()).add(url)
    found: dict[str, DreamlipCaptions] = {}
    for bucket in sorted(by_bucket):
        value_set = pa.array(sorted(by_bucket[bucket]), pa.string())
        for part in manifest["parts"]:
            with fs.open(f"{prefix}/{part['dir']}/{_bucket_name(bucket)}", "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                    hits = batch.filter(pc.is_in(batch.column("url"), value_set=value_set))
                    for r in hits.to_pylist():
                        if r["url"] in found:
                            if counts is not None:
                                counts["duplicate_url"] += 1
                            continue
                        found[r["url"]] = DreamlipCaptions(
                            url=r["url"],
                            raw=r["raw"],
                            short={c: r[f"short_{c}"] for c in captioners},
                            long={c: r[f"long_{c}"] for c in captioners},
                        )
    return found
