"""Every path and format of a GoldiCLIP dataset root (DESIGN.md, "The dataset on storage").

Imports only pyarrow, webdataset and fsspec: no Prefect, no Ray, no torch.
"""

from storage.fs import atomic_write, atomic_write_bytes, exists, join, open_fs, read_bytes, read_json, write_json
from storage.layout import DatasetLayout, shard_name
from storage.records import ShardRecord, StageRecords
from storage.shards import ShardWriter, iter_shard, make_key
from storage.tables import SCHEMAS, read_table, write_table

__all__ = [
    "SCHEMAS",
    "DatasetLayout",
    "ShardRecord",
    "ShardWriter",
    "StageRecords",
    "atomic_write",
    "atomic_write_bytes",
    "exists",
    "iter_shard",
    "join",
    "make_key",
    "open_fs",
    "read_bytes",
    "read_json",
    "read_table",
    "shard_name",
    "write_json",
    "write_table",
]
