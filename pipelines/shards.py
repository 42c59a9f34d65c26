"""Shards flow: join images and every annotation into shuffled training tars."""

from __future__ import annotations

from prefect import flow

from pipelines.common import resolve_config
from pipelines.stage_flow import run_stage_flow
from tasks.config import PipelineConfig
from tasks.shards import TrainingShardsStage


@flow(name="shards", log_prints=True)
def shards_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Write ``train/*.tar`` (JPEG + one JSON with captions, phrases, boxes and QA per sample)."""
    return run_stage_flow(TrainingShardsStage(resolve_config(config, overrides)), force=force)
