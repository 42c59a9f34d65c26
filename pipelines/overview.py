"""The ``pipeline-overview`` artifact: every stage's progress in one table, kept current.

The parent flow publishes it after each stage and ``run_stage_flow`` while shards finish
(at most every ``REFRESH_S`` seconds), so the newest version in the UI's Artifacts page is
at most that old while a stage runs. ``goldiclip status`` prints the same rows from storage.
"""

from __future__ import annotations

import time

from prefect.artifacts import create_table_artifact

from tasks.config import PipelineConfig
from tasks.overview import overview_table, pipeline_overview

KEY = "pipeline-overview"
REFRESH_S = 15.0


def publish_overview(config: PipelineConfig) -> None:
    create_table_artifact(
        overview_table(pipeline_overview(config)), key=KEY,
        description=f"goldiclip pipeline on {config.dataset.root}: shards done per stage, failures by reason, "
        "the pace of the last finished shards and the time left at that pace",
    )


class OverviewRefresher:
    """Publishes the overview when called, at most once every ``REFRESH_S`` seconds."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.last = 0.0

    def __call__(self, *, final: bool = False) -> None:
        if final or time.monotonic() - self.last >= REFRESH_S:
            publish_overview(self.config)
            self.last = time.monotonic()
