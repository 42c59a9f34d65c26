"""Stage records: which shards a stage finished, with what config, what it wrote and counted.

A shard is done when ``_stages/<stage>/<shard>.json`` exists with ``done: true``;
it is written last, after the shard's outputs are in place, so a record never
claims outputs that are missing. ``outputs`` holds each output file's path under
the root, size and checksum (``storage.integrity``), so anyone can tell whether the
files are still the ones written. A reader that finds one damaged *invalidates*
the record (``done: false`` and why, in ``invalidated``): the stage redoes the shard
on its next run. ``node`` says where the shard ran (Ray node, address, host, process).
``_stages/<stage>.json`` summarises them. Fields added later have defaults, so older
records still load.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from storage.fs import open_fs, read_json, write_json
from storage.integrity import FileDigest, file_problem
from storage.layout import DatasetLayout, shard_name


@dataclass
class ShardRecord:
    shard: str
    fingerprint: str
    counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    done: bool = True
    finished_at: float = field(default_factory=time.time)
    # name -> {"path": relative to the root, "size": bytes, "checksum": "crc32:..."}; empty in
    # records written before outputs were recorded.
    outputs: dict[str, dict] = field(default_factory=dict)
    # Why the record no longer vouches for its outputs (a damaged file found by a reader).
    invalidated: str | None = None
    # Where the shard ran: {"node_id": Ray node id or "local", "ip", "host", "pid"}; None in
    # records written before nodes were recorded.
    node: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ShardRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def output_digests(self) -> dict[str, tuple[str, FileDigest]]:
        """name -> (path under the root, recorded digest) of every recorded output."""
        return {name: (o["path"], FileDigest.from_dict(o)) for name, o in self.outputs.items()}


class StageRecords:
    """Read and write one stage's records under a dataset root."""

    def __init__(self, layout: DatasetLayout, stage: str):
        self.layout = layout
        self.stage = stage

    def get(self, shard: int | str) -> ShardRecord | None:
        d = read_json(self.layout.stage_shard_record(self.stage, shard))
        return ShardRecord.from_dict(d) if d else None

    def is_done(self, shard: int | str, fingerprint: str) -> bool:
        rec = self.get(shard)
        return rec is not None and rec.done and rec.fingerprint == fingerprint

    def put(self, record: ShardRecord) -> None:
        write_json(self.layout.stage_shard_record(self.stage, record.shard), asdict(record))

    def invalidate(self, shard: int | str, reason: str) -> None:
        """Mark a finished shard to be redone by its stage's next run, saying why."""
        rec = self.get(shard)
        if rec is not None:
            rec.done, rec.invalidated = False, reason
            self.put(rec)

    def output_problems(self, record: ShardRecord, *, checksums: bool = True) -> list[str]:
        """``"<path>: <problem>"`` for each recorded output that is missing or differs (sizes only
        without ``checksums``: one stat per file)."""
        problems = []
        for path, digest in record.output_digests().values():
            problem = file_problem(self.layout.absolute(path), digest, checksum=checksums)
            if problem:
                problems.append(f"{path}: {problem}")
        return problems

    def all(self) -> list[ShardRecord]:
        fs, path = open_fs(self.layout.stage_dir(self.stage))
        if not fs.exists(path):
            return []
        out = []
        for p in sorted(fs.ls(path, detail=False)):
            base = p.rsplit("/", 1)[-1]
            if base.endswith(".json") and base[:-5].isdigit():
                out.append(ShardRecord.from_dict(read_json(self.layout.stage_shard_record(self.stage, base[:-5]))))
        return out

    def write_summary(self, extra: dict | None = None) -> dict:
        """Aggregate every shard record into ``_stages/<stage>.json`` and return it."""
        records = self.all()
        counts: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        for r in records:
            counts.update(r.counts)
            failures.update(r.failures)
        summary = {
            "stage": self.stage,
            "num_shards_done": sum(r.done for r in records),
            "counts": dict(counts),
            "failures": dict(failures),
            "seconds": round(sum(r.seconds for r in records), 3),
            "shards": {r.shard: asdict(r) for r in records},
            "updated_at": time.time(),
            **(extra or {}),
        }
        write_json(self.layout.stage_summary(self.stage), summary)
        return summary


__all__ = ["ShardRecord", "StageRecords", "shard_name"]
