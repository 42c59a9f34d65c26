"""Download stage: URL lists -> ``images/{shard}.tar`` + ``images/{shard}.parquet``.

Open-30M (METHOD.md sec. 7) is CC3M + CC12M + YFCC15M URL lists. ``prepare``
streams every list once, drops duplicate URLs and splits the rest into URL
shards of ``shard_size`` (``sources/shards/{shard}.parquet``); a manifest written
last makes the split idempotent. Each shard is then fetched in a worker process
(async HTTP with bounded concurrency inside it, ``processes`` of them per
machine), and the worker writes the tar and the table of every URL tried (its
status, failure reason and number of requests). A worker that dies mid-shard (the
OOM killer) costs only that shard, which runs again on a fresh process
(``tasks/worker_pool.py``) and counts ``worker_died``.
"""

from __future__ import annotations

import functools
from collections import Counter

from storage import DatasetLayout, ShardWriter, make_key, read_json, read_table, write_json, write_table
from storage.fs import join
from tasks.config import DownloadConfig, PipelineConfig, fingerprint
from tasks.download.fetch import fetch_shard
from tasks.download.url_lists import UrlRecord, dedupe_urls, read_url_list, shard_records
from tasks.stage import ShardOutcome, Stage
from tasks.worker_pool import WorkerPool, shared_pool


def split_sources(config: PipelineConfig) -> dict:
    """Stream the URL lists into URL shards; returns (and writes last) the manifest.

    Deterministic: the same lists and shard size always give the same shards, so a
    split killed midway is simply redone.
    """
    layout = DatasetLayout(config.dataset.root)
    sources = [s.model_dump(mode="json") for s in config.sources]
    split_fp = fingerprint(sources, config.download.shard_size)
    manifest_url = join(layout.root, "sources", "manifest.json")
    manifest = read_json(manifest_url)
    if manifest and manifest.get("fingerprint") == split_fp:
        return manifest
    if not config.sources:
        raise ValueError("config has no sources: add at least one URL list under `sources:`")

    counts: Counter = Counter()
    per_source: Counter = Counter()

    def records():
        for src in config.sources:
            taken = 0
            for path in src.paths:
                for rec in read_url_list(path, src.format, src.name, counts=counts):
                    if src.max_urls is not None and taken >= src.max_urls:
                        break
                    taken += 1
                    per_source[src.name] += 1
                    yield rec

    num_shards = 0
    for shard_id, batch in enumerate(shard_records(dedupe_urls(records(), counts), config.download.shard_size)):
        rows = [{"index": i, "url": r.url, "caption": r.caption, "source": r.source} for i, r in enumerate(batch)]
        write_table(layout.url_shard(shard_id), rows, "urls")
        num_shards += 1
    manifest = {
        "fingerprint": split_fp,
        "num_shards": num_shards,
        "urls_per_source": dict(per_source),
        "list_counts": dict(counts),
    }
    write_json(manifest_url, manifest)
    return manifest


# Reasons that are about the image rather than the transfer: img2dataset's "failed_to_resize".
IMAGE_REASONS = frozenset({"not_an_image", "decode_error", "image_too_small", "too_many_pixels"})


def img2dataset_status(status: str, error: str | None) -> str:
    if status == "ok":
        return "success"
    return "failed_to_resize" if error in IMAGE_REASONS else "failed_to_download"


def download_shard(root: str, shard: str, cfg: DownloadConfig) -> tuple[dict, dict]:
    """Fetch one URL shard and write its tar and table. Runs inside a worker process.

    The tar holds ``<key>.jpg``, ``<key>.txt`` (the source caption) and ``<key>.json`` as
    img2dataset writes them, so open_clip's webdataset loader reads image-text pairs from it.
    """
    layout = DatasetLayout(root)
    urls = read_table(layout.url_shard(shard)).to_pylist()
    results = fetch_shard([u["url"] for u in urls], cfg)
    counts: Counter = Counter(urls=len(urls))
    failures: Counter = Counter()
    rows = []
    with ShardWriter(layout.images_tar(shard)) as tar:
        for u, res in zip(urls, results, strict=True):
            key = make_key(shard, u["index"]) if res.status == "ok" else None
            row = {
                "key": key,
                "index": u["index"],
                "url": u["url"],
                "source": u["source"],
                "caption": u["caption"],
                "status": img2dataset_status(res.status, res.error),
                "error_message": res.error,
                "http_status": res.http_status,
                "original_width": res.orig_width,
                "original_height": res.orig_height,
                "width": res.width,
                "height": res.height,
                "bytes_downloaded": res.bytes_downloaded,
                "sha256": res.sha256,
                "attempts": res.attempts,
            }
            if key is not None:
                meta = {k: row[k] for k in ("key", "url", "source", "caption", "status", "error_message", "width",
                                            "height", "original_width", "original_height", "sha256")}
                tar.write(key, {"jpg": res.jpeg, "txt": (u["caption"] or "").encode(), "json": meta})
                counts["ok"] += 1
            else:
                failures[res.error] += 1
                counts["failed"] += 1
            if res.retry_after:  # waits a server asked for (429/503 with Retry-After)
                counts["retry_after"] += res.retry_after
            rows.append(row)
    # The table is written after the tar: a shard with a table has a complete tar.
    write_table(layout.images_table(shard), rows, "downloads")
    return dict(counts), dict(failures)


class DownloadStage(Stage):
    name = "download"
    task_name = "download_shard"
    code_version = 2  # 2: img2dataset's field names, <key>.txt in the tars
    throughput_count = "urls"

    def output_files(self, shard: str) -> dict[str, str]:
        return {"tar": self.layout.images_tar(shard), "table": self.layout.images_table(shard)}

    @property
    def section(self) -> DownloadConfig:
        return self.config.download

    @property
    def parallel_shards(self) -> int:
        return self.section.processes

    @functools.cached_property
    def manifest(self) -> dict:
        return split_sources(self.config)

    def prepare(self) -> None:
        self.manifest  # noqa: B018 - splits the URL lists once, before any shard

    def extra_fingerprint(self):
        return self.manifest["fingerprint"]

    def summary_extra(self) -> dict:
        return {"url_lists": self.manifest}

    def list_shards(self) -> list[str]:
        return [f"{i:05d}" for i in range(self.manifest["num_shards"])]

    def process(self, shard: str) -> ShardOutcome:
        size = self.section.processes
        pool = shared_pool("download", size, lambda: WorkerPool(size))
        (counts, failures), deaths = pool.run(download_shard, self.layout.root, shard, self.section)
        counts = Counter(counts)
        if deaths:
            counts["worker_died"] = deaths
        return ShardOutcome(counts, Counter(failures))


__all__ = ["DownloadStage", "UrlRecord", "download_shard", "split_sources"]
