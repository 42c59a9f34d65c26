"""Captions flow: join DreamLIP captions to downloaded images by URL."""

from __future__ import annotations

from prefect import flow

from pipelines.common import resolve_config
from pipelines.stage_flow import run_stage_flow
from tasks.captions.stage import CaptionsStage
from tasks.config import PipelineConfig


@flow(name="captions", log_prints=True)
def captions_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Write ``annotations/captions/*.parquet`` (raw, 3 short, 3 long per image)."""
    return run_stage_flow(CaptionsStage(resolve_config(config, overrides)), force=force)
