"""Phrases flow: object-centric noun-chunk phrases of the long captions, with their sentences."""

from __future__ import annotations

from prefect import flow

from pipelines.common import resolve_config
from pipelines.stage_flow import publish_gallery, run_stage_flow
from tasks.config import PipelineConfig
from tasks.annotate.phrases import PhrasesStage


@flow(name="phrases", log_prints=True)
def phrases_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Write ``annotations/phrases/*.parquet`` (text, source sentence and caption field per phrase)."""
    stage = PhrasesStage(resolve_config(config, overrides))
    summary = run_stage_flow(stage, force=force)
    publish_gallery(stage)
    return summary
