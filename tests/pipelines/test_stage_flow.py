"""``run_stage_flow`` under a real Prefect API: a task run per shard, named for the stage's work."""

from __future__ import annotations

import asyncio
import re

import pytest

from tasks.config import PipelineConfig
from tests.tasks.test_stage import ToyStage


class NamedToyStage(ToyStage):
    task_name = "multiply_numbers"


@pytest.mark.usefixtures("prefect_harness")
def test_one_named_task_run_per_shard_with_plain_parameters(tmp_path):
    from prefect import flow, get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from pipelines.stage_flow import run_stage_flow

    config = PipelineConfig.model_validate({"dataset": {"root": str(tmp_path / "root")}})

    @flow(name="toy")
    def toy_flow():
        from prefect.runtime import flow_run

        return flow_run.id, run_stage_flow(NamedToyStage(config, shards=("00000", "00001", "00002")))

    flow_run_id, summary = toy_flow()
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
