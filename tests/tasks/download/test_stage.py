"""The download stage's worker processes: a worker killed mid-shard (the OOM killer) costs only its shard."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from storage import DatasetLayout, read_table
from tasks.config import PipelineConfig
from tasks.demo.http_server import LoopbackServer, Reply, image_bytes
from tasks.download.stage import DownloadStage
from tasks.stage import run_stage

SHARD_SIZE, NUM_SHARDS = 3, 3


def _pids_connected_to(port: int) -> set[int]:
    """Other processes with a TCP connection to 127.0.0.1:``port`` open (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port:  # the remote end is the server
                inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                pids.add(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def _config(tmp_path: Path, server: LoopbackServer) -> PipelineConfig:
    image = image_bytes(320, 240)
    paths = [f"/{s}/{i}.jpg" for s in range(NUM_SHARDS) for i in range(SHARD_SIZE)]
    paths[1] = "/hang.jpg"  # in shard 0: the worker is killed while it waits here
    for p in paths:
        server.route(p, Reply(body=image))
    server.route("/hang.jpg", Reply(body=image, delay_s=120))
    urls = tmp_path / "urls.tsv"
    urls.write_text("".join(f"caption {i}\t{server.url(p)}\n" for i, p in enumerate(paths)))
    return PipelineConfig.model_validate({
        "dataset": {"root": str(tmp_path / "root")},
        "sources": [{"name": "t", "format": "cc3m", "paths": [str(urls)]}],
        "download": {"shard_size": SHARD_SIZE, "processes": 1, "concurrency": 2, "retries": 0,
                     "timeout_s": 150, "allow_private_addresses": True},
    })


def test_killed_worker_costs_only_its_shard_which_is_retried(tmp_path):
    with LoopbackServer() as server:
        config = _config(tmp_path, server)
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["summary"] = run_stage(DownloadStage(config))
            except BaseException as exc:  # the assertion below shows it
                outcome["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.time() + 120
        while server.hits["/hang.jpg"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        victims = _pids_connected_to(server.port)
        assert len(victims) == 1, victims  # the one worker process, mid-request
        server.route("/hang.jpg", Reply(body=image_bytes(320, 240)))  # the retry finds the image
        os.kill(victims.pop(), signal.SIGKILL)
        thread.join(timeout=180)

    assert "error" not in outcome, repr(outcome.get("error"))
    summary = outcome["summary"]
    assert summary["last_run"]["processed"] == [f"{s:05d}" for s in range(NUM_SHARDS)]
    assert summary["counts"]["ok"] == SHARD_SIZE * NUM_SHARDS and summary["failures"] == {}
    assert summary["shards"]["00000"]["counts"]["worker_died"] == 1  # accounted where it happened
    assert "worker_died" not in summary["shards"]["00001"]["counts"]
    assert server.hits["/hang.jpg"] == 2
    layout = DatasetLayout(config.dataset.root)
    assert [r["status"] for r in read_table(layout.images_table(0)).to_pylist()] == ["ok"] * SHARD_SIZE
