"""The pipeline on a real 3-node Ray cluster (issue 12): one module, so one cluster start serves all.

## A lost node costs only what it was running (item 4)

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

## The demo DAG on the cluster over S3 equals a local-disk, local-executor run

The reference run is the demo as `goldiclip demo` runs it: dataset root on the local disk, every
data stage in the flow's process, the vqa stage against a stand-in server in this process, Ray
Train on a local Ray. The cluster run puts `dataset.root` on S3 (moto's server on loopback) and
everything on the 3-node cluster of `ray start` processes (`local_cluster`: head, node_a, node_b,
1 CPU each, on 127.0.0.2): download, captions, phrases, boxes and shards on 2 Ray CPU actors each
(1 CPU per actor, so they land on two different nodes), the vqa stand-in started as a server
command on every node by Ray actors (`vqa.openai.server.placement: ray`), and Ray Train's worker
on a cluster node with its checkpoints on S3; the eval set is on S3 too.

Both runs read the same synthetic source from one loopback HTTP server (so the same URLs and
bytes) and use the same stand-in OWLv2 and scene-rules VQA answers. Equal: every stage's counts
and failures, the training shards' keys, the tokenizer, the run's name, its metric rows and
checkpoint weights, and the evaluation metrics. Bit-equal, because every step is deterministic
whichever process or node runs it: the stand-ins answer by rule, the shards stage shuffles by its
seed, and CPU training with one worker and no loader process gives the same weights to the bit
(the worker's torch threads come from `resources_per_worker`, the same in both runs). The cluster's
nodes are started without the AWS settings (as real nodes would be): only start_ray's forwarding
(runtime_env env_vars) lets the actors and the training worker reach the S3 server, and the test
checks that this is what happened. Everything the cluster run writes is on S3: nothing appears on
the local disk, and the Prefect artifacts name the `s3://` files.

The S3 run gets the local run's tokenizer under its root (the train stage then uses it as it would
its own from an earlier run), which saves building it twice; building it on S3 is
tests/storage/test_s3.py's, and that it is the same in every process tests/model/test_tokenizer.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.demo import DEMO_EVAL_SET
from storage import DatasetLayout, iter_shard, join, read_json, read_table
from storage.fs import put_dir
from tasks.config import load_config
from tasks.demo.http_server import LoopbackServer, Reply, image_bytes
from tests.cluster import NODE_IP

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


def test_joining_a_cluster_ships_the_drivers_code_and_storage_env(local_cluster, tmp_path):
    """A driver that joins the cluster by address: workers import the shipped copy of the project and
    see the driver's storage settings, which the nodes' own environment lacks (LocalCluster starts
    them without what start_ray forwards)."""
    forwarded = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "testing",
                 "FSSPEC_S3_ANON": "false", "HF_HUB_OFFLINE": "1"}
    driver = textwrap.dedent(f"""
        import json, ray
        from tasks.config import RayConfig
        from tasks.ray_actors import start_ray

        start_ray(RayConfig(address="{local_cluster.address}", node_ip_address="127.0.0.2"))

        @ray.remote(num_cpus=1)
        def imported_from():
            import os
            import model, storage, tasks
            return [m.__file__ for m in (model, storage, tasks)], {{k: os.environ.get(k) for k in {sorted(forwarded)!r}}}

        print(json.dumps(ray.get(imported_from.remote(), timeout=120)))
    """)
    env = {k: v for k, v in os.environ.items() if k not in forwarded}
    done = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240, env={**env, **forwarded})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files, seen = json.loads(done.stdout.strip().splitlines()[-1])
    checkout = str(Path(__file__).resolve().parents[2])
    assert len(files) == 3 and all("runtime_resources" in f and not f.startswith(checkout) for f in files)
    assert seen == forwarded  # the storage endpoint and credentials reached the worker


STAGES = ("download", "captions", "phrases", "boxes", "vqa", "shards", "train", "evaluate")
ACTOR_STAGES = ("download", "captions", "phrases", "boxes", "shards")
# The demo's scene-rules VQA stand-in as a server command (what `vllm serve` is for open30m).
STANDIN = f"{sys.executable} -m tasks.demo.openai_server --host {{host}} --port {{port}} --answers scene"


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory):
    """The demo's synthetic set, its HTTP server and the VQA stand-in server, for the module."""
    from tasks.demo.openai_server import OpenAIServer
    from tasks.demo.source import generate_demo_source, serve_directory, write_url_lists
    from tasks.demo.vqa_standin import scene_answers

    source_dir = tmp_path_factory.mktemp("demo-source")
    generate_demo_source(source_dir, num_images=40, num_eval_images=16)
    with serve_directory(source_dir) as base_url, OpenAIServer(answer_fn=scene_answers) as vqa:
        yield write_url_lists(source_dir, base_url), vqa.base_url


