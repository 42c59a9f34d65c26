"""``goldiclip verify``: every finished shard's output files against its record, redoing nothing.

Each shard record holds the path, size and checksum of every file the shard wrote
(``storage.records``); this reads every such file in full and lists what is missing,
cut short or changed, and the shards a reader already marked to be redone. A run of
the stage redoes a shard whose output is missing or the wrong size by itself (its skip
check stats its outputs); a same-size corruption is only found by a full read like
this one, so ``mark`` invalidates the damaged records for the stages' next runs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from storage import DatasetLayout, ShardRecord, StageRecords, open_fs
from tasks.overview import STAGE_ORDER

# Files checked at once: reading is I/O-bound and zlib's CRC-32 releases the GIL.
VERIFY_THREADS = 8


@dataclass
class Damage:
    stage: str
    shard: str
    problems: list[str]


@dataclass
class VerifyReport:
    checked: dict[str, int] = field(default_factory=dict)  # stage -> finished shards checked
    unverifiable: dict[str, int] = field(default_factory=dict)  # stage -> records without outputs
    damaged: list[Damage] = field(default_factory=list)


def stages_on_root(layout: DatasetLayout) -> list[str]:
    """The stages with records under the root, in DAG order."""
    fs, path = open_fs(f"{layout.root}/_stages")
    if not fs.exists(path):
        return []
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p)}
    return [s for s in STAGE_ORDER if s in names] + sorted(names - set(STAGE_ORDER))


def verify_root(layout: DatasetLayout, stages: list[str], *, mark: bool = False) -> VerifyReport:
    """Check every record of ``stages``; with ``mark``, invalidate each damaged one."""
    report = VerifyReport()
    for stage in stages:
        records = StageRecords(layout, stage)
        finished: list[ShardRecord] = []
        for rec in records.all():
            if not rec.done:
                if rec.invalidated:
                    report.damaged.append(Damage(stage, rec.shard, [f"marked to be redone: {rec.invalidated}"]))
            elif not rec.outputs:
                report.unverifiable[stage] = report.unverifiable.get(stage, 0) + 1
            else:
                finished.append(rec)
        with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
            problems = list(pool.map(records.output_problems, finished))
        report.checked[stage] = len(finished)
        for rec, found in zip(finished, problems, strict=True):
            if found:
                report.damaged.append(Damage(stage, rec.shard, found))
                if mark:
                    records.invalidate(rec.shard, "; ".join(found) + " (found by goldiclip verify)")
    return report


__all__ = ["Damage", "VerifyReport", "stages_on_root", "verify_root"]
