"""Stages on a pool of real Ray actors (a local Ray, CPU actors, the tiny random OWLv2, spaCy).

The actors must write what a local run writes, each load the model once for all
the shards it takes, carry the stage's own exception types back to the flow,
survive a restart, retry a shard whose actor was lost (then fail it as an OSError),
and record where each shard ran.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from storage import DatasetLayout, read_table, write_table
from tasks.annotate.boxes import BoxesStage
from tasks.config import PipelineConfig
from tasks.ray_actors import ShardActorLost, ShardActorPool
from tasks.stage import ShardOutcome, Stage, run_stage
from tests.tasks.annotate.test_boxes import make_shard

SHARDS = 3
ACTORS = {"executor": "ray", "num_actors": 2, "num_gpus_per_actor": 0, "num_cpus_per_actor": 1}


def boxes_config(root, owl_dir, **actors) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "dataset": {"root": str(root)},
        "boxes": {"model": owl_dir, "batch_size": 2, "score_threshold": 0.0, "actors": {**ACTORS, **actors}},
    })


def boxes_rows(root, shard: str) -> list[dict]:
    return read_table(DatasetLayout(str(root)).annotation("boxes", shard)).to_pylist()


def assert_same_boxes(a: list[dict], b: list[dict]) -> None:
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for ra, rb in zip(a, b):
        assert [x["phrase"] for x in ra["boxes"]] == [x["phrase"] for x in rb["boxes"]]
        for xa, xb in zip(ra["boxes"], rb["boxes"]):
            for k in ("x0", "y0", "x1", "y1", "score"):
                assert xa[k] == pytest.approx(xb[k], rel=1e-4, abs=1e-4)


def test_flow_on_actors_writes_what_a_local_run_writes(prefect_harness, ray_cluster, tmp_path, owl_dir):
    from pipelines.boxes import boxes_flow

    for root in (tmp_path / "local", tmp_path / "ray"):
        for shard in range(SHARDS):
            make_shard(str(root), shard)
    local = run_stage(BoxesStage(boxes_config(tmp_path / "local", owl_dir, executor="local")))

    summary = boxes_flow(boxes_config(tmp_path / "ray", owl_dir))
    assert summary["counts"] == local["counts"] and summary["failures"] == local["failures"]
    for shard in (f"{i:05d}" for i in range(SHARDS)):
        assert_same_boxes(boxes_rows(tmp_path / "ray", shard), boxes_rows(tmp_path / "local", shard))

    actors = summary["actors"]
    assert len(actors) == 2 and len({a["pid"] for a in actors}) == 2
    assert sorted(s for a in actors for s in a["shards"]) == [f"{i:05d}" for i in range(SHARDS)]
    # Each actor that took a shard loaded the model once, on its own device.
    assert all(a["device"] == "cpu" for a in actors if a["shards"])

    again = boxes_flow(boxes_config(tmp_path / "ray", owl_dir))
    assert again["last_run"]["skipped"] == [f"{i:05d}" for i in range(SHARDS)] and "actors" not in again


def test_pool_keeps_exception_types_and_survives_an_actor_restart(ray_cluster, tmp_path, owl_dir):
    import ray

    root = tmp_path / "root"
    for shard in range(2):
        make_shard(str(root), shard)
    layout = DatasetLayout(str(root))
    with open(layout.annotation("phrases", "00001"), "wb") as f:
        f.write(b"PAR1 not a parquet file")
    config = boxes_config(root, owl_dir, num_actors=1, max_restarts=1)
    stage = BoxesStage(config)
    pool = ShardActorPool(stage, config.boxes.actors)
    try:
        # A corrupt input is the stage's error (not Ray's): the flow's retry rule sees its real type.
        with pytest.raises(pa.ArrowInvalid):
            pool.run_shard("00001")
        first_pid = pool.describe()[0]["pid"]
        ray.kill(pool.actors[0], no_restart=False)  # the process dies; Ray starts a fresh one
        result = pool.run_shard("00000")
        assert not result.skipped and result.counts["images"] == 5
        assert pool.describe()[0]["pid"] != first_pid
        assert stage.records.get("00000").counts == result.counts  # written by the actor, read here
        write_table(layout.annotation("phrases", "00001"), [], "phrases")
        assert pool.run_shard("00001").counts.get("images", 0) == 5
    finally:
        pool.close()


def test_vqa_generates_on_actors_what_it_generates_in_process(prefect_harness, ray_cluster, tmp_path):
    from pipelines.vqa import vqa_flow
    from tasks.demo.standin_models import save_tiny_phi3
    from tasks.annotate.vqa import VqaStage
    from tests.tasks.annotate.test_vqa import make_captions

    model_dir = str(save_tiny_phi3(tmp_path / "phi3-tiny"))
    captions = [["a red circle", "a star"], ["a blue square on a green background", "two circles"]]
    for root in (tmp_path / "local", tmp_path / "ray"):
        for shard, texts in enumerate(captions):
            make_captions(str(root), shard, texts)

    def config(root, **actors):
        return PipelineConfig.model_validate({"dataset": {"root": str(root)}, "vqa": {
            "backend": "transformers", "model": model_dir, "max_new_tokens": 8,
            "actors": {**ACTORS, **actors}}})

    local = run_stage(VqaStage(config(tmp_path / "local", executor="local")))
    summary = vqa_flow(config(tmp_path / "ray"))
    assert summary["counts"] == local["counts"] and summary["counts"]["generated_tokens"] > 0
    for shard in ("00000", "00001"):
        outputs = [read_table(DatasetLayout(str(root)).annotation("vqa", shard)).column("raw_output").to_pylist()
                   for root in (tmp_path / "local", tmp_path / "ray")]
        assert outputs[0] == outputs[1]  # greedy decoding: the same text
    assert sorted(s for a in summary["actors"] for s in a["shards"]) == ["00000", "00001"]


def test_phrases_on_cpu_actors_equal_a_local_run_and_record_their_node(prefect_harness, ray_cluster, tmp_path):
    """A CPU stage on Ray actors (each loads spaCy once): the same tables and counts as in process."""
    from pipelines.phrases import phrases_flow
    from tasks.annotate.phrases import PhrasesStage
    from tests.tasks.annotate.test_phrases import _tiny_root

    def config(root, executor):
        return PipelineConfig.model_validate({"dataset": {"root": str(root)}, "phrases": {
            "n_process": 1, "fields": ["long.LLA", "long.SV"],
            "actors": {"executor": executor, "num_actors": 2, "num_cpus_per_actor": 1}}})

    assert config(tmp_path, "ray").phrases.actors.num_gpus_per_actor == 0  # a CPU stage's default
    for root in (tmp_path / "local", tmp_path / "ray"):
        _tiny_root(root)
    local = run_stage(PhrasesStage(config(tmp_path / "local", "local")))
    summary = phrases_flow(config(tmp_path / "ray", "ray"))
    assert summary["counts"] == local["counts"] and summary["failures"] == local["failures"]
    for shard in ("00000", "00001"):
        assert (read_table(DatasetLayout(str(tmp_path / "ray")).annotation("phrases", shard)).to_pylist()
                == read_table(DatasetLayout(str(tmp_path / "local")).annotation("phrases", shard)).to_pylist())
    # Same fingerprints: the actors prepared their stage as the flow did (spaCy's version is in it).
    for shard in ("00000", "00001"):
        assert summary["shards"][shard]["fingerprint"] == local["shards"][shard]["fingerprint"]
    actors = {a["pid"]: a for a in summary["actors"]}
    for shard, rec in summary["shards"].items():  # each record names the actor that wrote it
        assert rec["node"]["ip"] == "127.0.0.2" and rec["node"]["node_id"] != "local"
        assert shard in actors[rec["node"]["pid"]]["shards"]
    assert all(rec["node"]["node_id"] == "local" for rec in local["shards"].values())


class DyingStage(Stage):
    """Each process call appends to a side file next to the root; the first two calls of shard
    00000 kill their process, every call of shard 00001 does."""

    name = "dying"
    task_name = "die_or_count"
    deaths = 2

    def __init__(self, config):
        super().__init__(config)
        self.side_file = os.path.join(os.path.dirname(config.dataset.root), "calls.txt")

    @property
    def section(self):
        return self.config.dataset

    def list_shards(self):
        return ["00000", "00001"]

    def process(self, shard):
        with open(self.side_file, "a") as f:
            f.write(f"{shard} {os.getpid()}\n")
        calls = sum(1 for line in open(self.side_file) if line.startswith(shard))
        if shard == "00001" or calls <= self.deaths:  # shard 00001 always kills its actor
            os._exit(1)
        return ShardOutcome()


def test_a_shard_whose_actor_is_lost_is_retried_then_fails_as_an_os_error(ray_cluster, tmp_path):
    """Ray's own task retry, then the pool's retry on another actor; past the bound: ShardActorLost."""
    from tasks.config import ActorPoolConfig

    side = tmp_path / "calls.txt"
    config = PipelineConfig.model_validate({"dataset": {"root": str(tmp_path / "root")}})
    stage = DyingStage(config)
    pool = ShardActorPool(stage, ActorPoolConfig(**ACTORS, max_restarts=1))
    try:
        # Actor A dies twice (Ray restarts it once and retries the call), then the pool retries on B.
        result = pool.run_shard("00000")
        assert not result.skipped
        calls = [line.split() for line in side.read_text().splitlines()]
        assert [c[0] for c in calls] == ["00000"] * 3 and len({c[1] for c in calls}) == 3
        assert result.node["pid"] == int(calls[-1][1])
        assert stage.records.get("00000").node["pid"] == int(calls[-1][1])  # recorded once, by the survivor
        with pytest.raises(ShardActorLost) as lost:  # every actor it reaches dies: an OSError for the flow
            pool.run_shard("00001")
        assert isinstance(lost.value, OSError) and stage.records.get("00001") is None
    finally:
        pool.close()


def test_vqa_on_actors_needs_the_in_process_backend():
    with pytest.raises(ValueError, match="vqa.backend: transformers"):
        PipelineConfig.model_validate({"dataset": {"root": "x"}, "vqa": {"actors": {"executor": "ray"}}})


def test_an_actor_that_cannot_fit_on_the_local_ray_fails_fast(ray_cluster, tmp_path, owl_dir):
    from tasks.config import ConfigError
    from tasks.ray_actors import shard_runner

    stage = BoxesStage(boxes_config(tmp_path, owl_dir, num_gpus_per_actor=1))  # the local Ray has no GPU
    with pytest.raises(ConfigError, match="boxes.actors: each actor asks for 1 GPU, the local Ray has 0"):
        shard_runner(stage)
    local = BoxesStage(boxes_config(tmp_path, owl_dir, executor="local"))
    assert shard_runner(local) is local


def test_local_ray_stays_on_loopback(ray_cluster):
    """Ray rewrites 127.0.0.1 to the host's address; the project's local Ray pins 127.0.0.2 instead."""
    import ipaddress

    import psutil
    import ray

    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.2"}
    ray.get(ray.remote(lambda: None).remote(), timeout=60)  # the driver has talked to a worker
    peers = [ipaddress.ip_address(c.raddr.ip) for c in psutil.Process().net_connections(kind="inet") if c.raddr]
    peers = [getattr(ip, "ipv4_mapped", None) or ip for ip in peers]  # ::ffff:127.0.0.2 is 127.0.0.2
    assert peers and all(ip.is_loopback for ip in peers), peers