def _config(root: str, eval_pairs: str, source, vqa_url: str, owl_dir: str, **overrides):
    """The `demo` preset as `goldiclip demo` sets it up (pipelines/demo.py), made tiny."""
    return load_config(preset="demo", overrides={
        "dataset.root": root,
        "sources.0.paths": [str(source.url_list)],
        "captions.dreamlip_csvs": [str(p) for p in source.dreamlip_csvs],
        "boxes.model": owl_dir,
        "vqa.openai.base_urls": [vqa_url],
        "evaluate.datasets": [{"name": DEMO_EVAL_SET, "format": "jsonl", "path": eval_pairs}],
        "download.shard_size": 16, "download.processes": 1,
        "shards.shard_size": 16,
        "train.steps": 4, "train.warmup_steps": 1, "train.checkpoint_every": 2, "train.log_every": 1,
        "train.num_workers": 1, "train.batch_size_per_worker": 8, "train.loader_workers": 0,
        "train.report_every_s": 0,
        **overrides,
    })


def _on_the_cluster(cluster) -> dict:
    """Overrides that put every stage on ``cluster``: 2 CPU actors per data stage (1 CPU each: the
    nodes have 1 CPU, so two actors are on two nodes), a vqa stand-in server on every node, and
    Ray Train there (its 1 worker takes 1 CPU; the stages run one after another, each stage's
    actors and servers stopped before the next starts)."""
    actors = {"executor": "ray", "num_actors": 2, "num_gpus_per_actor": 0, "num_cpus_per_actor": 1}
    return {
        "ray.address": cluster.address, "ray.node_ip_address": NODE_IP,
        **{f"{stage}.actors": dict(actors) for stage in ACTOR_STAGES},
        "vqa.openai.server": {"command": STANDIN, "placement": "ray", "startup_timeout_s": 120, "stop_timeout_s": 5,
                              "ray": {"num_gpus_per_server": 0, "num_cpus_per_server": 0.25,
                                      "servers_per_node": 1}},
    }


def _node_environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)


def _started_environs(cluster, name: str) -> list[dict[str, str]]:
    """The environment of a node's `ray start` process and of its raylet and GCS (what its workers inherit)."""
    import psutil

    pids = [cluster.nodes[name].proc.pid]
    for pid in cluster.pids(name):
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).name() in ("raylet", "gcs_server"):
                pids.append(pid)
    return [_node_environ(pid) for pid in pids]


def _wall_seconds(summaries: dict[str, dict]) -> dict[str, float]:
    """Each stage's wall time, from when its summary was written after the previous one's."""
    times = [summaries[stage]["updated_at"] for stage in summaries]
    return {stage: round(b - a, 1) for stage, a, b in zip(list(summaries)[1:], times[:-1], times[1:], strict=True)}


def _train_keys(layout: DatasetLayout) -> list[str]:
    return sorted(s["__key__"] for n in layout.list_shards(layout.train_dir, ".tar")
                  for s in iter_shard(layout.train_tar(n), decode_json=False))


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from tasks.train.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)["model"]


