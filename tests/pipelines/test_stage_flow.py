"""``run_stage_flow`` under a real Prefect API: a task run per shard, named for the stage's work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import pytest

from tasks.config import PipelineConfig
from tests.tasks.test_stage import ToyStage


class NamedToyStage(ToyStage):
    task_name = "multiply_numbers"
    throughput_count = "rows"


@contextlib.contextmanager
def info_logs_of_flow_runs():
    """The records flow runs log at INFO (the session's Prefect logging level is WARNING). Entered
    inside a flow: Prefect configures its loggers again when the first flow starts."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("prefect.flow_runs")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.usefixtures("prefect_harness")
def test_one_named_task_run_per_shard_with_plain_parameters(tmp_path):
    from prefect import flow, get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from pipelines.stage_flow import run_stage_flow

    config = PipelineConfig.model_validate({"dataset": {"root": str(tmp_path / "root")}})

    @flow(name="toy")
    def toy_flow():
        from prefect.runtime import flow_run

        with info_logs_of_flow_runs() as records:
            summary = run_stage_flow(NamedToyStage(config, shards=("00000", "00001", "00002")))
        return flow_run.id, summary, [r.getMessage() for r in records]

    flow_run_id, summary, messages = toy_flow()
    assert summary["last_run"]["processed"] == ["00000", "00001", "00002"]

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    runs = asyncio.run(task_runs())
    assert sorted(r.name for r in runs) == ["multiply_numbers-00000", "multiply_numbers-00001",
                                            "multiply_numbers-00002"]
    assert {r.task_key.split("-")[0] for r in runs} == {"multiply_numbers"}
    # Plain parameters only: the shard and force, not the stage object.
    assert all(set(r.task_inputs) == {"shard", "force"} for r in runs)
    # A progress line a person reads; not a terminal: the first shard, then each 10% or minute, and the
    # last (here each shard is a third of the stage).
    lines = [m for m in messages if re.match(r"toy: \d+/3 shards", m)]
    assert len(lines) == 3, messages
    assert re.fullmatch(r"toy: 1/3 shards \(33\.3%\), [23] rows, [\d,.]+ rows/s, \w+ left", lines[0]), lines
    assert re.fullmatch(r"toy: 3/3 shards \(100\.0%\), 7 rows, [\d,.]+ rows/s, 0s left", lines[-1]), lines


@pytest.mark.usefixtures("prefect_harness")
def test_boxes_flow_publishes_a_gallery_the_ui_renders(tmp_path, owl_dir):
    """The gallery artifact read back from the API: markdown with the images inline (as Prefect's UI renders)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pipelines.boxes import boxes_flow
    from tests.tasks.annotate.test_boxes import make_shard

    root = str(tmp_path / "root")
    keys = make_shard(root)
    boxes_flow({"dataset": {"root": root}, "boxes": {"model": owl_dir, "batch_size": 2, "score_threshold": 0.0}})

    async def gallery():
        async with get_client() as client:
            found = await client.read_latest_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["boxes-gallery"])))
            return found[0]

    artifact = asyncio.run(gallery())
    assert artifact.type == "markdown"
    shown = re.findall(r"!\[(\w+)\]\(data:image/jpeg;base64,", artifact.data)
    assert shown and set(shown) <= set(keys[:3])  # only images the stage annotated
    assert "red circle" in artifact.data and "galleries/boxes.html" in artifact.description
