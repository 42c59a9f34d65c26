"""Train flow: the train stage (a Ray Train job on `train/*.tar`), watched from Prefect (DESIGN.md, Orchestration).

The stage (tasks/train/stage.py) does the work and its skip-if-done: a finished run is skipped,
a run stopped part-way resumes from its last checkpoint, `force=True` deletes the run and starts
over. This flow only reports. While training runs: the `train-progress` artifact on every metric
row; a progress log line (step, losses, images/s, time left) on every row when the output is a
terminal, else at most every `train.progress_every_s` seconds or 10% of the steps; and every
`train.report_every_s` seconds a new version of the `train-report` artifact with the curves so far
inline (their PNGs also under `<run>/plots/`), so a person watching a long run in the UI sees the
curves move. At the end: the `train-metrics` table and the final `train-report`.
"""

from __future__ import annotations

import httpx
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact

from pipelines.common import resolve_config
from tasks.config import PipelineConfig, TrainConfig
from tasks.progress import LogThrottle
from tasks.stage import SINGLE_UNIT
from tasks.train.checkpoint import latest_checkpoint
from tasks.train.loop import StepHook, read_metrics
from tasks.train.report import final_table, progress_line, read_plots, report_markdown, write_plots
from tasks.train.stage import TrainStage

REPORT_KEY = "train-report"
REPORT_DESCRIPTION = "train: curves (inline), run, checkpoint, last values"


class _Watch:
    """Called from the flow's thread with each new metric row while training runs (module docstring)."""

    def __init__(self, train: TrainConfig):
        self.total_steps = train.steps
        self.log_throttle = LogThrottle.for_output(train.progress_every_s)
        self.report_throttle = LogThrottle(train.report_every_s, every_fraction=None)
        self.artifact, self.run_dir, self.rows = None, "", []

    def start(self, run_dir: str, step: int) -> None:
        self.run_dir = run_dir
        self.rows = [r for r in read_metrics(run_dir) if r["step"] <= step]  # a resumed run's curves so far
        self.artifact = create_progress_artifact(100.0 * step / self.total_steps, key="train-progress",
                                                 description="train: optimiser steps done")

    def __call__(self, row: dict) -> None:
        self.rows.append(row)
        update_progress_artifact(self.artifact, 100.0 * row["step"] / self.total_steps)
        if self.log_throttle.ready(row["step"], self.total_steps):
            get_run_logger().info("train: %s", progress_line(row, self.total_steps))
        if self.report_throttle.ready(row["step"]):
            try:
                plots = write_plots(self.rows, self.run_dir)
                create_markdown_artifact(report_markdown(run_dir=self.run_dir, rows=self.rows, plots=plots,
                                                         total_steps=self.total_steps,
                                                         checkpoint=latest_checkpoint(self.run_dir), live=True),
                                         key=REPORT_KEY, description=REPORT_DESCRIPTION)
            except (OSError, httpx.HTTPError) as e:  # storage or API trouble: the next version tries again
                get_run_logger().warning("train: live report not published (%s: %s)", type(e).__name__, e)


def publish_report(summary: dict, rows: list[dict], total_steps: int) -> None:
    """A table artifact of every metric and the final report, its plots read back from storage."""
    create_table_artifact(final_table(rows) or [{"metric": "none", "first": 0, "last": 0, "min": 0, "max": 0}],
                          key="train-metrics", description="train: every logged metric, first/last/min/max")
    markdown = report_markdown(run_dir=summary["run_dir"], rows=rows, plots=read_plots(summary["run_dir"]),
                               total_steps=total_steps, checkpoint=summary["checkpoint"])
    create_markdown_artifact(markdown, key=REPORT_KEY, description=REPORT_DESCRIPTION)


def run_training(config: PipelineConfig, *, force: bool = False, on_step: StepHook | None = None) -> dict:
    """The flow body: run the train stage with Prefect reporting; returns its summary.

    `on_step(step, rank)` goes to every Ray worker (tests inject a worker failure with it).
    """
    logger = get_run_logger()
    watch = _Watch(config.train)
    stage = TrainStage(config, on_metrics=watch, on_step=on_step)
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
        watch.start(stage.run_dir, start_step)
    summary = stage.summarize([stage.run_shard(SINGLE_UNIT, force=force)])
    publish_report(summary, read_metrics(stage.run_dir), config.train.steps)
    logger.info("train: %s; checkpoint %s", summary["counts"], summary["checkpoint"])
    return summary


@flow(name="train", log_prints=True)
def train_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Train GoldiCLIP with Ray Train on ``train/*.tar``; rerunning resumes the same run."""
    return run_training(resolve_config(config, overrides), force=force)
