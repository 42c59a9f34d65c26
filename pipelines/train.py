"""Train flow: a Ray Train job on `train/*.tar`, watched from Prefect (DESIGN.md, Orchestration).

The flow prepares the tokenizer, starts (or joins) Ray, and runs `TorchTrainer.fit()` in a
thread while it tails the run's `metrics.jsonl`: a progress artifact and a log line per metric
row reach Prefect while training runs. At the end it plots every loss and task weight (PNG
under `<run>/plots/`) and publishes a table artifact and a markdown report with the plots'
paths and the checkpoint. The run name comes from the config, so running the flow again
resumes the run from its last checkpoint; a run already at `train.steps` is skipped, and
`force=True` deletes the run and starts over.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.common import resolve_config
from storage import DatasetLayout, join, open_fs, read_json, write_json
from tasks.config import ConfigError, PipelineConfig
from tasks.train.loop import (
    DATA_POSITION_FILE,
    build_trainer,
    checkpoint_step,
    latest_checkpoint_on_storage,
    prepare_tokenizer,
    read_metrics,
    run_name,
    runs_dir,
    validate_train_config,
)
from tasks.ray_actors import start_ray
from tasks.train.data import train_shard_urls
from tasks.train.report import final_table, plot_metrics

POLL_SECONDS = 2.0


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def prepare_tokenizer_task(config: PipelineConfig, shard_urls: list[str]) -> str:
    return prepare_tokenizer(config, shard_urls)


def _fit_in_thread(trainer) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the flow's thread, raised there
            outcome["error"] = e

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    return thread, outcome


def _watch(thread: threading.Thread, run_dir: str, total_steps: int, start_step: int) -> None:
    """Progress artifact and one log line per new metric row until `fit()` returns."""
    logger = get_run_logger()
    progress = create_progress_artifact(100.0 * start_step / total_steps, key="train-progress",
                                        description="train: optimiser steps done")
    last_step = start_step
    while thread.is_alive():
        thread.join(POLL_SECONDS)
        try:
            rows = read_metrics(run_dir)
        except (OSError, ValueError):  # a file mid-replace on some stores: read it next time
            continue
        for row in (r for r in rows if r["step"] > last_step):
            logger.info("step %d/%d  loss %.4f  ret %.4f  lr %.2e  %.1f img/s  corrupt %d", row["step"],
                        total_steps, row.get("loss/total", float("nan")), row.get("loss/ret", float("nan")),
                        row["lr"], row["images_per_s"], row["corrupt_samples"])
            last_step = row["step"]
            update_progress_artifact(progress, 100.0 * last_step / total_steps)


def _publish(run_dir: str, checkpoint: str | None, rows: list[dict]) -> dict[str, str]:
    """PNG plots under `<run>/plots/`, a table artifact and a markdown report; returns plot paths."""
    fs, path = open_fs(run_dir)
    local = fs.protocol in ("file", "local") or "file" in fs.protocol
    plot_dir = Path(path) / "plots" if local else Path(tempfile.mkdtemp(prefix="goldiclip-plots-"))
    plots = plot_metrics(rows, plot_dir)
    if not local:
        for png in plots.values():
            fs.put(str(png), f"{path}/plots/{png.name}")
    where = {group: (str(p) if local else join(run_dir, "plots", p.name)) for group, p in plots.items()}
    create_table_artifact(final_table(rows) or [{"metric": "none", "first": 0, "last": 0, "min": 0, "max": 0}],
                          key="train-metrics", description="train: every logged metric, first/last/min/max")
    last = rows[-1] if rows else {}
    lines = ["# GoldiCLIP training", "", f"- run: `{run_dir}`", f"- checkpoint: `{checkpoint}`",
             f"- steps: {last.get('step', 0)}, samples seen: {last.get('samples_seen', 0)}, "
             f"corrupt samples skipped: {last.get('corrupt_samples', 0)}", "", "| plot | file |", "| --- | --- |"]
    lines += [f"| {group} | `{p}` |" for group, p in where.items()]
    lines += ["", "| metric | last |", "| --- | --- |"]
    lines += [f"| {k} | {v:.5g} |" for k, v in last.items() if isinstance(v, float)]
    create_markdown_artifact("\n".join(lines), key="train-report", description="train: curves and checkpoint")
    return where


def run_training(config: PipelineConfig, *, force: bool = False) -> dict:
    """The flow body: train (or resume, or skip a finished run) and report; returns the summary."""
    logger = get_run_logger()
    train = config.train
    try:
        validate_train_config(config)
    except ValueError as e:
        raise ConfigError(f"train: {e}") from None
    layout = DatasetLayout(config.dataset.root)
    shard_urls = train_shard_urls(layout.train_dir)
    if not shard_urls:
        raise ValueError(f"no training shards in {layout.train_dir}: run the shards stage first")
    tokenizer = prepare_tokenizer_task(config, shard_urls)
    name = run_name(config, shard_urls)
    run_dir = join(runs_dir(config.dataset.root), name)
    fs, run_path = open_fs(run_dir)
    if force and fs.exists(run_path):
        logger.info("force: deleting run %s", run_dir)
        fs.rm(run_path, recursive=True)

    latest = latest_checkpoint_on_storage(run_dir)
    start_step = checkpoint_step(latest) if latest else 0
    skipped = start_step >= train.steps
    if skipped:
        logger.info("run %s is already at step %d of %d: nothing to train", name, start_step, train.steps)
        checkpoint = latest
    else:
        logger.info("run %s: %s at step %d of %d (%d shards, %d workers x %d images)", name,
                    "resuming" if start_step else "starting", start_step, train.steps, len(shard_urls),
                    train.num_workers, train.batch_size_per_worker)
        start_ray(config.ray)
        trainer = build_trainer(config, name=name, tokenizer=tokenizer, shard_urls=shard_urls)
        thread, outcome = _fit_in_thread(trainer)
        _watch(thread, run_dir, train.steps, start_step)
        if "error" in outcome:
            raise outcome["error"]
        # The newest checkpoint on storage is the run's last (Ray keeps `num_to_keep`, newest
        # included); read it from storage so the path keeps its fsspec protocol.
        checkpoint = latest_checkpoint_on_storage(run_dir)

    rows = read_metrics(run_dir)
    plots = _publish(run_dir, checkpoint, rows)
    data = (read_json(join(checkpoint, DATA_POSITION_FILE)) or {}) if checkpoint else {}
    summary = {
        "stage": "train",
        "run": name,
        "run_dir": run_dir,
        "checkpoint": checkpoint,
        "plots": plots,
        "num_shards_done": len(shard_urls),
        "counts": {"steps": data.get("step", 0), "samples_seen": data.get("samples_seen", 0),
                   "samples_read": data.get("samples_read", 0)},
        "failures": {f"corrupt_{k}": v for k, v in (data.get("errors") or {}).items() if v},
        "last_run": {"processed": [] if skipped else [name], "skipped": [name] if skipped else [],
                     "started_at_step": start_step},
        "updated_at": time.time(),
    }
    write_json(layout.stage_summary("train"), summary)
    logger.info("train: %s; checkpoint %s", summary["counts"], checkpoint)
    return summary


@flow(name="train", log_prints=True)
def train_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Train GoldiCLIP with Ray Train on ``train/*.tar``; rerunning resumes the same run."""
    return run_training(resolve_config(config, overrides), force=force)
