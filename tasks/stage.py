"""The stage contract (DESIGN.md) as one small base class every stage shares.

A stage lists its shards, fingerprints each (its config section + its inputs'
records), skips shards already done with the same fingerprint, processes the
rest, writes outputs atomically, and records counts, failures by reason and
seconds per shard. Orchestration (Prefect tasks, concurrency, artifacts) lives
in ``pipelines/``; everything here runs and is tested without Prefect.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from storage import DatasetLayout, ShardRecord, StageRecords
from tasks.config import PipelineConfig, Section, fingerprint


@dataclass
class ShardOutcome:
    """What ``Stage.process`` returns: counts of what it did, failures by reason."""

    counts: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)


@dataclass
class ShardResult:
    shard: str
    skipped: bool
    counts: dict[str, int]
    failures: dict[str, int]
    seconds: float


class Stage(ABC):
    """One stage of the pipeline over the shards of a dataset root."""

    name: str
    # The Prefect task run per shard, verb_noun (``download_shard``, ``detect_boxes``), so the
    # UI and the logs say what ran.
    task_name: str
    # Stages whose per-shard records feed this stage's fingerprint.
    upstream: tuple[str, ...] = ()
    # The count whose rate (per second) the orchestrator reports, e.g. "images".
    throughput_count: str | None = None

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.layout = DatasetLayout(config.dataset.root)
        self.records = StageRecords(self.layout, self.name)

    @property
    @abstractmethod
    def section(self) -> Section:
        """This stage's config section (its fingerprinted part decides what is redone)."""

    @property
    def parallel_shards(self) -> int:
        """How many shards the orchestrator runs at once."""
        return getattr(self.section, "parallel_shards", 1)

    def prepare(self) -> None:
        """Work done once per run before the shards (validate inputs, build an index)."""

    @abstractmethod
    def list_shards(self) -> list[str]:
        """Names (``00000``...) of the shards this stage would produce."""

    @abstractmethod
    def process(self, shard: str) -> ShardOutcome:
        """Produce every output of ``shard`` atomically; count, never raise, on bad data."""

    def extra_fingerprint(self) -> Any:
        """Anything besides the config section and upstream records that decides the output."""
        return None

    def fingerprint(self, shard: str) -> str:
        upstream = {}
        for stage in self.upstream:
            rec = StageRecords(self.layout, stage).get(shard)
            upstream[stage] = rec.fingerprint if rec else None
        return fingerprint(self.name, self.section.fingerprint_payload(), upstream, self.extra_fingerprint())

    def run_shard(self, shard: str, *, force: bool = False) -> ShardResult:
        fp = self.fingerprint(shard)
        if not force and self.records.is_done(shard, fp):
            rec = self.records.get(shard)
            return ShardResult(shard, True, rec.counts, rec.failures, rec.seconds)
        start = time.perf_counter()
        outcome = self.process(shard)
        seconds = round(time.perf_counter() - start, 3)
        # The record is written last: it only ever claims outputs already in place.
        self.records.put(ShardRecord(shard, fp, dict(outcome.counts), dict(outcome.failures), seconds))
        return ShardResult(shard, False, dict(outcome.counts), dict(outcome.failures), seconds)

    def pending(self, *, force: bool = False) -> list[str]:
        shards = self.list_shards()
        return shards if force else [s for s in shards if not self.records.is_done(s, self.fingerprint(s))]

    def summary_extra(self) -> dict:
        """Stage-level facts for ``_stages/<stage>.json`` besides the per-shard records."""
        return {}

    def summarize(self, results: list[ShardResult], extra: dict | None = None) -> dict:
        """Write ``_stages/<stage>.json`` and return it with this run's skip/process split.

        ``extra``: facts only the orchestrator knows (e.g. the Ray actors that ran the shards).
        """
        last_run = {
            "processed": sorted(r.shard for r in results if not r.skipped),
            "skipped": sorted(r.shard for r in results if r.skipped),
        }
        return self.records.write_summary({"last_run": last_run, **self.summary_extra(), **(extra or {})})


def run_stage(stage: Stage, *, force: bool = False) -> dict:
    """Run every shard in this process, one after another (tests, debugging)."""
    stage.prepare()
    results = [stage.run_shard(s, force=force) for s in stage.list_shards()]
    return stage.summarize(results)
