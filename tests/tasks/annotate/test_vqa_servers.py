"""vqa servers on Ray (``vqa.openai.server.placement: ray``): real Ray actors on the local Ray node (127.0.0.2)
running the demo's loopback OpenAI-compatible server as their command, 0 GPUs each."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
from pydantic import ValidationError

from storage import DatasetLayout, read_table
from tasks.annotate.vqa import VqaStage
from tasks.annotate.vqa_backends import VqaServerUnavailable
from tasks.annotate.vqa_servers import RayServers
from tasks.config import ConfigError, PipelineConfig, VqaConfig
from tasks.demo.openai_server import OpenAIServer
from tasks.ray_actors import LOCAL_NODE_IP
from tasks.stage import run_stage
from tests.tasks.annotate.test_vqa import make_captions

STANDIN = f"{sys.executable} -m tasks.demo.openai_server --host {{host}} --port {{port}}"


def ray_server(*extra: str, **ray) -> dict:
    return {"command": " ".join([STANDIN, *extra]), "placement": "ray", "startup_timeout_s": 60,
            "stop_timeout_s": 5, "ray": {"num_gpus_per_server": 0, "num_cpus_per_server": 0.25,
                                         "servers_per_node": 2, **ray}}


def config(root, **openai) -> PipelineConfig:
    return PipelineConfig.model_validate({"dataset": {"root": str(root)}, "vqa": {"model": "m", "openai": openai}})


def rows(root) -> list[dict]:
    """The vqa table's rows, the server's address left out of error details."""
    return [{**r, "error": r["error"] and r["error"].split(" from ")[0]}
            for r in read_table(DatasetLayout(str(root)).annotation("vqa", "00000")).to_pylist()]


def group_alive(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that still run (zombies left to a non-reaping init do not count)."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(pid))
    return alive


def wait_gone(pgids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [g for g in pgids if group_alive(g)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_placement_settings_fail_fast():
    with pytest.raises(ValidationError, match="num_servers is for placement: local"):
        VqaConfig(openai={"server": {**ray_server(), "num_servers": 2}})
    with pytest.raises(ValidationError, match="host is for placement: local"):
        VqaConfig(openai={"server": {**ray_server(), "host": "0.0.0.0"}})
    # A dumped config (as the train stage hands it to its Ray workers) holds the defaults: it validates again.
    dumped = config("/data", server=ray_server()).model_dump(mode="json")
    assert PipelineConfig.model_validate(dumped).vqa.openai.server.placement == "ray"
    with pytest.raises(ValidationError, match="each server sees the GPUs Ray assigned"):
        VqaConfig(openai={"server": {**ray_server(), "env": {"CUDA_VISIBLE_DEVICES": "{index}"}}})
    with pytest.raises(ValidationError, match="needs servers_per_node"):
        VqaConfig(openai={"server": {**ray_server(), "ray": {"num_gpus_per_server": 0}}})
    with pytest.raises(ValidationError, match="placement: ray for servers on every GPU node"):
        VqaConfig(actors={"executor": "ray"}, openai={"server": ray_server()})


def test_ray_servers_answer_like_a_local_server_and_stop(tmp_path, ray_cluster):
    captions = [f"a red circle number {i}" for i in range(40)] + ["[[malformed]] a box", "[[400]] a pen", None]
    make_captions(tmp_path / "local", 0, captions)
    make_captions(tmp_path / "ray", 0, captions)
    with OpenAIServer() as local:
        run_stage(VqaStage(config(tmp_path / "local", base_urls=[local.base_url], concurrency=4)))
    stage = VqaStage(config(tmp_path / "ray", concurrency=4, server=ray_server("--latency", "0.02")))
    with stage.serving():
        servers = stage.servers
        assert isinstance(servers, RayServers) and len(servers.servers) == 2
        assert all(s["host"] == LOCAL_NODE_IP for s in servers.servers)  # the node's address, not 127.0.0.1
        assert len({s["port"] for s in servers.servers}) == 2 and servers.dead() is None
        summary = run_stage(stage)
        stats = stage.backend.stats
        groups = [s["pid"] for s in servers.servers]
        assert group_alive(groups[0]) and group_alive(groups[1])
    assert rows(tmp_path / "ray") == rows(tmp_path / "local")
    assert summary["counts"]["answered"] == 40 and summary["failures"] == {
        "unparseable": 1, "request_failed": 1, "no_short_caption": 1}
    answered = [stats[u]["answered"] for u in servers.base_urls]
    assert sum(answered) == 41 and min(answered) >= 3, stats  # both took a share; every 200 (not the [[400]])
    assert not any(s["marked_down"] for s in stats.values()), stats
    assert not wait_gone(groups, timeout=10), "server processes left after the stage"
    assert stage.servers is None and servers.actors == []


def test_a_server_killed_mid_shard_moves_its_requests_to_the_other(tmp_path, ray_cluster):
    n = 120
    make_captions(tmp_path, 0, [f"a blue square number {i}" for i in range(n)])
    # retries: 0, so a request lost with the killed server is a failure unless it moves to the live one
    stage = VqaStage(config(tmp_path, concurrency=2, retries=0, timeout_s=10, reprobe_s=0.5,
                            server=ray_server("--latency", "0.03")))
    with stage.serving():
        victim, survivor = stage.servers.servers
        backend = stage.backend  # the client the shard will use
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(summary=run_stage(stage)))
        runner.start()
        deadline = time.monotonic() + 60
        while backend.stats[victim["url"]]["answered"] < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(victim["pid"], signal.SIGKILL)  # the server process dies mid-shard; its actor lives on
        sent_at_kill = backend.stats[victim["url"]]["sent"]
        runner.join(60)
        assert not runner.is_alive()
        stats = backend.stats
        assert stage.servers.dead() is None  # one server left: the shard goes on
        groups = [victim["pid"], survivor["pid"]]
    summary = result["summary"]
    assert summary["counts"]["answered"] == n and summary["failures"] == {}
    assert all(r["error"] is None and r["qa"] for r in rows(tmp_path))
    dead, live = stats[victim["url"]], stats[survivor["url"]]
    assert dead["marked_down"] == 1 and dead["sent_while_down"] == 0
    # after the kill only the requests racing its discovery went to it (at most the 4 in flight, plus a few)
    assert dead["sent"] - sent_at_kill <= 6, (dead, sent_at_kill)
    assert dead["sent"] == dead["answered"] + dead["connection_errors"]
    assert dead["answered"] >= 10 and dead["answered"] + live["answered"] == n
    assert not wait_gone(groups, timeout=10)


def test_lost_actor_takes_its_server_along_and_all_servers_gone_fails_the_shard(tmp_path, ray_cluster):
    import ray

    make_captions(tmp_path, 0, [f"a cat {i}" for i in range(30)])
    stage = VqaStage(config(tmp_path, timeout_s=2, retries=1, backoff_s=0.01, server=ray_server()))
    with pytest.raises(VqaServerUnavailable, match="all 2 vqa servers gone"), stage.serving():
        first, second = stage.servers.servers
        ray.kill(stage.servers.actors[0])  # as when its node is lost: no stop() runs on the actor
        assert not wait_gone([first["pid"]], timeout=10), "a dead actor's server kept running"
        os.kill(second["pid"], signal.SIGKILL)
        run_stage(stage)
    assert stage.records.get("00000") is None
    assert not wait_gone([first["pid"], second["pid"]], timeout=10)


def test_no_node_with_the_gpus_asked_for_is_a_clear_error(tmp_path, ray_cluster):
    stage = VqaStage(config(tmp_path, server=ray_server(num_gpus_per_server=1, servers_per_node=None)))
    with pytest.raises(ConfigError, match="no alive Ray node takes a server .*num_gpus_per_server=1"), stage.serving():
        pass
    stage = VqaStage(config(tmp_path, server=ray_server(node_resource="vllm-node")))
    with pytest.raises(ConfigError, match="node_resource='vllm-node'"), stage.serving():
        pass
