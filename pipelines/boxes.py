"""Boxes flow: OWLv2 boxes for every image's phrases."""

from __future__ import annotations

from prefect import flow

from pipelines.common import resolve_config
from pipelines.stage_flow import publish_gallery, run_stage_flow
from tasks.annotate.boxes import BoxesStage
from tasks.config import PipelineConfig


@flow(name="boxes", log_prints=True)
def boxes_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Write ``annotations/boxes/*.parquet`` (best box per phrase, has_confident_box)."""
    stage = BoxesStage(resolve_config(config, overrides))
    summary = run_stage_flow(stage, force=force)
    publish_gallery(stage)
    return summary
