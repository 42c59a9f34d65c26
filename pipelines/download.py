"""Download flow: Open-30M URL lists -> webdataset image shards (DESIGN.md, stages)."""

from __future__ import annotations

from prefect import flow

from pipelines.common import resolve_config
from pipelines.stage_flow import run_stage_flow
from tasks.config import PipelineConfig
from tasks.download.stage import DownloadStage


@flow(name="download", log_prints=True)
def download_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Fetch, verify and resize every URL of the configured lists into ``images/*.tar``."""
    return run_stage_flow(DownloadStage(resolve_config(config, overrides)), force=force)
