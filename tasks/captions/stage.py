"""Captions stage: DreamLIP caption CSVs -> ``annotations/captions/{shard}.parquet``.

DreamLIP (METHOD.md sec. 7) gives each image a raw caption and a short and a long
caption from each of three captioners, keyed by image URL. The CSVs are 6-30 GB
each (~30M rows for Open-30M) and an image shard's URLs are spread over all of
them, so nothing per shard may scan them. The download split fixes which URL goes
to which shard before anything is fetched (``sources/shards/*.parquet``), so
``prepare`` builds a compact URL -> shard index from those lists (sorted 64-bit
URL hashes + int32 shard ids, ~12 bytes per URL) and streams each CSV once,
writing every row into its image shard's parts under
``_work/captions/<index>/{shard}/`` (the format: ``storage.caption_partitions``).
``process(shard)`` then reads only that shard's directory and joins it with the
shard's downloaded images by exact URL. Cost: one pass over the CSVs plus one
read of each shard's own rows.

The partition pass follows the stage contract as one unit of its own: its
fingerprint (the download split, the reader's columns, each CSV's size and
ETag/mtime), counts, seconds and output (the manifest, with its size and checksum)
are recorded in ``_stages/captions_partition/00000.json`` after the pass, so a rerun
with the same CSVs reads none of them (and builds no index); a changed or killed
pass reads again only the CSVs whose finished part in the format does not match
their current content. Its fingerprint is part of every captions shard's, so new
caption rows redo the shards.

Counts: per shard ``images`` (downloaded ok), ``captioned``, ``duplicate_url``
(later CSV rows of a URL; the first in CSV order wins) and ``url_hash_collision``
(a hash hit whose URL differs; dropped), failures ``no_caption``; per CSV, in the
stage summary's ``csv_counts``: ``rows``, ``malformed_row``, ``oversized_row``,
``empty_url`` and ``url_not_in_lists`` (the row's URL is in no image shard).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from storage import ShardRecord, StageRecords, read_json, read_table, write_table
from storage.caption_partitions import (
    UrlShardIndex,
    file_stamp,
    manifest_url,
    partition_by_shard,
    partition_index,
    read_manifest,
    read_shard_captions,
)
from storage.integrity import file_digest
from storage.fs import join
from storage.layout import DatasetLayout
from storage.tables import CAPTIONERS
from tasks.captions.dreamlip import DEFAULT_COLUMNS, iter_dreamlip_rows
from tasks.config import CaptionsConfig, fingerprint
from tasks.stage import ShardOutcome, Stage

READ_THREADS = 16  # URL lists read concurrently when the index is built (object stores)
# The partition pass's record: a single-unit stage of its own beside the captions shards.
PARTITION_STAGE, PARTITION_UNIT = "captions_partition", "00000"


def split_manifest(layout: DatasetLayout) -> dict:
    """The download split's manifest (``sources/manifest.json``); ValueError before the split exists."""
    manifest = read_json(join(layout.root, "sources", "manifest.json"))
    if not manifest or "fingerprint" not in manifest:
        raise ValueError(
            f"{layout.root}: no sources/manifest.json; run the download stage first "
            "(its URL split decides which image shard each caption row belongs to)"
        )
    return manifest


def url_shard_index(layout: DatasetLayout, num_shards: int) -> UrlShardIndex:
    """URL -> shard index of every URL shard ``sources/shards/{i}.parquet``, ``i < num_shards``."""

    def urls(shard: int) -> tuple[int, list[str]]:
        return shard, read_table(layout.url_shard(shard), columns=["url"]).column("url").to_pylist()

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        return UrlShardIndex.from_shards(pool.map(urls, range(num_shards)))


class CaptionsStage(Stage):
    name = "captions"
    task_name = "join_captions"
    throughput_count = "images"
    upstream = ("download",)
    reads = {"download": ("table",)}  # the URLs of the shard's images, never the tar

    def output_files(self, shard: str) -> dict[str, str]:
        return {"table": self.layout.annotation("captions", shard)}

    @property
    def section(self) -> CaptionsConfig:
        return self.config.captions

    @property
    def index_prefix(self) -> str:
        return self.layout.work_dir("captions")

    def prepare(self) -> None:
        """Partition the CSVs by image shard, unless a recorded pass with this fingerprint did."""
        csvs = list(dict.fromkeys(self.section.dreamlip_csvs))
        if not csvs:
            raise ValueError("captions.dreamlip_csvs is empty: list the DreamLIP caption CSVs to join")
        split = split_manifest(self.layout)
        columns = DEFAULT_COLUMNS
        index = partition_index(split["fingerprint"], columns.required(), columns.captioners)
        records = StageRecords(self.layout, PARTITION_STAGE)
        self.partition_fingerprint = fingerprint(PARTITION_STAGE, index, [(c, file_stamp(c)) for c in csvs])
        record = records.get(PARTITION_UNIT)
        # Done: a pass with this fingerprint finished, and the manifest on storage is the one
        # it wrote (its checksum: a later pass over other CSVs rewrites the same file).
        if records.is_done(PARTITION_UNIT, self.partition_fingerprint) and not records.output_problems(record):
            self.partition = read_manifest(self.index_prefix, index)
            return
        start = time.perf_counter()
        self.partition = partition_by_shard(
            csvs, self.index_prefix, index,
            lambda: url_shard_index(self.layout, split["num_shards"]),
            lambda path, counts: iter_dreamlip_rows(path, counts=counts, columns=columns),
            captioners=columns.captioners, flush_bytes=self.section.flush_bytes,
        )
        seconds = round(time.perf_counter() - start, 3)
        manifest = manifest_url(self.index_prefix, index)
        outputs = {"manifest": {"path": self.layout.relative(manifest), **file_digest(manifest).as_dict()}}
        records.put(ShardRecord(PARTITION_UNIT, self.partition_fingerprint, self.partition["counts"], {}, seconds,
                                outputs=outputs))

    def extra_fingerprint(self):
        return self.partition_fingerprint

    def list_shards(self) -> list[str]:
        return [r.shard for r in StageRecords(self.layout, "download").all() if r.done]

    def process(self, shard: str) -> ShardOutcome:
        images = read_table(self.layout.images_table(shard), columns=["key", "url", "status"]).to_pylist()
        ok = [r for r in images if r["status"] == "success"]
        counts: Counter = Counter(images=len(ok))
        # Every URL of the shard (failed downloads too) decides what a collision is.
        found = read_shard_captions(
            self.index_prefix, self.partition, shard, {r["url"] for r in images}, counts=counts
        )
        failures: Counter = Counter()
        rows = []
        for r in ok:
            cap = found.get(r["url"])
            if cap is None:
                failures["no_caption"] += 1
                continue
            rows.append(
                {
                    "key": r["key"],
                    "url": r["url"],
                    "raw": cap.raw,
                    "short": [cap.short.get(c, "") for c in CAPTIONERS],
                    "long": [cap.long.get(c, "") for c in CAPTIONERS],
                }
            )
        counts["captioned"] = len(rows)
        write_table(self.layout.annotation("captions", shard), rows, "captions")
        return ShardOutcome(counts, failures)

    def summary_extra(self) -> dict:
        return {"csv_counts": self.partition["counts"]}
