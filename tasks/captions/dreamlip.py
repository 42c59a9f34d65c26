"""DreamLIP caption CSVs: a streaming reader with bounded records, and a URL join.

METHOD.md section 7: every image has seven DreamLIP captions (`raw_caption`, a short and
a long caption from each captioner of `storage.tables.CAPTIONERS`), keyed by the image
URL in the `Image Path` column. The released CSVs are 6-30 GB each, so nothing here
loads a whole file: rows are streamed with `csv` over an fsspec text stream (local
paths and `s3://...` alike). Partitioning the rows by image shard, for the captions
stage, is `storage.caption_partitions`.

Bad rows are counted and skipped, never raised (DESIGN.md, "tolerant of bad data"):
`malformed_row` (wrong column count, broken quoting), `oversized_row` (a record over
`max_record_chars`, 1 MiB by default, or a field over csv's default field limit of
128 KiB) and `empty_url`. A missing required column in the header is a data-format
error and raises `ValueError` before any row is read.

Bounds. Lines are read with `readline(limit)`, so one line with no end (a 30 GB file
without newlines) never sits in memory whole; a record is held to `max_record_chars`
and `max_record_lines`. csv's own field limit is process-wide state, so this reader
never changes it (an earlier version raised it, and the outcome then depended on which
module was imported first) and checks fields against csv's default itself.

Broken quoting: a field that opens a quote and never closes it makes `csv` read on
through the following lines, which would silently swallow the rest of the file. When a
record passes a bound, fails to parse, or has the wrong column count, the reader looks
for a line after its first that starts like a new row (`http://...,`; URL in the first
column, as released): if there is one, a stray quote swallowed it, so the record's
first line is dropped (`malformed_row`) and the lines from that one on are replayed;
if there is none, the record is one bad row (`oversized_row` when it passed a bound,
else `malformed_row`) and the lines up to the next row start, the rest of it, are
skipped. With the URL in another column there is no such pattern, and every line
after the bad record's first is replayed.
"""

from __future__ import annotations

import csv
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Hashable, TextIO, TypeVar

import fsspec

from storage.caption_partitions import DreamlipCaptions
from storage.tables import CAPTIONERS

K = TypeVar("K", bound=Hashable)
# csv's default field limit; the check is ours, so whatever csv.field_size_limit() the
# process has, the same fields pass.
MAX_FIELD_CHARS = 128 * 1024
_URL_FIRST_LINE = re.compile(r'"?[A-Za-z][A-Za-z0-9+.-]*://[^\s,"]*"?,')


@dataclass(frozen=True)
class DreamlipColumns:
    """Header names of the DreamLIP CSV fields; the defaults are the released files'."""

    url: str = "Image Path"
    raw: str = "raw_caption"
    short: Mapping[str, str] = field(default_factory=lambda: {c: f"short{c}_captions" for c in CAPTIONERS})
    long: Mapping[str, str] = field(default_factory=lambda: {c: f"long{c}_captions" for c in CAPTIONERS})

    def __post_init__(self) -> None:
        if list(self.short) != list(self.long):
            raise ValueError(f"short and long captioners must match: {list(self.short)} vs {list(self.long)}")

    @property
    def captioners(self) -> list[str]:
        return list(self.short)

    def required(self) -> list[str]:
        return [self.url, self.raw, *self.short.values(), *self.long.values()]


DEFAULT_COLUMNS = DreamlipColumns()


class _Unusable(Exception):
    """The record being read passed a bound (`oversized`) or could not be parsed."""

    def __init__(self, oversized: bool):
        super().__init__("oversized record" if oversized else "unparseable record")
        self.oversized = oversized


