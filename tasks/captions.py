"""Captions stage: DreamLIP caption CSVs -> ``annotations/captions/{shard}.parquet``.

DreamLIP (METHOD.md sec. 7) gives each image a raw caption and a short and a long
caption from each of three captioners, keyed by image URL. The CSVs are 6-30 GB
each, so ``prepare`` streams them once into URL-hash buckets (``_work/captions``);
each image shard then reads only the buckets its URLs fall in. Per shard the
stage counts captioned samples and samples without captions; malformed CSV rows
are counted once, in the index manifest, and reported with the stage summary.
"""

from __future__ import annotations

from collections import Counter

from storage import StageRecords, read_table, write_table
from storage.tables import CAPTIONERS
from tasks.config import CaptionsConfig
from tasks.dreamlip import lookup_captions, partition_captions
from tasks.stage import ShardOutcome, Stage


class CaptionsStage(Stage):
    name = "captions"
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
        self.index = partition_captions(
            self.section.dreamlip_csvs, self.index_prefix, self.section.num_buckets, counts=Counter()
        )

    def extra_fingerprint(self):
        return getattr(self, "index", {}).get("fingerprint")

    def list_shards(self) -> list[str]:
        return [r.shard for r in StageRecords(self.layout, "download").all() if r.done]

    def process(self, shard: str) -> ShardOutcome:
        images = read_table(self.layout.images_table(shard), columns=["key", "url", "status"]).to_pylist()
        ok = [r for r in images if r["status"] == "ok"]
        found = lookup_captions(self.index_prefix, [r["url"] for r in ok])
        counts: Counter = Counter(images=len(ok))
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
