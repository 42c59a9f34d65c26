"""A lost node costs only what it was running (issue 12, item 4), on a real 3-node Ray cluster.

The cluster (``local_cluster``: a head and the workers ``node_a``/``node_b`` started with
``ray start`` on this machine, 1 CPU each, on loopback) is the one the pipeline joins through
``ray.address``; a worker node is lost by SIGKILLing every process of it while work runs.

- Data stage: the download flow (Prefect, one task per shard) on 2 Ray CPU actors against a
  loopback HTTP server with latency. The node of an actor is killed while it holds a shard
  (its lease names the node): that shard is retried
  on the surviving nodes, every shard ends done exactly once (each record written once, every
  URL in exactly one table), nothing finished before the kill is redone, and
  ``_stages/download.json`` says which node ran each shard.
- Training: Ray Train with 2 workers (1 CPU each); once a checkpoint exists the node of one
  worker is killed. Its group restarts on the nodes left (FailureConfig) from the last
  checkpoint, and the step count goes on from there to ``train.steps``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from storage import DatasetLayout, read_json, read_table
from tasks.demo.http_server import LoopbackServer, Reply, image_bytes

pytestmark = pytest.mark.slow

SHARDS, PER_SHARD = 8, 12
STEPS, CHECKPOINT_EVERY = 8, 3


class RecordWatcher(threading.Thread):
    """Polls a stage's shard records and keeps every version of each one it sees, so a test can
    tell that a record, once written, was never written again (its shard never redone)."""

    def __init__(self, root: Path, stage: str):
        super().__init__(daemon=True)
        self.dir = root / "_stages" / stage
        self.seen: dict[str, list[dict]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            time.sleep(0.1)
        self.poll()

    def poll(self) -> None:
        for path in sorted(self.dir.glob("*.json")) if self.dir.exists() else []:
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):  # mid-rename
                continue
            versions = self.seen.setdefault(path.stem, [])
            if not versions or versions[-1] != rec:
                versions.append(rec)


def download_config(root: Path, url_list: Path, cluster) -> dict:
    return {
        "dataset": {"root": str(root)},
        "sources": [{"name": "loop", "format": "cc3m", "paths": [str(url_list)]}],
        "download": {
            "shard_size": PER_SHARD, "processes": 1, "concurrency": 2, "retries": 0, "timeout_s": 30,
            "allow_private_addresses": True,
            # Not pinned to a node: an actor whose node is lost comes back wherever a CPU is free.
            "actors": {"executor": "ray", "num_actors": 2, "num_cpus_per_actor": 1, "num_gpus_per_actor": 0,
                       "max_restarts": 3},
        },
        "ray": {"address": cluster.address, "node_ip_address": "127.0.0.2"},
    }


def test_a_lost_node_costs_only_its_running_shard(prefect_harness, local_cluster, tmp_path):
    from pipelines.download import download_flow

    cluster = local_cluster
    root = tmp_path / "data"
    with LoopbackServer(latency_s=(0.15, 0.25)) as server:
        body = image_bytes(64, 48)
        urls = [server.route(f"/{i:04d}.jpg", Reply(body=body)) for i in range(SHARDS * PER_SHARD)]
        url_list = tmp_path / "urls.tsv"
        url_list.write_text("".join(f"image {i}\t{u}\n" for i, u in enumerate(urls)))
        workers = {cluster.nodes[n].node_id: n for n in ("node_a", "node_b")}

        watcher = RecordWatcher(root, "download")
        killed: dict = {}

        leases = root / "_leases" / "download"

        def worker_leases() -> dict[str, str]:
            """Shards being processed on a worker node now (their lease names the node)."""
            held = {}
            for path in leases.glob("*.json") if leases.exists() else []:
                try:
                    node_id = json.loads(path.read_text()).get("node_id")
                except (OSError, ValueError):
                    continue
                if node_id in workers:
                    held[path.stem] = node_id
            return held

        def kill_a_busy_worker_node() -> None:
            # The node of an actor that is processing a shard loses all its processes.
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                held = worker_leases()
                if held:
                    shard, node_id = sorted(held.items())[0]
                    time.sleep(0.5)  # into its fetching
                    if worker_leases().get(shard) == node_id and shard not in watcher.seen:
                        name = workers[node_id]
                        cluster.kill_node(name, wait_dead=False)
                        killed.update(name=name, node_id=node_id, shard=shard, at=time.time())
                        return
                time.sleep(0.1)

        watcher.start()
        killer = threading.Thread(target=kill_a_busy_worker_node, daemon=True)
        killer.start()
        try:
            summary = download_flow(download_config(root, url_list, cluster))
        finally:
            killer.join(timeout=5)
            watcher.stop.set()
            watcher.join()

    assert killed, f"no shard ran on a worker node in time: {sorted(watcher.seen)}"
    dead, head = killed["node_id"], cluster.nodes["head"].node_id
    survivors = (set(workers) | {head}) - {dead}
    shards = [f"{i:05d}" for i in range(SHARDS)]

    # Every shard done, each record written exactly once: nothing was redone, before or after.
    assert summary["num_shards_done"] == SHARDS and sorted(summary["last_run"]["processed"]) == shards
    assert {s: len(v) for s, v in watcher.seen.items()} == dict.fromkeys(shards, 1), watcher.seen
    assert summary["counts"]["ok"] == SHARDS * PER_SHARD and summary["failures"] == {}
    # Which node ran which shard: in _stages/download.json as in each record.
    on_disk = read_json(str(root / "_stages" / "download.json"))
    ran_on = {s: rec["node"]["node_id"] for s, rec in on_disk["shards"].items()}
    assert ran_on == {s: v[0]["node"]["node_id"] for s, v in watcher.seen.items()}
    finished_at = {s: v[0]["finished_at"] for s, v in watcher.seen.items()}
    # What the lost node finished stays as it wrote it; whatever finished after it died ran on a
    # surviving node.
    assert all(finished_at[s] < killed["at"] for s in shards if ran_on[s] == dead)
    later = [s for s in shards if finished_at[s] > killed["at"]]
    assert later and all(ran_on[s] in survivors for s in later), (ran_on, finished_at, killed)
    # The shard in flight on the lost node was done again on a surviving node; no other URL was
    # requested twice (the download has no retries: nothing else was redone).
    in_flight = killed["shard"]
    assert ran_on[in_flight] in survivors and finished_at[in_flight] > killed["at"]
    layout = DatasetLayout(str(root))
    tables = {s: read_table(layout.images_table(s)).to_pylist() for s in shards}
    hits = {row["url"]: server.hits[row["url"][len(server.base_url):]] for rows in tables.values() for row in rows}
    assert sorted(hits) == sorted(urls)
    assert all(hits[r["url"]] == 1 for s, rows in tables.items() if s != in_flight for r in rows), hits
    assert all(hits[r["url"]] in (1, 2) for r in tables[in_flight])
    assert {r["status"] for rows in tables.values() for r in rows} == {"success"}
    # The lost actor came back on a surviving node (actors are not pinned to a node).
    actor_nodes = {a["node_id"] for a in summary["actors"] if "node_id" in a}
    assert len(summary["actors"]) == 2 and actor_nodes and actor_nodes <= survivors, summary["actors"]
    assert cluster.alive_nodes() == {"head", "node_a", "node_b"} - {killed["name"]}


def test_training_survives_the_loss_of_a_workers_node(prefect_harness, local_cluster, tmp_path):
    import torch
    from prefect import flow

    from pipelines.common import resolve_config
    from pipelines.train import run_training
    from tasks.demo.train_shards import write_train_shards
    from tasks.train.checkpoint import CHECKPOINT_FILE, latest_checkpoint
    from tasks.train.loop import STARTS_FILE, read_metrics
    from tests.pipelines.test_train_flow import BATCH, WORKERS, config_dict

    cluster = local_cluster
    root = tmp_path / "data"
    write_train_shards(root / "train", num_shards=2, per_shard=16)
    steps_log = tmp_path / "steps.jsonl"

    def log_step(step: int, rank: int) -> None:
        # Runs in the Ray Train workers: where each step ran (the log outlives the workers).
        import os

        import ray

        with open(steps_log, "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                "pid": os.getpid(), "t": time.time()}) + "\n")
        time.sleep(0.3)  # a step long enough for the kill to land mid-run

    config = config_dict(root, steps=STEPS, checkpoint_every=CHECKPOINT_EVERY, max_failures=2)
    config["ray"] = {"address": cluster.address, "node_ip_address": "127.0.0.2"}
    workers = {cluster.nodes[n].node_id: n for n in ("node_a", "node_b")}
    killed: dict = {}

    def kill_a_workers_node() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            runs = list((root / "runs").glob("goldiclip-*")) if (root / "runs").exists() else []
            rows = [json.loads(line) for line in steps_log.read_text().splitlines()] if steps_log.exists() else []
            checkpoint = latest_checkpoint(str(runs[0])) if runs else None
            on_workers = [r for r in rows if r["node_id"] in workers]
            if checkpoint and on_workers:
                name = workers[on_workers[-1]["node_id"]]
                cluster.kill_node(name, wait_dead=False)
                killed.update(name=name, node_id=on_workers[-1]["node_id"], at=time.time(), run_dir=runs[0])
                return
            time.sleep(0.2)

    @flow(name="train")
    def train_on_the_cluster(config: dict) -> dict:
        return run_training(resolve_config(config), on_step=log_step)

    killer = threading.Thread(target=kill_a_workers_node, daemon=True)
    killer.start()
    summary = train_on_the_cluster(config)
    killer.join(timeout=5)

    assert killed, "no checkpoint while a worker ran on a worker node"
    run_dir = Path(summary["run_dir"])
    assert run_dir == killed["run_dir"]
    rows = [json.loads(line) for line in steps_log.read_text().splitlines()]
    starts = read_json(str(run_dir / STARTS_FILE))
    # Two starts: from scratch, then from the checkpoint that was last before the node died.
    assert [s["step"] for s in starts][0] == 0 and len(starts) == 2, starts
    resumed = starts[1]["step"]
    assert starts[1]["restored_from"] and resumed % CHECKPOINT_EVERY == 0 and 0 < resumed < STEPS
    assert starts[1]["samples_seen"] == resumed * BATCH * WORKERS
    # Before the kill the lost node ran a worker; after it the group ran on the nodes left.
    first_group = {r["pid"] for r in rows if r["t"] < killed["at"]}
    restarted = [r for r in rows if r["pid"] not in first_group]
    assert any(r["node_id"] == killed["node_id"] for r in rows if r["pid"] in first_group)
    assert restarted and all(r["node_id"] != killed["node_id"] for r in restarted)
    assert min(r["step"] for r in restarted) == resumed + 1  # continued from the checkpoint, not step 1
    assert sorted({r["rank"] for r in restarted}) == list(range(WORKERS))
    # The metric history: each step once, 1..steps, and the final checkpoint at steps.
    assert [r["step"] for r in read_metrics(str(run_dir))] == list(range(1, STEPS + 1))
    assert summary["counts"]["steps"] == STEPS and summary["counts"]["samples_seen"] == STEPS * BATCH * WORKERS
    state = torch.load(Path(latest_checkpoint(str(run_dir))) / CHECKPOINT_FILE, map_location="cpu",
                       weights_only=True)
    assert state["step"] == STEPS
    assert cluster.alive_nodes() == {"head", "node_a", "node_b"} - {killed["name"]}
