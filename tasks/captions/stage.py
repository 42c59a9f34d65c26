"""Captions stage: DreamLIP caption CSVs -> ``annotations/captions/{shard}.parquet``.

DreamLIP (METHOD.md sec. 7) gives each image a raw caption and a short and a long
caption from each of three captioners, keyed by image URL. The CSVs are 6-30 GB
each (~30M rows for Open-30M) and an image shard's URLs are spread over all of
them, so nothing per shard may scan them. The download split fixes which URL goes
to which shard before anything is fetched (``sources/shards/*.parquet``), so
``prepare`` builds a compact URL -> shard index from those lists (sorted 64-bit
URL hashes + int32 shard ids, ~12 bytes per URL) and streams each CSV once,
writing every row into its image shard's parts under
``_work/captions/<index fingerprint>/{shard}/`` (``tasks.captions.dreamlip.partition_by_shard``).
``process(shard)`` then reads only that shard's directory and joins it with the
shard's downloaded images by exact URL. Cost: one pass over the CSVs plus one
read of each shard's own rows. A rerun reads no CSV whose partition finished
(and builds no index); a killed partition redoes only the unfinished CSVs.

Counts: per shard ``images`` (downloaded ok), ``captioned``, ``duplicate_url``
(later CSV rows of a URL; the first in CSV order wins) and ``url_hash_collision``
(a hash hit whose URL differs; dropped), failures ``no_caption``; per CSV, in the
stage summary's ``csv_counts``: ``rows``, ``malformed_row``, ``empty_url`` and
``url_not_in_lists`` (the row's URL is in no image shard).
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from storage import StageRecords, read_json, read_table, write_table
from storage.fs import join
from storage.layout import DatasetLayout
from storage.tables import CAPTIONERS
from tasks.config import CaptionsConfig
from tasks.captions.dreamlip import UrlShardIndex, partition_by_shard, read_shard_captions
from tasks.stage import ShardOutcome, Stage

READ_THREADS = 16  # URL lists read concurrently when the index is built (object stores)


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

    @property
    def section(self) -> CaptionsConfig:
        return self.config.captions

    @property
    def index_prefix(self) -> str:
        return self.layout.work_dir("captions")

    def prepare(self) -> None:
        if not self.section.dreamlip_csvs:
            raise ValueError("captions.dreamlip_csvs is empty: list the DreamLIP caption CSVs to join")
        split = split_manifest(self.layout)
        self.index = partition_by_shard(
            self.section.dreamlip_csvs,
            self.index_prefix,
            split["fingerprint"],
            lambda: url_shard_index(self.layout, split["num_shards"]),
            flush_bytes=self.section.flush_bytes,
        )

    def extra_fingerprint(self):
        return getattr(self, "index", {}).get("fingerprint")

    def list_shards(self) -> list[str]:
        return [r.shard for r in StageRecords(self.layout, "download").all() if r.done]

    def process(self, shard: str) -> ShardOutcome:
        images = read_table(self.layout.images_table(shard), columns=["key", "url", "status"]).to_pylist()
        ok = [r for r in images if r["status"] == "ok"]
        counts: Counter = Counter(images=len(ok))
        # Every URL of the shard (failed downloads too) decides what a collision is.
        found = read_shard_captions(
            self.index_prefix, self.index, shard, {r["url"] for r in images}, counts=counts
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
        return {"csv_counts": getattr(self, "index", {}).get("counts", {})}
