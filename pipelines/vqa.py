"""VQA flow: question-answer pairs per image from an OpenAI-compatible server (vLLM) or in-process."""

from __future__ import annotations

from prefect import flow, get_run_logger

from pipelines.common import resolve_config
from pipelines.stage_flow import publish_gallery, run_stage_flow
from tasks.config import PipelineConfig
from tasks.annotate.vqa import VqaStage


@flow(name="vqa", log_prints=True)
def vqa_flow(
    config: str | dict | PipelineConfig = "preset:demo", overrides: list[str] | None = None, force: bool = False
) -> dict:
    """Write ``annotations/vqa/*.parquet``; a managed server (vqa.openai.server) lives as long as this flow."""
    stage = VqaStage(resolve_config(config, overrides))
    with stage.serving():
        if stage.servers is not None:
            get_run_logger().info("vqa: managed server(s) healthy at %s; logs: %s", stage.servers.base_urls,
                                  ", ".join(str(p) for p in stage.servers.logs))
        summary = run_stage_flow(stage, force=force)
    publish_gallery(stage)
    return summary
