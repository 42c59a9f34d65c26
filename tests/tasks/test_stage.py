"""The stage contract on a toy stage: skip done shards, redo on a config change or force, count."""

from collections import Counter

import pytest

from storage import read_json, read_table, write_table
from tasks.config import PipelineConfig, Section
from tasks.stage import ShardOutcome, Stage, run_stage


class ToySection(Section):
    factor: int = 2


class ToyStage(Stage):
    """Multiplies numbers; negative numbers are 'bad data', counted and skipped."""

    name = "toy"

    def __init__(self, config, factor=2, shards=("00000", "00001")):
        super().__init__(config)
        self._section = ToySection(factor=factor)
        self._shards = list(shards)
        self.processed: list[str] = []

    @property
    def section(self):
        return self._section

    def list_shards(self):
        return self._shards

    def process(self, shard):
        self.processed.append(shard)
        rows, failures = [], Counter()
        for x in [1, -1, 2, 3] if shard == "00000" else [4, 5]:
            if x < 0:
                failures["negative"] += 1
                continue
            rows.append({"key": f"{shard}{x:04d}", "phrases": [{"text": str(x * self.section.factor),
                                                                "sentence": "", "field": ""}]})
        write_table(self.layout.annotation("phrases", shard), rows, "phrases")
        return ShardOutcome(Counter(rows=len(rows)), failures)


@pytest.fixture
def config(tmp_path):
    return PipelineConfig.model_validate({"dataset": {"root": str(tmp_path / "root")}})


def test_processes_then_skips_done_shards(config):
    stage = ToyStage(config)
    summary = run_stage(stage)
    assert stage.processed == ["00000", "00001"]
    assert summary["counts"] == {"rows": 5}
    assert summary["failures"] == {"negative": 1}
    again = ToyStage(config)
    summary2 = run_stage(again)
    assert again.processed == []
    assert summary2["last_run"]["skipped"] == ["00000", "00001"]
    assert summary2["counts"] == {"rows": 5}


def test_config_change_and_force_redo(config):
    run_stage(ToyStage(config))
    changed = ToyStage(config, factor=3)
    run_stage(changed)
    assert changed.processed == ["00000", "00001"]
    assert read_table(changed.layout.annotation("phrases", "00001")).to_pylist()[0]["phrases"][0]["text"] == "12"
    forced = ToyStage(config, factor=3)
    run_stage(forced, force=True)
    assert forced.processed == ["00000", "00001"]


def test_a_shard_that_raises_leaves_no_record(config):
    class Broken(ToyStage):
        def process(self, shard):
            if shard == "00001":
                raise OSError("disk full")
            return super().process(shard)

    stage = Broken(config)
    with pytest.raises(OSError):
        run_stage(stage)
    assert stage.records.get("00000") is not None
    assert stage.records.get("00001") is None
    rerun = ToyStage(config)
    run_stage(rerun)
    assert rerun.processed == ["00001"]  # the finished shard is kept, only the missing one is redone


def test_summary_file_is_written(config):
    stage = ToyStage(config)
    run_stage(stage)
    on_disk = read_json(stage.layout.stage_summary("toy"))
    assert on_disk["num_shards_done"] == 2
    assert set(on_disk["shards"]) == {"00000", "00001"}
    assert all(rec["seconds"] >= 0 for rec in on_disk["shards"].values())


def test_flow_counts_artifact_reports_the_stages_rate(config, prefect_harness):
    import json

    from prefect import flow
    from prefect.artifacts import Artifact

    from pipelines.stage_flow import run_stage_flow

    class RatedToy(ToyStage):
        throughput_count = "rows"

    @flow
    def toy_flow():
        return run_stage_flow(RatedToy(config))

    def counts_table() -> dict[str, dict]:
        data = Artifact.get("toy-counts").data
        return {row["shard"]: row for row in (json.loads(data) if isinstance(data, str) else data)}

    summary = toy_flow()
    rows = counts_table()
    for shard in ("00000", "00001"):
        rec = summary["shards"][shard]
        expected = rec["counts"]["rows"] / rec["seconds"] if rec["seconds"] else None  # a record keeps ms
        assert rows[shard]["rows/s"] == (pytest.approx(expected, abs=0.051) if expected else None)  # 0.1 steps
    assert rows["total"]["rows"] == 5 and rows["total"]["rows/s"] > 0
    toy_flow()  # every shard skipped: no rate for this run, the per-shard ones are kept
    rows = counts_table()
    assert rows["total"]["rows/s"] is None and rows["00000"]["rows/s"] is not None