def _newest_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created).data


def test_the_demo_dag_on_a_cluster_over_s3_equals_a_local_run(prefect_harness, s3_server, local_cluster, demo_source,
                                                               owl_dir, tmp_path, monkeypatch):
    import ray

    from pipelines.dag import goldiclip_pipeline
    from tasks.train.checkpoint import open_tokenizer
    from tasks.train.loop import read_metrics

    source, vqa_url = demo_source
    cluster = local_cluster
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would land here
    # The reference: local disk, local executors, Ray Train on a local Ray (the session's test Ray settings).
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    local_ray = os.path.join(tempfile.gettempdir(), f"goldiclip-ray-tests-{worker}")
    local = _config(str(tmp_path / "data"), str(source.eval_pairs), source, vqa_url, owl_dir,
                    **{"ray.num_cpus": 2, "ray.temp_dir": local_ray})
    root = s3_server.prefix("demo")
    put_dir(str(source.eval_pairs.parent), join(root, "eval_set"))
    on_s3 = _config(root, join(root, "eval_set", source.eval_pairs.name), source, vqa_url, owl_dir,
                    **_on_the_cluster(cluster))

    # The nodes were started without the S3 server's settings: only start_ray's forwarding reaches it.
    for name in cluster.nodes:
        environs = _started_environs(cluster, name)
        assert len(environs) >= 2 and not any("AWS_ENDPOINT_URL" in env for env in environs), name

    expected = goldiclip_pipeline(local)
    assert all(rec["node"]["node_id"] == "local" for rec in expected["download"]["shards"].values())
    ray.shutdown()  # leave the local Ray: the cluster run joins `ray.address`
    put_dir(join(local.dataset.root, "tokenizer"), join(root, "tokenizer"), last="tokenizer_config.json")
    started = time.monotonic()
    got = goldiclip_pipeline(on_s3)
    seconds = time.monotonic() - started
    print(f"cluster + S3 run of the demo DAG: {seconds:.1f} s; stage wall seconds after download "
          f"(local, cluster): {({k: (v, _wall_seconds(got)[k]) for k, v in _wall_seconds(expected).items()})}")

    assert list(got) == list(expected) == list(STAGES)
    for stage in STAGES:
        for field in ("num_shards_done", "counts", "failures"):
            assert got[stage][field] == expected[stage][field], (stage, field, seconds)
        assert got[stage]["last_run"]["skipped"] == []
    assert expected["download"]["counts"]["ok"] >= 36 and sum(expected["download"]["failures"].values()) >= 3
    assert expected["shards"]["num_shards_done"] >= 2 and expected["train"]["counts"]["steps"] == 4

    # Where it ran: each data stage's shards on the pool's actors on the cluster's nodes, as
    # `_stages/<stage>.json` on S3 records, two nodes for a stage of two or more shards at least.
    cluster_nodes = {node.node_id: name for name, node in cluster.nodes.items()}
    ran_on = {}
    for stage in ACTOR_STAGES:
        recorded = read_json(DatasetLayout(root).stage_summary(stage))
        ran_on[stage] = {cluster_nodes.get(rec["node"]["node_id"], rec["node"]["node_id"])
                         for rec in recorded["shards"].values()}
        assert ran_on[stage] <= set(cluster.nodes), (stage, ran_on[stage])
        assert len(recorded["actors"]) == 2 and {a["node_id"] for a in recorded["actors"]} <= set(cluster_nodes)
    assert max(len(nodes) for nodes in ran_on.values()) >= 2, ran_on
    print("nodes per stage:", ran_on)
    # The vqa stand-in ran as a server command on every node, and the flow's client spread the
    # requests over them (the reference run asked the one in-process stand-in).
    servers = got["vqa"]["server_nodes"]
    assert got["vqa"]["servers"] == "managed on ray" and expected["vqa"]["servers"] == [vqa_url]
    assert sorted(cluster_nodes[s["node_id"]] for s in servers) == sorted(cluster.nodes), servers
    assert sum(s["answered"] for s in servers) >= got["vqa"]["counts"]["answered"] > 0
    assert sum(s["answered"] > 0 for s in servers) >= 2, servers
    # The S3 settings the actors and the training worker used came from the driver, through the
    # job's runtime_env (each node's own environment has none, checked above).
    @ray.remote(num_cpus=0)
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == cluster.address
    assert ray.get([endpoint.options(resources={name: 0.01}).remote() for name in cluster.nodes]) == (
        [s3_server.endpoint] * len(cluster.nodes))

    # The same data, tokenizer, run, training history and weights.
    layout_s3, layout_local = DatasetLayout(root), DatasetLayout(local.dataset.root)
    assert _train_keys(layout_s3) == _train_keys(layout_local) != []
    assert (open_tokenizer(join(root, "tokenizer")).get_vocab()
            == open_tokenizer(join(local.dataset.root, "tokenizer")).get_vocab())
    assert got["train"]["run"] == expected["train"]["run"]
    assert got["train"]["run_dir"] == f"{root}/runs/{got['train']['run']}"
    assert got["train"]["checkpoint"] == f"{got['train']['run_dir']}/checkpoint_00000004"
    rows_s3, rows_local = read_metrics(got["train"]["run_dir"]), read_metrics(expected["train"]["run_dir"])
    assert [r["step"] for r in rows_s3] == [1, 2, 3, 4]
    drop = ("images_per_s",)  # wall-clock pace
    assert ([{k: v for k, v in r.items() if k not in drop} for r in rows_s3]
            == [{k: v for k, v in r.items() if k not in drop} for r in rows_local])
    weights_s3, weights_local = _weights(got["train"]["checkpoint"]), _weights(expected["train"]["checkpoint"])
    assert weights_s3.keys() == weights_local.keys()
    assert all(torch.equal(weights_s3[k], weights_local[k]) for k in weights_s3)

    # Evaluation of the S3 checkpoint on the S3 eval set: the local run's numbers.
    assert got["evaluate"]["checkpoint"] == got["train"]["checkpoint"]
    assert got["evaluate"]["metrics"] == expected["evaluate"]["metrics"]
    assert f"{DEMO_EVAL_SET}/conditioned/t2i_R@1" in got["evaluate"]["metrics"]
    assert read_json(join(root, "eval", "metrics.json"))["metrics"] == got["evaluate"]["metrics"]

    # Everything on S3, nothing on the local disk; the artifacts name the files there.
    fs = s3_server.fs()
    written = {p.removeprefix(f"{s3_server.bucket}/{root.rsplit('/', 1)[-1]}/") for p in fs.find(root)}
    for path in ("galleries/boxes.html", "galleries/vqa.html", "eval/metrics.json", "eval/paper_tables.md",
                 "_stages/evaluate.json", "tokenizer/tokenizer.json", "sources/manifest.json",
                 f"runs/{got['train']['run']}/plots/losses.png", f"runs/{got['train']['run']}/metrics.jsonl"):
        assert path in written, sorted(written)
    assert not any(".tmp-" in p for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # Nor in the working directories of the cluster's processes (the checkout they were started in)
    # or under the nodes' own directories.
    unique = root.rsplit("/", 1)[-1]  # the root's own name, in any local path an S3 URL was taken for
    assert not (Path(__file__).resolve().parents[2] / "s3:").exists()
    assert not list(Path(cluster.base_dir).glob("**/s3:")) and not list(Path(cluster.base_dir).glob(f"**/{unique}"))
    assert f"`{got['train']['checkpoint']}`" in _newest_artifact("train-report")
    assert f"`{root}/galleries/vqa.html`" in _newest_artifact("vqa-gallery")
    assert f"`{root}/eval/metrics.json`" in _newest_artifact("evaluate-paper-tables")
