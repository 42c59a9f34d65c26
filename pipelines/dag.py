"""The parent flow ``goldiclip_pipeline``: every stage in order, each as a subflow."""

from __future__ import annotations

from prefect import flow, get_run_logger

from pipelines.boxes import boxes_flow
from pipelines.captions import captions_flow
from pipelines.common import resolve_config
from pipelines.download import download_flow
from pipelines.evaluate import evaluate_flow
from pipelines.overview import publish_overview
from pipelines.phrases import phrases_flow
from pipelines.shards import shards_flow
from pipelines.train import train_flow
from pipelines.vqa import vqa_flow
from tasks.config import ConfigError, PipelineConfig
from tasks.preflight import preflight

# In DAG order; each flow takes (config, overrides, force) and returns its summary.
STAGE_FLOWS = {
    "download": download_flow,
    "captions": captions_flow,
    "phrases": phrases_flow,
    "boxes": boxes_flow,
    "vqa": vqa_flow,
    "shards": shards_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
}


@flow(name="goldiclip-pipeline", log_prints=True)
def goldiclip_pipeline(
    config: str | dict | PipelineConfig = "preset:demo",
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: list[str] | None = None,
) -> dict[str, dict]:
    """Run ``stages`` (default: all) in DAG order; ``force`` names stages to redo."""
    cfg = resolve_config(config, overrides)  # fail fast, before any stage runs
    wanted = stages or list(STAGE_FLOWS)
    unknown = sorted(set(wanted) - set(STAGE_FLOWS)) + sorted(set(force or []) - set(STAGE_FLOWS))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(STAGE_FLOWS)}")
    preflight(cfg, wanted)  # e.g. a missing URL list, before the first stage starts (deployments too)
    logger = get_run_logger()
    summaries = {}
    for name, stage_flow in STAGE_FLOWS.items():
        if name in wanted:
            logger.info("stage %s", name)
            summaries[name] = stage_flow(cfg, force=name in (force or []))
            publish_overview(cfg)
    return summaries
