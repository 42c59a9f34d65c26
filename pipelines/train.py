"""Train flow: the train stage (a Ray Train job on `train/*.tar`), watched from Prefect (DESIGN.md, Orchestration).

The stage (tasks/train/stage.py) does the work and its skip-if-done: a finished run is skipped,
a run stopped part-way resumes from its last checkpoint, `force=True` deletes the run and starts
over. This flow only reports: a progress artifact and a log line per metric row while training
runs, then a table artifact of every metric and a markdown report with the plots and checkpoint.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact

from pipelines.common import resolve_config
from tasks.config import PipelineConfig
from tasks.stage import SINGLE_UNIT
from tasks.train.loop import StepHook, read_metrics
from tasks.train.report import final_table
from tasks.train.stage import TrainStage


class _Progress:
    """A progress artifact and one log line per metric row (called from the flow's thread)."""

    def __init__(self, total_steps: int):
        self.total_steps, self.artifact = total_steps, None

    def start(self, step: int) -> None:
        self.artifact = create_progress_artifact(100.0 * step / self.total_steps, key="train-progress",
                                                 description="train: optimiser steps done")

    def __call__(self, row: dict) -> None:
        get_run_logger().info(
            "step %d/%d  loss %.4f  ret %.4f  lr %.2e  %.1f img/s  corrupt %d", row["step"], self.total_steps,
            row.get("loss/total", float("nan")), row.get("loss/ret", float("nan")), row["lr"],
            row["images_per_s"], row["corrupt_samples"])
        update_progress_artifact(self.artifact, 100.0 * row["step"] / self.total_steps)


def publish_report(summary: dict, rows: list[dict]) -> None:
    """A table artifact of every metric and a markdown report: run, checkpoint, plots, last values."""
    create_table_artifact(final_table(rows) or [{"metric": "none", "first": 0, "last": 0, "min": 0, "max": 0}],
                          key="train-metrics", description="train: every logged metric, first/last/min/max")
    last = rows[-1] if rows else {}
    lines = ["# GoldiCLIP training", "", f"- run: `{summary['run_dir']}`", f"- checkpoint: `{summary['checkpoint']}`",
             f"- steps: {last.get('step', 0)}, samples seen: {last.get('samples_seen', 0)}, "
             f"corrupt samples skipped: {last.get('corrupt_samples', 0)}", "", "| plot | file |", "| --- | --- |"]
    lines += [f"| {group} | `{url}` |" for group, url in summary["plots"].items()]
    lines += ["", "| metric | last |", "| --- | --- |"]
    lines += [f"| {k} | {v:.5g} |" for k, v in last.items() if isinstance(v, float)]
    create_markdown_artifact("\n".join(lines), key="train-report", description="train: curves and checkpoint")


def run_training(config: PipelineConfig, *, force: bool = False, on_step: StepHook | None = None) -> dict:
    """The flow body: run the train stage with Prefect reporting; returns its summary.

    `on_step(step, rank)` goes to every Ray worker (tests inject a worker failure with it).
    """
    logger = get_run_logger()
    progress = _Progress(config.train.steps)
    stage = TrainStage(config, on_metrics=progress, on_step=on_step)
    stage.prepare()
    if not stage.pending(force=force):
        logger.info("run %s is done (%s): nothing to train; force=True starts it over", stage.run,
                    stage.records.get(SINGLE_UNIT).counts)
    else:
        start_step = 0 if force else stage.resume_step()
        logger.info("run %s: %s at step %d of %d (%d shards, %d workers x %d images)", stage.run,
                    "resuming" if start_step else "starting over" if force else "starting", start_step,
                    config.train.steps, len(stage.shard_urls), config.train.num_workers,
                    config.train.batch_size_per_worker)
        progress.start(start_step)
    summary = stage.summarize([stage.run_shard(SINGLE_UNIT, force=force)])
    publish_report(summary, read_metrics(stage.run_dir))
    logger.info("train: %s; checkpoint %s", summary["counts"], summary["checkpoint"])
    return summary


@flow(name="train", log_prints=True)
def train_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Train GoldiCLIP with Ray Train on ``train/*.tar``; rerunning resumes the same run."""
    return run_training(resolve_config(config, overrides), force=force)
