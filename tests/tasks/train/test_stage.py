"""The train stage's contract without Ray: config checks, the run's name, skip-if-done and force."""

from __future__ import annotations

import json

import pytest
import torch

from storage import DatasetLayout, join, open_fs, read_json
from storage.fs import atomic_write_bytes, exists
from tasks.config import ConfigError, PipelineConfig
from tasks.demo.train_shards import write_train_shards
from tasks.stage import SINGLE_UNIT, run_stage
from tasks.train.checkpoint import CHECKPOINT_FILE, checkpoint_dir_name, save_checkpoint
from tasks.train.loop import METRICS_FILE
from tasks.train.optim import build_optimizer, build_scheduler
from tasks.train.stage import TrainStage, planned_run, run_name


def _config(root, **train) -> PipelineConfig:
    return PipelineConfig.model_validate({"dataset": {"root": str(root)}, "train": {
        "preset": "debug", "tokenizer": "local", "local_tokenizer_vocab_size": 128, "steps": 5, "warmup_steps": 1,
        "num_workers": 1, "batch_size_per_worker": 4, "use_gpu": False, **train}})


def test_a_bad_config_or_no_shards_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainStage(_config(tmp_path, warmup_steps=5)).prepare()
    with pytest.raises(ConfigError, match="unknown VisionConfig field"):
        TrainStage(_config(tmp_path, model_overrides={"vision": {"widht": 64}})).prepare()
    with pytest.raises(ValueError, match="run the shards stage first"):
        TrainStage(_config(tmp_path)).prepare()


def test_a_finished_run_is_counted_skipped_and_redone_when_forced(tmp_path, model, monkeypatch):
    def no_ray(_):
        raise AssertionError("a finished run must not start Ray")

    monkeypatch.setattr("tasks.train.stage.start_ray", no_ray)
    root = tmp_path / "data"
    write_train_shards(root / "train", num_shards=2, per_shard=8)
    config = _config(root)
    stage = TrainStage(config)
    stage.prepare()
    inputs = stage.upstream_fingerprint(SINGLE_UNIT)
    assert stage.run == run_name(config, inputs) == planned_run(config)
    assert stage.run_dir == str(root / "runs" / stage.run)
    assert stage.tokenizer == str(root / "tokenizer") and exists(join(stage.tokenizer, "tokenizer.json"))
    assert run_name(_config(root, lr=1e-2), inputs) != stage.run  # what is trained names the run
    assert run_name(_config(root, log_every=7), inputs) == stage.run  # how fast or verbose: same run

    # The run reached train.steps earlier but its record is gone: the stage counts it, trains nothing.
    optimizer = build_optimizer(model, config.train, torch.device("cpu"))
    data = {"step": 5, "samples_seen": 20, "samples_read": 21, "seed": 0, "errors": {"bad_image": 1, "bad_tar": 0}}
    save_checkpoint(join(stage.run_dir, checkpoint_dir_name(5)), model=model, optimizer=optimizer,
                    scheduler=build_scheduler(optimizer, config.train), step=5, data=data, tokenizer=stage.tokenizer)
    rows = [{"step": s, "lr": 1e-3, "loss/total": 2.0 / s, "log_var/ret": 0.0, "weight/ret": 0.5} for s in (1, 5)]
    atomic_write_bytes(join(stage.run_dir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert stage.resume_step() == 5 and stage.pending() == [SINGLE_UNIT]

    summary = run_stage(stage)
    assert summary["counts"] == {"steps": 5, "samples_seen": 20, "samples_read": 21}
    assert summary["failures"] == {"corrupt_bad_image": 1}
    assert summary["last_run"] == {"processed": [SINGLE_UNIT], "skipped": []} and summary["num_shards_done"] == 1
    assert summary["run"] == stage.run and summary["checkpoint"] == join(stage.run_dir, "checkpoint_00000005")
    assert set(summary["plots"]) == {"losses", "log_vars", "weights", "schedule"}
    assert all(open_fs(url)[0].size(url) > 1000 for url in summary["plots"].values())
    assert read_json(str(root / "_stages/train.json")) == summary

    again = run_stage(TrainStage(config))
    assert again["last_run"] == {"processed": [], "skipped": [SINGLE_UNIT]} and again["counts"] == summary["counts"]
    # A changed config is another run: pending, and nothing of this one is reused.
    changed = TrainStage(_config(root, lr=1e-2))
    changed.prepare()
    assert changed.pending() == [SINGLE_UNIT] and changed.resume_step() == 0

    # The record vouches for the last checkpoint: gone, the unit is pending again.
    fs, checkpoint = open_fs(join(summary["checkpoint"], CHECKPOINT_FILE))
    fs.mv(checkpoint, checkpoint + ".moved")
    stage = TrainStage(config)
    stage.prepare()
    assert stage.pending() == [SINGLE_UNIT]
    fs.mv(checkpoint + ".moved", checkpoint)
    assert stage.pending() == []

    # force: `discard` drops the record and the run, so the run restarts from step 0.
    stage.discard(SINGLE_UNIT)
    assert stage.records.get(SINGLE_UNIT) is None and not exists(stage.run_dir) and stage.resume_step() == 0
    with pytest.raises(AssertionError, match="must not start Ray"):
        stage.run_shard(SINGLE_UNIT, force=True)


def test_rewritten_shards_name_a_new_run_identical_ones_the_same(tmp_path):
    """The run follows the bytes of the training shards, as the shards stage recorded them (#13 item 8)."""
    from storage import ShardRecord, StageRecords
    from storage.integrity import file_digest

    root = tmp_path / "data"
    urls = write_train_shards(root / "train", num_shards=2, per_shard=4)
    config = _config(root)
    records = StageRecords(DatasetLayout(str(root)), "shards")

    def record_shards():
        for url in urls:
            shard = url.rsplit("/", 1)[-1].removesuffix(".tar")
            records.put(ShardRecord(shard, "fp", outputs={"tar": {"path": f"train/{shard}.tar",
                                                                   **file_digest(url).as_dict()}}))

    record_shards()
    first = planned_run(config)
    write_train_shards(root / "train", num_shards=2, per_shard=4)  # the same samples, the same bytes
    record_shards()
    assert planned_run(config) == first
    write_train_shards(root / "train", num_shards=2, per_shard=5)  # other samples
    record_shards()
    assert planned_run(config) != first
