"""The stage contract on toy stages: skip done shards, redo on a config change or force, count;
record outputs, follow what upstream wrote, notice damaged inputs and outputs."""

import logging
from collections import Counter
from pathlib import Path

import pytest

from storage import read_json, read_table, write_table
from storage.integrity import file_digest
from tasks.config import PipelineConfig, Section
from tasks.stage import InputDamaged, ShardOutcome, Stage, run_stage


class ToySection(Section):
    factor: int = 2


class ToyStage(Stage):
    """Multiplies numbers; negative numbers are 'bad data', counted and skipped."""

    name = "toy"
    task_name = "multiply_numbers"

    def __init__(self, config, factor=2, shards=("00000", "00001"), suffix=""):
        super().__init__(config)
        self._section = ToySection(factor=factor)
        self._shards = list(shards)
        self.suffix = suffix  # stands for a code change that is not in the config
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
            rows.append({"key": f"{shard}{x:04d}", "phrases": [{"text": f"{x * self.section.factor}{self.suffix}",
                                                                "sentence": "", "field": ""}]})
        write_table(self.layout.annotation("phrases", shard), rows, "phrases")
        return ShardOutcome(Counter(rows=len(rows)), failures)

    def output_files(self, shard):
        return {"table": self.layout.annotation("phrases", shard)}


class ToyDown(Stage):
    """Downstream of ToyStage: asks each of its phrases back as a question."""

    name = "toy_down"
    task_name = "ask_back"
    upstream = ("toy",)

    def __init__(self, config):
        super().__init__(config)
        self.processed: list[str] = []

    @property
    def section(self):
        return ToySection()

    def list_shards(self):
        return ["00000", "00001"]

    def process(self, shard):
        self.processed.append(shard)
        rows = [{"key": r["key"], "qa": [{"question": p["text"], "answer": p["text"]} for p in r["phrases"]],
                 "raw_output": None, "error": None}
                for r in read_table(self.layout.annotation("phrases", shard)).to_pylist()]
        write_table(self.layout.annotation("vqa", shard), rows, "vqa")
        return ShardOutcome(Counter(rows=len(rows)))

    def output_files(self, shard):
        return {"table": self.layout.annotation("vqa", shard)}


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


def test_records_hold_each_outputs_path_size_and_checksum(config):
    stage = ToyStage(config)
    run_stage(stage)
    for shard in ("00000", "00001"):
        url = stage.layout.annotation("phrases", shard)
        assert stage.records.get(shard).outputs == {
            "table": {"path": f"annotations/phrases/{shard}.parquet", **file_digest(url).as_dict()}}


def test_downstream_follows_what_upstream_wrote_not_its_config(config):
    run_stage(ToyStage(config))
    first = ToyDown(config)
    run_stage(first)
    assert first.processed == ["00000", "00001"]

    run_stage(ToyStage(config), force=True)  # rewrites the same bytes
    identical = ToyDown(config)
    assert run_stage(identical)["last_run"]["skipped"] == ["00000", "00001"] and identical.processed == []

    class NewCode(ToyStage):
        code_version = 2  # the stage's own shards are redone without --force

    bumped = NewCode(config)
    run_stage(bumped)
    assert bumped.processed == ["00000", "00001"]
    unchanged = ToyDown(config)
    run_stage(unchanged)
    assert unchanged.processed == []  # its outputs came out the same

    # A forced rerun whose output changed for a reason outside the config (a fixed bug, a new model)
    fixed = NewCode(config, suffix="!")
    run_stage(fixed, force=True)
    follows = ToyDown(config)
    run_stage(follows)
    assert follows.processed == ["00000", "00001"]
    assert read_table(follows.layout.annotation("vqa", "00001")).to_pylist()[0]["qa"][0]["question"] == "8!"


def _cut(url: str, keep: int) -> None:
    path = Path(url)
    path.write_bytes(path.read_bytes()[:keep])


def test_a_damaged_input_fails_its_reader_by_name_and_marks_the_writer_to_redo(config):
    run_stage(ToyStage(config))
    table = Path(config.dataset.root) / "annotations" / "phrases" / "00001.parquet"
    size = table.stat().st_size
    _cut(str(table), size - 10)
    reader = ToyDown(config)
    with pytest.raises(InputDamaged, match=(
            rf"annotations/phrases/00001\.parquet \(toy shard 00001\) is damaged: {size - 10} bytes, its record "
            rf"says {size}; toy shard 00001 is marked to be redone: rerun toy, then toy_down")):
        run_stage(reader)
    assert reader.processed == ["00000"]  # the intact shard went through
    upstream = ToyStage(config)
    rec = upstream.records.get("00001")
    assert not rec.done and rec.invalidated.startswith("annotations/phrases/00001.parquet: ")
    with pytest.raises(InputDamaged, match="toy shard 00001 is marked to be redone"):
        run_stage(ToyDown(config))  # not read again until its stage redoes it

    run_stage(upstream)
    assert upstream.processed == ["00001"]
    again = ToyDown(config)
    run_stage(again)
    assert again.processed == ["00001"]


def test_a_same_size_corruption_is_caught_by_the_checksum(config):
    run_stage(ToyStage(config))
    table = Path(config.dataset.root) / "annotations" / "phrases" / "00000.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF
    table.write_bytes(bytes(data))
    with pytest.raises(InputDamaged, match=r"00000\.parquet \(toy shard 00000\) is damaged: checksum crc32:"):
        run_stage(ToyDown(config))
    assert ToyStage(config).records.get("00000").invalidated


def test_a_done_shard_whose_output_was_cut_or_deleted_is_redone(config, caplog):
    stage = ToyStage(config)
    run_stage(stage)
    _cut(stage.layout.annotation("phrases", "00000"), 100)
    Path(stage.layout.annotation("phrases", "00001")).unlink()
    again = ToyStage(config)
    with caplog.at_level(logging.WARNING, logger="tasks.stage"):
        assert again.pending() == ["00000", "00001"]
        run_stage(again)
    assert again.processed == ["00000", "00001"]
    assert "annotations/phrases/00000.parquet: 100 bytes, its record says" in caplog.text
    assert "annotations/phrases/00001.parquet: missing" in caplog.text
    assert ToyStage(config).pending() == []
