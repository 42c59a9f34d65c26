"""The train flow end to end: a real local Ray cluster (2 CPU workers), the real Prefect test API.

One Ray cluster serves the module. Covered: checkpoints, metrics, plots and artifacts (the
`train-report` read back from the API: re-published while training runs, its plots inline); a worker
failure retried by FailureConfig (an `on_step` hook injected into the workers makes rank 1 raise
once); SIGKILL of the driver after a checkpoint, then a rerun of the flow resumes from the last
checkpoint with the same step and data position, and the loss history continues.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from PIL import Image

from storage import read_json
from tasks.demo.train_shards import write_train_shards
from tasks.stage import SINGLE_UNIT
from tasks.train.checkpoint import CHECKPOINT_FILE, latest_checkpoint
from tasks.train.loop import STARTS_FILE, read_metrics
from tasks.train.report import HEALTH, MAX_REPORT_BYTES, is_health_metric

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BATCH, WORKERS = 4, 2


def config_dict(root: Path, **train) -> dict:
    return {
        "dataset": {"root": str(root)},
        "train": {
            "preset": "debug", "tokenizer": "local", "local_tokenizer_vocab_size": 256,
            "batch_size_per_worker": BATCH, "captions_per_image": 2, "num_local_views": 2,
            "warmup_steps": 2, "lr": 1e-3, "num_workers": WORKERS, "use_gpu": False,
            "resources_per_worker": {"CPU": 1}, "loader_workers": 0, "shuffle_buffer": 8, "log_every": 1,
            "num_to_keep": 2, "max_failures": 2, **train,
        },
        "ray": {"num_cpus": 2},
    }


def run_dir_of(summary: dict) -> Path:
    return Path(summary["run_dir"])


def test_flow_trains_checkpoints_plots_and_survives_a_worker_failure(prefect_harness, ray_cluster, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pipelines.common import resolve_config
    from pipelines.train import run_training, train_flow

    root = tmp_path / "data"
    write_train_shards(root / "train", num_shards=2, per_shard=16)
    marker = tmp_path / "failure-injected"

    def fail_once_on_rank_1(step: int, rank: int) -> None:
        # Runs in the Ray workers (a closure: cloudpickle ships it by value); the marker file
        # outlives the worker group, so the restarted workers go on.
        if step == 4 and rank == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected failure at step 4 on rank 1")

    @flow(name="train")
    def train_with_a_worker_failure(config: dict) -> dict:
        return run_training(resolve_config(config), on_step=fail_once_on_rank_1)

    config = config_dict(root, steps=6, checkpoint_every=3, report_every_s=0)  # a train-report at every row
    summary = train_with_a_worker_failure(config)

    run_dir = run_dir_of(summary)
    assert summary["counts"] == {"steps": 6, "samples_seen": 6 * BATCH * WORKERS, "samples_read": 6 * BATCH * WORKERS}
    assert summary["failures"] == {} and summary["last_run"]["processed"] == [SINGLE_UNIT]
    assert summary["run"] == run_dir.name and read_json(str(root / "_stages/train.json")) == summary
    # rank 1 raised at step 4; Ray restarted the workers from the step-3 checkpoint
    assert marker.exists()
    starts = read_json(str(run_dir / STARTS_FILE))
    assert [s["step"] for s in starts] == [0, 3] and starts[1]["restored_from"]
    assert [r["step"] for r in read_metrics(str(run_dir))] == [1, 2, 3, 4, 5, 6]
    state = torch.load(Path(summary["checkpoint"]) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 6 and state["data"]["samples_seen"] == 6 * BATCH * WORKERS
    assert {"optimizer", "scheduler", "model"} <= set(state)
    for group in ("losses", "log_vars", "weights"):
        assert (run_dir / "plots" / f"{group}.png").stat().st_size > 1000
    assert (root / "tokenizer" / "tokenizer.json").exists()
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
        reports = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-report"])))
    assert {"train-progress", "train-metrics", "train-report"} <= keys
    # The report was published while training ran, then once more at the end, its plots inline.
    reports = sorted(reports, key=lambda a: a.created)
    live = [re.search(r"_training: step (\d+) of 6", a.data) for a in reports[:-1]]
    assert len(live) >= 2 and all(live), [a.data[:200] for a in reports]
    assert [int(m.group(1)) for m in live] == sorted({int(m.group(1)) for m in live})  # one version per new row
    final = reports[-1].data
    assert "_finished: step 6 of 6_" in final and len(final.encode()) < MAX_REPORT_BYTES
    inline = dict(re.findall(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", final))
    rows = read_metrics(str(run_dir))
    expected = {"losses", "log_vars", "weights", "schedule"} | ({HEALTH} if any(map(is_health_metric, rows[-1])) else set())
    assert set(inline) == expected
    for group, data in inline.items():
        png = base64.b64decode(data)
        assert png == (run_dir / "plots" / f"{group}.png").read_bytes()  # the file on storage, inline
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            assert image.format == "PNG" and image.width >= 500

    again = train_flow(config)  # same config: the finished run is skipped, not redone
    assert again["last_run"]["skipped"] == [SINGLE_UNIT] and again["counts"]["steps"] == 6
    assert again["run"] == summary["run"] and again["checkpoint"] == summary["checkpoint"]


def test_sigkill_of_the_driver_then_rerun_resumes(prefect_harness, ray_cluster, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from pipelines.train import train_flow

    root = tmp_path / "data"
    write_train_shards(root / "train", num_shards=2, per_shard=16)
    # The killed driver runs its own Ray; a separate temp dir keeps it apart from this module's.
    config = config_dict(root, steps=14, checkpoint_every=3)
    config["ray"]["temp_dir"] = os.path.join(tempfile.gettempdir(), "goldiclip-ray-killed")
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--config", str(config_file)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    runs = root / "runs"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            run_dirs = list(runs.glob("goldiclip-*")) if runs.exists() else []
            if run_dirs and latest_checkpoint(str(run_dirs[0])):
                break
            time.sleep(0.5)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert run_dirs, "no checkpoint before the deadline"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    run_dir = run_dirs[0]
    # Ray's worker processes outlive the driver by a few seconds (until fate-sharing reaps them) and
    # may finish one more checkpoint: wait until the run directory stops changing.
    seen, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:
        now = (latest_checkpoint(str(run_dir)), len(read_metrics(str(run_dir))))
        if now == seen:
            break
        seen = now
        time.sleep(4)
    killed_at = torch.load(Path(latest_checkpoint(str(run_dir))) / CHECKPOINT_FILE,
                           weights_only=True)["step"]
    assert 3 <= killed_at < 14
    before = {r["step"]: r for r in read_metrics(str(run_dir))}

    summary = train_flow(str(config_file))

    assert run_dir_of(summary) == run_dir  # the same run name: resumed, not restarted
    starts = read_json(str(run_dir / STARTS_FILE))
    assert starts[-1]["step"] == killed_at and starts[-1]["restored_from"]
    assert starts[-1]["samples_seen"] == killed_at * BATCH * WORKERS
    assert summary["counts"]["steps"] == 14 and summary["counts"]["samples_seen"] == 14 * BATCH * WORKERS
    rows = read_metrics(str(run_dir))
    assert [r["step"] for r in rows] == list(range(1, 15))  # no restart from step 0, no duplicates
    for step in range(1, killed_at + 1):  # the history up to the checkpoint is kept as it was
        assert rows[step - 1]["loss/total"] == before[step]["loss/total"]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
