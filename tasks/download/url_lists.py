"""Streaming readers of the Open-30M URL lists (METHOD.md section 7, DESIGN.md "download").

The download stage reads four real list formats:

- ``cc3m``: ``Train_GCC-training.tsv``, ``caption<TAB>url``, no header;
- ``cc12m``: ``cc12m.tsv``, ``url<TAB>caption``, no header;
- ``yfcc15m``: CSV/TSV or parquet with a URL column (``url``, ``downloadurl``, ...);
- ``dreamlip``: DreamLIP's caption CSVs, ``Image Path`` is the URL, ``raw_caption``
  the alt-text, and quoted fields may hold newlines.

Every reader streams (the lists hold millions of rows, DreamLIP's CSVs are 6-30 GB)
and opens its input through fsspec, so local paths, ``s3://`` and compressed files
(``.gz``, ``.bz2``, ... inferred from the name) all work. A bad row is counted in
``counts`` under its reason and skipped; only a file that cannot be the named format
at all (no URL column) raises ``ValueError``.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec

FORMATS = ("cc3m", "cc12m", "yfcc15m", "dreamlip")

# "scheme://something" with no whitespace, or with inner spaces: lists carry URLs with raw
# spaces, and the fetcher quotes them (as a browser does) while the row keeps the URL as
# listed, the key the DreamLIP captions are joined on. A row's URL is its first field that
# is an http(s) URL without spaces, then any scheme's, then one with spaces.
_URL_PATTERNS = tuple(
    re.compile(rf"^{scheme}://\S+{spaces}$", re.IGNORECASE)
    for spaces in ("", r"(?: +\S+)*")
    for scheme in ("https?", "[a-z][a-z0-9+.-]*")
)

# YFCC15M lists come from several re-releases with different column names.
_YFCC_URL_COLUMNS = ("url", "downloadurl", "download_url", "photo_url", "photourl", "image_url")

_DREAMLIP_URL_COLUMN = "Image Path"
_DREAMLIP_CAPTION_COLUMN = "raw_caption"

_PARQUET_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class UrlRecord:
    url: str
    caption: str | None
    source: str


def read_url_list(path_or_url: str, fmt: str, source: str, *, counts: Counter) -> Iterator[UrlRecord]:
    """Stream the records of one URL list; bad rows are counted by reason and skipped."""
    if fmt in ("cc3m", "cc12m"):
        return _read_two_column_tsv(path_or_url, source, counts)
    if fmt == "yfcc15m":
        if _is_parquet(path_or_url):
            return _read_yfcc_parquet(path_or_url, source, counts)
        return _read_yfcc_csv(path_or_url, source, counts)
    if fmt == "dreamlip":
        return _read_dreamlip_csv(path_or_url, source, counts)
    raise ValueError(f"unknown URL list format {fmt!r}; expected one of {FORMATS}")


def dedupe_urls(records: Iterable[UrlRecord], counts: Counter) -> Iterator[UrlRecord]:
    """Drop records whose URL was already seen (first one wins).

    Remembers a 64-bit hash per URL rather than the URL: at 30M URLs that is
    about 1.5 GB instead of several; a false duplicate needs a 64-bit collision
    (about 2e-5 expected over 30M URLs).
    """
    seen: set[int] = set()
    for record in records:
        digest = int.from_bytes(hashlib.blake2b(record.url.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        if digest in seen:
            counts["duplicate_url"] += 1
            continue
        seen.add(digest)
        yield record


def shard_records(records: Iterable[UrlRecord], shard_size: int) -> Iterator[list[UrlRecord]]:
    """Group records into consecutive lists of ``shard_size`` (the last may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shard: list[UrlRecord] = []
    for record in records:
        shard.append(record)
        if len(shard) == shard_size:
            yield shard
            shard = []
    if shard:
        yield shard


def _open_text(path_or_url: str, newline: str):
    # errors="replace" keeps one badly encoded caption from failing a whole list.
    return fsspec.open(path_or_url, "rt", compression="infer", encoding="utf-8", errors="replace", newline=newline)


def _is_parquet(path_or_url: str) -> bool:
    return path_or_url.lower().rstrip("/").endswith((".parquet", ".pq"))


def _url_index(fields: list[str]) -> int | None:
    """Index of the field that is the row's URL (see ``_URL_PATTERNS``), or None."""
    for pattern in _URL_PATTERNS:
        for i, field in enumerate(fields):
            if pattern.match(field):
                return i
    return None


def _looks_like_url(field: str) -> bool:
    return _url_index([field]) is not None


def _caption_or_none(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return text or None


def _read_two_column_tsv(path_or_url: str, source: str, counts: Counter) -> Iterator[UrlRecord]:
    # CC3M is caption<TAB>url and CC12M url<TAB>caption; rather than trust the name,
    # each row's URL is the field that looks like one (http(s) first).
    # Rows end at "\n" only: a stray "\r" inside a caption must not split its row.
    with _open_text(path_or_url, newline="\n") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                counts["empty_line"] += 1
                continue
            fields = [field.strip() for field in line.split("\t")]
            if len(fields) < 2:
                counts["missing_column"] += 1
                continue
            url_index = _url_index(fields)
            if url_index is None:
                if {field.lower() for field in fields} & {"url", "caption"}:
                    counts["header"] += 1
                else:
                    counts["no_url"] += 1
                continue
            caption = next((field for i, field in enumerate(fields) if i != url_index and field), None)
            yield UrlRecord(url=fields[url_index], caption=caption, source=source)


def _pick_column(names: list[str], candidates: tuple[str, ...]) -> str | None:
    by_lower = {name.strip().lower(): name for name in names}
    return next((by_lower[c] for c in candidates if c in by_lower), None)


def _yfcc_columns(names: list[str], path_or_url: str) -> tuple[str, list[str]]:
    url_column = _pick_column(names, _YFCC_URL_COLUMNS)
    if url_column is None:
        raise ValueError(
            f"{path_or_url}: no URL column among {names}; expected one of {_YFCC_URL_COLUMNS}"
        )
    caption = _pick_column(names, ("caption",))
    if caption is not None:
        return url_column, [caption]
    # Without a caption column, YFCC's own metadata has a title and a description.
    title, description = _pick_column(names, ("title",)), _pick_column(names, ("description",))
    return url_column, [c for c in (title, description) if c is not None]


def _yfcc_record(url: str | None, caption_parts: list[str | None], source: str, counts: Counter) -> UrlRecord | None:
    url = (url or "").strip()
    if not url:
        counts["no_url"] += 1
        return None
    if not _looks_like_url(url):
        counts["no_url"] += 1
        return None
    parts = [p for p in (_caption_or_none(part) for part in caption_parts) if p]
    return UrlRecord(url=url, caption=". ".join(parts) if parts else None, source=source)


def _read_yfcc_csv(path_or_url: str, source: str, counts: Counter) -> Iterator[UrlRecord]:
    delimiter = "\t" if ".tsv" in path_or_url.lower() else ","
    with _open_text(path_or_url, newline="") as f:  # csv handles quoted newlines itself
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        url_column, caption_columns = _yfcc_columns(header, path_or_url)
        url_i = header.index(url_column)
        caption_is = [header.index(c) for c in caption_columns]
        needed = max([url_i, *caption_is]) + 1
        for row in _csv_rows(reader, counts):
            if len(row) < needed:
                counts["missing_column"] += 1
                continue
            record = _yfcc_record(row[url_i], [row[i] for i in caption_is], source, counts)
            if record is not None:
                yield record


def _read_yfcc_parquet(path_or_url: str, source: str, counts: Counter) -> Iterator[UrlRecord]:
    import pyarrow.parquet as pq

    with fsspec.open(path_or_url, "rb") as f:
        parquet = pq.ParquetFile(f)
        url_column, caption_columns = _yfcc_columns(parquet.schema_arrow.names, path_or_url)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[url_column, *caption_columns]):
            urls = batch.column(url_column).to_pylist()
            captions = [batch.column(c).to_pylist() for c in caption_columns]
            for i, url in enumerate(urls):
                record = _yfcc_record(url, [column[i] for column in captions], source, counts)
                if record is not None:
                    yield record


def _read_dreamlip_csv(path_or_url: str, source: str, counts: Counter) -> Iterator[UrlRecord]:
    with _open_text(path_or_url, newline="") as f:  # csv handles quoted newlines itself
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        if _DREAMLIP_URL_COLUMN not in header:
            raise ValueError(f"{path_or_url}: not a DreamLIP CSV, no {_DREAMLIP_URL_COLUMN!r} column in {header}")
        url_i = header.index(_DREAMLIP_URL_COLUMN)
        caption_i = header.index(_DREAMLIP_CAPTION_COLUMN) if _DREAMLIP_CAPTION_COLUMN in header else None
        for row in _csv_rows(reader, counts):
            # Too few fields is a cut row; too many means a stray quote merged rows.
            if len(row) < len(header):
                counts["missing_column"] += 1
                continue
            if len(row) > len(header):
                counts["malformed_row"] += 1
                continue
            url = row[url_i].strip()
            if not _looks_like_url(url):
                counts["no_url"] += 1
                continue
            caption = _caption_or_none(row[caption_i]) if caption_i is not None else None
            yield UrlRecord(url=url, caption=caption, source=source)


def _csv_rows(reader, counts: Counter) -> Iterator[list[str]]:
    """csv rows with empty lines and unparseable rows counted, not raised."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            counts["malformed_row"] += 1
            continue
        if not row or all(not field.strip() for field in row):
            counts["empty_line"] += 1
            continue
        yield row
