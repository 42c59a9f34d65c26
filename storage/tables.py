"""Per-shard parquet tables with explicit pyarrow schemas (DESIGN.md, dataset layout).

One schema per table kind; ``write_table`` refuses rows that do not fit it, so a
stage bug shows up where it happens, not in a later stage's reader.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import atomic_write, open_fs

# DreamLIP captioners in the order of the short/long lists (METHOD.md sec. 7):
# InstructBLIP, ShareGPT4V, LLaVA-1.5.
CAPTIONERS = ("IB", "SV", "LLA")

_str = pa.string()
_i32 = pa.int32()
_f32 = pa.float32()

URLS = pa.schema([("index", _i32), ("url", _str), ("caption", _str), ("source", _str)])

# img2dataset's column names where they mean the same (url, key, caption, status, error_message,
# width, height, original_width, original_height, sha256), so its consumers read the table.
DOWNLOADS = pa.schema(
    [
        ("key", _str),  # empty for URLs that failed
        ("index", _i32),
        ("url", _str),
        ("source", _str),
        ("caption", _str),
        ("status", _str),  # img2dataset's: "success" | "failed_to_download" | "failed_to_resize"
        ("error_message", _str),  # our stable reason code (README, "Download failure reasons"), null on success
        ("http_status", _i32),
        ("original_width", _i32),
        ("original_height", _i32),
        ("width", _i32),
        ("height", _i32),
        ("bytes_downloaded", pa.int64()),
        ("sha256", _str),
        ("attempts", _i32),
    ]
)

CAPTIONS = pa.schema(
    [
        ("key", _str),
        ("url", _str),
        ("raw", _str),
        ("short", pa.list_(_str)),  # one per captioner, in CAPTIONERS order
        ("long", pa.list_(_str)),
    ],
    metadata={"captioners": ",".join(CAPTIONERS)},
)

PHRASES = pa.schema(
    [
        ("key", _str),
        ("phrases", pa.list_(pa.struct([("text", _str), ("sentence", _str), ("field", _str)]))),
    ]
)

BOXES = pa.schema(
    [
        ("key", _str),
        ("width", _i32),
        ("height", _i32),
        (
            "boxes",
            pa.list_(
                pa.struct(
                    [("phrase", _str), ("x0", _f32), ("y0", _f32), ("x1", _f32), ("y1", _f32), ("score", _f32)]
                )
            ),
        ),
        ("has_confident_box", pa.bool_()),  # any box scored > 0.3 (OWLv2 paper filter)
    ]
)

VQA = pa.schema(
    [
        ("key", _str),
        ("qa", pa.list_(pa.struct([("question", _str), ("answer", _str)]))),
        ("raw_output", _str),
        ("error", _str),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "urls": URLS,
    "downloads": DOWNLOADS,
    "captions": CAPTIONS,
    "phrases": PHRASES,
    "boxes": BOXES,
    "vqa": VQA,
}


def write_table(url: str, rows: list[dict] | pa.Table, kind: str) -> int:
    """Write ``rows`` atomically as parquet with the schema of ``kind``; returns the row count."""
    schema = SCHEMAS[kind]
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    if not table.schema.equals(schema, check_metadata=False):
        table = table.cast(schema)
    with atomic_write(url, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    return table.num_rows


def read_table(url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = open_fs(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)
