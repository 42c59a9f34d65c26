"""The pipeline overview from storage: done/total, failures, pace and time left, hand-checkable."""

from __future__ import annotations

from storage import DatasetLayout, ShardRecord, StageRecords, join, write_json
from tasks.config import PipelineConfig
from tasks.overview import format_duration, overview_table, pipeline_overview


def test_pace_and_time_left_of_a_stage_part_way_through(tmp_path):
    config = PipelineConfig.model_validate({"dataset": {"root": str(tmp_path / "root")}, "train": {"steps": 500}})
    layout = DatasetLayout(config.dataset.root)
    write_json(join(layout.root, "sources", "manifest.json"), {"num_shards": 5})
    download = StageRecords(layout, "download")
    for i, finished_at in enumerate([1000.0, 1010.0, 1020.0]):  # a shard every 10 s, 100 URLs each
        download.put(ShardRecord(f"{i:05d}", "fp", {"urls": 100, "ok": 98}, {"http_404": 2}, 9.0,
                                 finished_at=finished_at))
    rows = {r.stage: r for r in pipeline_overview(config)}

    d = rows["download"]
    assert (d.done, d.total, d.state) == (3, 5, "in progress")
    assert d.failures == {"http_404": 6}
    assert d.rate == 10.0 and d.rate_unit == "urls/s"  # 200 URLs finished over the last 20 s
    assert d.eta_s == 20.0  # 2 shards left at one per 10 s
    assert rows["captions"].state == "not started" and rows["captions"].total == 5
    assert rows["shards"].total is None  # its output count is known once every input is there
    assert (rows["train"].done, rows["train"].total, rows["train"].unit) == (0, 500, "steps")

    table = {r["stage"]: r for r in overview_table(list(rows.values()))}
    assert table["download"]["done"] == "3/5 shards" and table["download"]["time left"] == "20s"
    assert table["download"]["rate"] == "10.0 urls/s" and table["shards"]["done"] == "0/? shards"
    assert "download-counts" in table["download"]["artifacts"]


def test_training_progress_comes_from_the_newest_runs_metrics(tmp_path):
    config = PipelineConfig.model_validate({"dataset": {"root": str(tmp_path / "root")}, "train": {"steps": 100}})
    run_dir = tmp_path / "root" / "runs" / "goldiclip-debug-abc"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 20}\n{"step": 40}\n')
    train = {r.stage: r for r in pipeline_overview(config)}["train"]
    assert (train.done, train.total, train.state) == (40, 100, "in progress")


def test_durations_read_like_a_person_writes_them():
    assert [format_duration(s) for s in (None, 7, 125, 7300)] == ["-", "7s", "2m05s", "2h01m"]
