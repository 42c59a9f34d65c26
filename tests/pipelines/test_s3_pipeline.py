"""The whole demo DAG on a 3-node Ray cluster over S3 equals a local-disk, local-executor run (issue 12).

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

The one thing not deterministic across processes is the `local` tokenizer: Hugging Face
`tokenizers`' BPE trainer gives tokens of equal frequency ids in hash order, which differs per
process. So the S3 run gets the local run's tokenizer under its root (the train stage then uses it
as it would its own from an earlier run); building it on S3 is tests/storage/test_s3.py's.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pipelines.demo import DEMO_EVAL_SET
from storage import DatasetLayout, iter_shard, join, read_json
from storage.fs import put_dir
from tasks.config import load_config
from tests.cluster import NODE_IP

pytestmark = pytest.mark.slow
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
