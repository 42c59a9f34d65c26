"""Evaluate flow: zero-shot retrieval and classification of the trained checkpoint (METHOD.md sec. 9).

One task per evaluation set (the UI shows each with its logs); the metrics go to
``<root>/eval/metrics.json`` and the ``evaluate-metrics`` table artifact. A rerun with the
same config and checkpoint files returns the earlier metrics; ``force=True`` recomputes.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.common import resolve_config
from tasks.config import EvalDatasetConfig, EvaluateConfig, PipelineConfig
from tasks.evaluate.stage import describe_retrieval, evaluate_one_set, metrics_path, run_evaluation, stage_summary


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


def publish_metrics(metrics: dict[str, float]) -> None:
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
                          description="evaluate: zero-shot retrieval (R@k) and classification (top-k) vs chance")


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Write ``eval/metrics.json``: R@1/5/10 both ways per mode, classification top-1/5, chance levels."""
    cfg = resolve_config(config, overrides)
    logger = get_run_logger()
    names = [d.name for d in cfg.evaluate.datasets]
    if not names:
        logger.warning("evaluate: no evaluation sets configured (evaluate.datasets); nothing to do")
        return stage_summary({"counts": {}, "failures": {}, "seconds": 0.0, "checkpoint": None, "metrics": {},
                              "skipped": True}, names)
    result = run_evaluation(cfg, force=force, evaluate_one=_evaluate_as_task)
    if result.get("skipped"):
        logger.info("evaluate: %s already holds this config's metrics for checkpoint %s; force=True redoes them",
                    metrics_path(cfg), result["checkpoint"])
    else:
        logger.info("evaluate: checkpoint %s -> %s", result["checkpoint"], metrics_path(cfg))
    publish_metrics(result["metrics"])
    return stage_summary(result, names)
