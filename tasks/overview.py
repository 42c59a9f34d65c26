"""The pipeline at a glance, read from the dataset root alone (no Prefect server needed).

One row per stage in DAG order: shards done of the total, failures by reason, the pace
of the stage (its throughput unit per second, e.g. ``urls/s``) and, for a stage part-way
through, the time left at that pace. Everything comes from ``_stages/`` (the per-shard
records and each stage's summary), the download split's manifest and the training run's
metric rows, so ``goldiclip status`` shows the same view on any machine that can read
the root, and the parent flow publishes it as the ``pipeline-overview`` artifact.

The pace is measured over the last ``PACE_WINDOW`` finished shards (their ``finished_at``
times), which is the rate of the run in progress, whatever the parallelism.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from storage import DatasetLayout, StageRecords, join, open_fs, read_json
from tasks.config import PipelineConfig
from tasks.progress import format_duration

STAGE_ORDER = ("download", "captions", "phrases", "boxes", "vqa", "shards", "train", "evaluate")
# Stages with one output shard per image shard: their total is the download's.
PER_IMAGE_SHARD = ("captions", "phrases", "boxes", "vqa")
PACE_WINDOW = 20


@dataclass
class StageStatus:
    stage: str
    unit: str  # what ``done`` and ``total`` count: shards, or training steps
    done: int
    total: int | None  # None: not known yet (its inputs are not all there)
    failures: dict[str, int] = field(default_factory=dict)
    rate: float | None = None  # ``rate_unit`` per second over the last finished shards
    rate_unit: str | None = None
    eta_s: float | None = None
    artifacts: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.done == 0:
            return "not started"
        return "done" if self.total is not None and self.done >= self.total else "in progress"


def _throughput_units() -> dict[str, str | None]:
    """Each data stage's throughput count (``Stage.throughput_count``), by stage name."""
    from tasks.annotate.boxes import BoxesStage
    from tasks.annotate.phrases import PhrasesStage
    from tasks.annotate.vqa import VqaStage
    from tasks.captions.stage import CaptionsStage
    from tasks.download.stage import DownloadStage
    from tasks.shards import TrainingShardsStage

    stages = (DownloadStage, CaptionsStage, PhrasesStage, BoxesStage, VqaStage, TrainingShardsStage)
    return {s.name: s.throughput_count for s in stages}


def _pace(records: list, unit: str | None) -> tuple[float | None, float | None]:
    """(shards per second, ``unit`` per second) over the last ``PACE_WINDOW`` finished shards."""
    recent = sorted(records, key=lambda r: r.finished_at)[-PACE_WINDOW:]
    if len(recent) < 2 or recent[-1].finished_at <= recent[0].finished_at:
        return None, None
    span = recent[-1].finished_at - recent[0].finished_at
    # The first record marks the window's start: the work counted is what finished after it.
    shards_per_s = (len(recent) - 1) / span
    units_per_s = sum(r.counts.get(unit, 0) for r in recent[1:]) / span if unit else None
    return shards_per_s, units_per_s


def _artifact_keys(stage: str) -> list[str]:
    if stage == "train":
        return ["train-progress", "train-metrics", "train-report"]
    if stage == "evaluate":
        return ["evaluate-metrics"]
    return [f"{stage}-{what}" for what in ("counts", "failures", "progress")]


def _data_stage(layout: DatasetLayout, stage: str, total: int | None, unit: str | None) -> StageStatus:
    records = [r for r in StageRecords(layout, stage).all() if r.done]
    failures: dict[str, int] = {}
    for r in records:
        for reason, n in r.failures.items():
            failures[reason] = failures.get(reason, 0) + n
    status = StageStatus(stage, "shards", len(records), total, dict(sorted(failures.items())),
                         artifacts=_artifact_keys(stage))
    shards_per_s, units_per_s = _pace(records, unit)
    if units_per_s is not None:
        status.rate, status.rate_unit = round(units_per_s, 1), f"{unit}/s"
    if status.state == "in progress" and shards_per_s and total is not None:
        status.eta_s = round((total - status.done) / shards_per_s, 1)
    return status


def _latest_training_step(root: str) -> int:
    """The last logged step of the newest run under ``<root>/runs`` (0 when none has logged)."""
    fs, path = open_fs(join(root, "runs"))
    if not fs.exists(path):
        return 0
    newest, step = -1.0, 0
    for run in fs.ls(path, detail=True):
        metrics = f"{run['name'].rstrip('/')}/metrics.jsonl"
        if run["type"] == "directory" and fs.exists(metrics):
            mtime = fs.info(metrics).get("mtime") or fs.info(metrics).get("LastModified") or 0
            mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
            if mtime > newest:
                lines = [ln for ln in fs.cat_file(metrics).decode().splitlines() if ln.strip()]
                newest, step = mtime, int(json.loads(lines[-1])["step"]) if lines else 0
    return step


def _train(layout: DatasetLayout, config: PipelineConfig) -> StageStatus:
    summary = read_json(layout.stage_summary("train")) or {}
    steps = summary.get("counts", {}).get("steps") or _latest_training_step(layout.root)
    failures = {k: v for k, v in summary.get("failures", {}).items() if v}
    return StageStatus("train", "steps", steps, config.train.steps, failures, artifacts=_artifact_keys("train"))


def _evaluate(layout: DatasetLayout) -> StageStatus:
    summary = read_json(layout.stage_summary("evaluate")) or {}
    return StageStatus("evaluate", "runs", 1 if summary else 0, 1, summary.get("failures", {}),
                       artifacts=_artifact_keys("evaluate"))


def pipeline_overview(config: PipelineConfig) -> list[StageStatus]:
    """Every stage's status under ``config.dataset.root``, in DAG order."""
    layout = DatasetLayout(config.dataset.root)
    units = _throughput_units()
    manifest = read_json(join(layout.root, "sources", "manifest.json")) or {}
    image_shards = manifest.get("num_shards")
    rows = [_data_stage(layout, "download", image_shards, units["download"])]
    rows += [_data_stage(layout, s, image_shards, units[s]) for s in PER_IMAGE_SHARD]
    upstream_done = all(r.state == "done" for r in rows)
    shards_total = None
    if upstream_done:
        from tasks.shards import TrainingShardsStage

        shards_total = len(TrainingShardsStage(config).list_shards())
    rows.append(_data_stage(layout, "shards", shards_total, units["shards"]))
    rows += [_train(layout, config), _evaluate(layout)]
    return rows


def overview_table(rows: list[StageStatus]) -> list[dict]:
    """One flat dict per stage, for a Prefect table artifact and for ``status`` on a terminal."""
    return [
        {
            "stage": r.stage,
            "state": r.state,
            "done": f"{r.done}/{r.total if r.total is not None else '?'} {r.unit}",
            "failures": ", ".join(f"{k}={v}" for k, v in r.failures.items()) or "none",
            "rate": f"{r.rate:,.1f} {r.rate_unit}" if r.rate is not None else "-",
            "time left": format_duration(r.eta_s),
            "artifacts": ", ".join(r.artifacts),
        }
        for r in rows
    ]


def overview_json(rows: list[StageStatus]) -> list[dict]:
    return [{**asdict(r), "state": r.state} for r in rows]
