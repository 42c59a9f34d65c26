"""The download stage: a worker killed mid-shard (the OOM killer) costs only its shard; per-URL accounting."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from storage import DatasetLayout, read_table
from tasks.config import ConfigError, DownloadConfig, PipelineConfig, load_config
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
    paths[4] = "/throttled.jpg"  # in shard 1: a 429 asking for a 1 s wait, then the image
    paths[7] = "/missing.jpg"  # in shard 2: never routed, a 404
    for p in paths[:7] + paths[8:]:
        server.route(p, Reply(body=image))
    server.route("/hang.jpg", Reply(body=image, delay_s=120))
    server.route("/throttled.jpg", Reply(body=image, fail_first=1, fail_status=429, fail_headers={"Retry-After": "1"}))
    urls = tmp_path / "urls.tsv"
    urls.write_text("".join(f"caption {i}\t{server.url(p)}\n" for i, p in enumerate(paths)))
    return PipelineConfig.model_validate({
        "dataset": {"root": str(tmp_path / "root")},
        "sources": [{"name": "t", "format": "cc3m", "paths": [str(urls)]}],
        "download": {"shard_size": SHARD_SIZE, "processes": 1, "concurrency": 2, "retries": 1,
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
    assert summary["counts"]["ok"] == SHARD_SIZE * NUM_SHARDS - 1 and summary["failures"] == {"http_404": 1}
    shards = {s: summary["shards"][s]["counts"] for s in ("00000", "00001", "00002")}
    assert shards["00000"]["worker_died"] == 1  # accounted where it happened
    assert "worker_died" not in shards["00001"] and "worker_died" not in shards["00002"]
    assert shards["00001"]["retry_after"] == 1 and "retry_after" not in shards["00000"]
    assert server.hits["/hang.jpg"] == 2
    # The per-URL table keeps the status, the reason and the number of requests of each URL.
    layout = DatasetLayout(config.dataset.root)
    rows = {urlsplit(r["url"]).path: r for s in range(NUM_SHARDS)
            for r in read_table(layout.images_table(s)).to_pylist()}
    assert [rows[p]["status"] for p in ("/0/0.jpg", "/hang.jpg", "/0/2.jpg")] == ["success"] * 3
    assert (rows["/hang.jpg"]["attempts"], rows["/throttled.jpg"]["attempts"]) == (1, 2)
    missing = rows["/missing.jpg"]
    assert (missing["status"], missing["error_message"], missing["http_status"], missing["attempts"]) == (
        "failed_to_download", "http_404", 404, 1)


def test_memory_and_retry_settings_come_from_the_config_file():
    """Issue 13 items 3 and 5: the pixel cap, decode threads and the Retry-After cap are configuration."""
    assert DownloadConfig().max_pixels <= 89_478_485  # Pillow's own cap, or smaller
    config = load_config(preset="demo", overrides={"download.max_pixels": 1_000_000, "download.decode_threads": 1,
                                                   "download.max_retry_after_s": 5})
    assert (config.download.max_pixels, config.download.decode_threads, config.download.max_retry_after_s) == (
        1_000_000, 1, 5)
    for key, bad in [("max_pixels", 0), ("max_pixels", 10**9), ("decode_threads", 0), ("max_retry_after_s", -1)]:
        with pytest.raises(ConfigError, match=f"download.{key}"):
            load_config(preset="demo", overrides={f"download.{key}": bad})
    # Tuning the threads redoes nothing; the cap decides which images are kept, so it does.
    base = DownloadConfig().fingerprint_payload()
    assert DownloadConfig(decode_threads=7).fingerprint_payload() == base
    assert DownloadConfig(max_pixels=1000).fingerprint_payload() != base
