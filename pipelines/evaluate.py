"""Evaluate flow: zero-shot retrieval and classification of the trained checkpoint (METHOD.md sec. 9).

The evaluate stage (tasks/evaluate/stage.py) does the work and its skip-if-done: a rerun with
the same config and checkpoint files returns the earlier metrics; ``force=True`` recomputes.
This flow runs each evaluation set as a task (the UI shows each with its logs) and publishes the
metrics (``<root>/eval/metrics.json``) as the ``evaluate-metrics`` table artifact, and the paper's
tables 1-4 with its 30M numbers beside ours (``<root>/eval/paper_tables.md``) as ``evaluate-paper-tables``.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.common import resolve_config
from storage.fs import markdown_link
from tasks.config import EvalDatasetConfig, EvaluateConfig, PipelineConfig
from tasks.evaluate.report import paper_tables
from tasks.evaluate.stage import EvaluateStage, describe_retrieval, evaluate_one_set, metrics_path
from tasks.stage import run_stage


@task(cache_policy=NO_CACHE)
def evaluate_dataset(scorer, dataset: EvalDatasetConfig, config: EvaluateConfig):
    metrics, counts, failures = evaluate_one_set(scorer, dataset, config)
    logger = get_run_logger()
    logger.info("%s: %s; failures %s", dataset.name, counts, dict(failures) or "none")
    for line in describe_retrieval(metrics):
        logger.info(line)
    return metrics, counts, failures


def _evaluate_as_task(scorer, dataset: EvalDatasetConfig, config: EvaluateConfig):
    return evaluate_dataset.with_options(task_run_name=f"evaluate-{dataset.name}")(scorer, dataset, config)


def publish_metrics(metrics: dict[str, float], where: str = "") -> None:
    rows = []
    for name, value in metrics.items():
        set_name, mode, metric = name.split("/")
        if mode == "chance":
            continue
        chance = metrics.get(f"{set_name}/chance/{metric}")
        rows.append({"set": set_name, "mode": mode, "metric": metric, "value": round(value, 4),
                     "chance": round(chance, 4) if chance is not None else None,
                     "x_chance": round(value / chance, 2) if chance else None})
    create_table_artifact(rows or [{"set": "none"}], key="evaluate-metrics",
                          description="evaluate: zero-shot retrieval (R@k) and classification (top-k) vs chance"
                          + (f"; every metric in {where}" if where else ""))


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Write ``eval/metrics.json``: R@1/5/10 both ways per mode, classification top-1/5, chance levels."""
    cfg = resolve_config(config, overrides)
    logger = get_run_logger()
    if not cfg.evaluate.datasets:
        logger.warning("evaluate: no evaluation sets configured (evaluate.datasets); nothing to do")
    summary = run_stage(EvaluateStage(cfg, evaluate_one=_evaluate_as_task), force=force)
    if summary["last_run"]["skipped"]:
        logger.info("evaluate: %s already holds this config's metrics for checkpoint %s; force=True redoes them",
                    metrics_path(cfg), summary["checkpoint"])
    elif summary["last_run"]["processed"]:
        logger.info("evaluate: checkpoint %s -> %s", summary["checkpoint"], metrics_path(cfg))
    publish_metrics(summary["metrics"], markdown_link(metrics_path(cfg)))
    tables = paper_tables(summary["metrics"], cfg.evaluate.datasets)
    create_markdown_artifact(f"Checkpoint {markdown_link(summary['checkpoint'])}; every metric in "
                             f"{markdown_link(metrics_path(cfg))}.\n\n{tables}" if summary.get("checkpoint") else tables,
                             key="evaluate-paper-tables",
                             description="evaluate: the paper's tables 1-4, its 30M GoldiCLIP beside ours")
    return summary