class _LineFeed:
    """Lines for `csv.reader`, at most `max_chars` per line and per record, with replay.

    A class, not a generator: raising `_Unusable` out of a generator would end it, and
    the reader must go on after a bad record. A line longer than `max_chars` is cut
    there (the rest of it is skipped unread into memory) and marked `cut`.
    """

    def __init__(self, stream: TextIO, *, max_lines: int, max_chars: int):
        self._stream = stream
        self._replay: deque[tuple[str, bool]] = deque()
        self.record: list[tuple[str, bool]] = []  # (line, cut) of the record being parsed
        self._record_chars = 0
        self._max_lines = max_lines
        self._max_chars = max_chars
        self.row_start: re.Pattern | None = None  # how a line that begins a row looks, when known
        self._skip_to_row_start = False

    def __iter__(self) -> _LineFeed:
        return self

    def _next_line(self) -> tuple[str, bool]:
        if self._replay:
            return self._replay.popleft()
        line = self._stream.readline(self._max_chars + 1)
        if not line:
            raise StopIteration
        cut = len(line) > self._max_chars and not line.endswith(("\n", "\r"))
        if cut:
            while (rest := self._stream.readline(self._max_chars)) and not rest.endswith(("\n", "\r")):
                pass
        return line, cut

    def __next__(self) -> str:
        if len(self.record) >= self._max_lines:
            raise _Unusable(oversized=True)
        line, cut = self._next_line()
        while self._skip_to_row_start and (cut or not self.row_start.match(line)):
            line, cut = self._next_line()  # the rest of a dropped record
        self._skip_to_row_start = False
        self.record.append((line, cut))
        self._record_chars += len(line)
        if cut or self._record_chars > self._max_chars:
            raise _Unusable(oversized=True)
        return line

    def start_record(self) -> None:
        self.record = []
        self._record_chars = 0

    def swallowed_row_start(self) -> int | None:
        """Index of the first line after the record's first that starts like a new row."""
        if self.row_start is None:
            return None
        return next((i for i, (line, cut) in enumerate(self.record[1:], 1)
                     if not cut and self.row_start.match(line)), None)

    def drop(self, *, oversized: bool, counts: Counter) -> None:
        """Count the record being parsed as bad and go on at the next row (see the module doc)."""
        restart = self.swallowed_row_start()
        counts["oversized_row" if oversized and restart is None else "malformed_row"] += 1
        if restart is not None:
            self._replay.extendleft(reversed(self.record[restart:]))
        elif self.row_start is not None:
            self._skip_to_row_start = True
        else:  # without a row-start pattern any later line may begin a row: try each
            self._replay.extendleft(reversed(self.record[1:]))
        self.start_record()


class _Records:
    """CSV records of `stream` (header included), bounded, with broken quoting contained.

    Iterate for records; call `reject()` right after a record turned out to have the
    wrong column count or a field over `MAX_FIELD_CHARS`.
    """

    def __init__(self, stream: TextIO, *, counts: Counter, max_record_lines: int, max_record_chars: int):
        self.feed = _LineFeed(stream, max_lines=max_record_lines, max_chars=max_record_chars)
        self._counts = counts

    def __iter__(self) -> Iterator[list[str]]:
        reader = csv.reader(self.feed)
        while True:
            self.feed.start_record()
            try:
                record = next(reader)
            except StopIteration:
                return
            except _Unusable as unusable:
                self.feed.drop(oversized=unusable.oversized, counts=self._counts)
                continue
            except csv.Error:  # csv's own field limit, if the process lowered it, lands here too
                self.feed.drop(oversized=False, counts=self._counts)
                continue
            yield record

    def reject(self, *, oversized: bool) -> None:
        self.feed.drop(oversized=oversized, counts=self._counts)


def iter_dreamlip_rows(
    path_or_url: str,
    *,
    counts: Counter,
    columns: DreamlipColumns = DEFAULT_COLUMNS,
    max_record_lines: int = 256,
    max_record_chars: int = 1 << 20,
) -> Iterator[DreamlipCaptions]:
    """Stream one DreamLIP CSV (local path or fsspec URL, compression by extension).

    Counts `rows` (yielded), `malformed_row`, `oversized_row` and `empty_url` in `counts`.
    Raises ValueError when the header lacks a required column.
    """
    with fsspec.open(path_or_url, "rt", newline="", encoding="utf-8", errors="replace", compression="infer") as f:
        parsed = _Records(f, counts=counts, max_record_lines=max_record_lines, max_record_chars=max_record_chars)
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
        # A caption's quoted newline is never followed by `scheme://...,`; a stray
        # quote that ran into the next rows is.
        parsed.feed.row_start = _URL_FIRST_LINE if url_i == 0 else None
        for record in records:
            if not record:  # blank line
                continue
            if len(record) != len(header) or parsed.feed.swallowed_row_start() is not None:
                parsed.reject(oversized=False)
                continue
            if max(map(len, record)) > MAX_FIELD_CHARS:
                parsed.reject(oversized=True)
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
    for); scanning stops once every wanted URL is found. Memory is bounded by the
    wanted set; time is O(CSV size) per call: right for a handful of URLs or a one-off
    check, never once per shard (the captions stage partitions instead).
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
