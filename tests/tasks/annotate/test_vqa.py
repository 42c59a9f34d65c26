"""VQA stage: the openai backend against a loopback OpenAI-compatible server (every failure path,
concurrency, retries, structured output, managed server mode) and the transformers backend
with a tiny random Phi3."""

from __future__ import annotations

import os
import sys
import time

import pytest

from storage import DatasetLayout, ShardRecord, StageRecords, read_table, write_table
from storage.tables import VQA
from tasks.config import PipelineConfig, VqaConfig
from tasks.stage import run_stage
from tasks.annotate.vqa import VqaStage
from tasks.annotate.vqa_backends import ManagedServers, OpenAIBackend, VqaServerUnavailable
from tasks.annotate.vqa_parse import QA_SCHEMA, build_messages
from tasks.demo.http_server import closed_port
from tasks.demo.openai_server import OpenAIServer

FAST = {"timeout_s": 0.5, "retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.05}


def make_captions(root: str, shard: int, captions: list[str | None]) -> list[str]:
    """A captions table whose ShareGPT4V short caption (short[1]) is each of ``captions``, and its record."""
    layout = DatasetLayout(str(root))
    keys = [f"{shard:05d}{i:04d}" for i in range(len(captions))]
    rows = [{"key": k, "url": f"http://x/{k}.jpg", "raw": "raw", "short": ["ib", c or "", "lla"],
             "long": ["", "", ""]} for k, c in zip(keys, captions)]
    write_table(layout.annotation("captions", shard), rows, "captions")
    StageRecords(layout, "captions").put(ShardRecord(f"{shard:05d}", "fp-captions"))
    return keys


def config(root, **vqa) -> PipelineConfig:
    return PipelineConfig.model_validate({"dataset": {"root": str(root)}, "vqa": vqa})


def vqa_rows(root, shard="00000") -> dict[str, dict]:
    table = read_table(DatasetLayout(str(root)).annotation("vqa", shard))
    assert table.schema.equals(VQA, check_metadata=False)
    return {r["key"]: r for r in table.to_pylist()}


@pytest.fixture
def server():
    with OpenAIServer(stall_s=1) as s:
        yield s


def test_every_answer_shape_and_failure_is_counted_not_fatal(tmp_path, server):
    caps = ["a red circle", "[[500]] a cat", "[[flaky]] a blue square", "[[429]] a dog", "[[stall]] a car",
            "[[malformed]] a box", "[[truncated]] a green star", "[[qa-text]] two birds", "[[fenced]] a tree",
            "[[no-qmark]] a hat", "[[bad-body]] a cup", "[[400]] a pen", None]
    keys = make_captions(tmp_path, 0, caps)
    cfg = config(tmp_path, model="phi", openai={"base_urls": [server.base_url], **FAST})
    summary = run_stage(VqaStage(cfg))
    assert summary["failures"] == {"request_failed": 4, "unparseable": 1, "no_valid_pairs": 1, "no_short_caption": 1}
    assert summary["counts"]["images"] == 13 and summary["counts"]["answered"] == 6
    assert summary["counts"]["pairs"] == 3 + 3 + 3 + 2 + 3 + 3 and summary["counts"]["truncated"] == 1
    rows = vqa_rows(tmp_path)
    assert list(rows) == keys
    ok = rows[keys[0]]
    assert ok["error"] is None and ok["qa"][0] == {"question": "What is in the image?", "answer": "a red circle"}
    assert '"qa"' in ok["raw_output"]
    for i in (1, 4, 10, 11):  # 500 x3, stall x3, bad body, 400
        assert rows[keys[i]]["error"].startswith("request_failed: ") and rows[keys[i]]["raw_output"] is None
    assert "HTTP 500" in rows[keys[1]]["error"] and "timeout" in rows[keys[4]]["error"]
    assert "HTTP 400" in rows[keys[11]]["error"]
    assert rows[keys[5]]["error"] == "unparseable" and rows[keys[5]]["raw_output"].startswith("{qa:")
    assert rows[keys[9]]["error"] == "no_valid_pairs"
    assert rows[keys[12]]["error"] == "no_short_caption"
    attempts = {m: sum(1 for b in server.requests if m in b["messages"][0]["content"])
                for m in ("[[500]]", "[[flaky]]", "[[429]]", "[[stall]]", "[[400]]", "[[bad-body]]")}
    assert attempts == {"[[500]]": 3, "[[flaky]]": 2, "[[429]]": 2, "[[stall]]": 3, "[[400]]": 1, "[[bad-body]]": 1}


def test_request_carries_the_prompt_schema_and_limits(tmp_path, server):
    make_captions(tmp_path, 0, ["a red circle"])
    run_stage(VqaStage(config(tmp_path, model="phi", temperature=0.0, openai={"base_urls": [server.base_url]})))
    (body,) = server.requests
    assert body["model"] == "phi" and body["max_tokens"] == 500 and body["temperature"] == 0.0
    assert body["messages"] == build_messages("a red circle")
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "qa_pairs", "schema": QA_SCHEMA, "strict": True}}
    assert "structured_outputs" not in body


def test_vllm_structured_outputs_dialect(server):
    backend = OpenAIBackend(VqaConfig(model="m", structured_output="structured_outputs"), [server.base_url])
    assert backend.complete([build_messages("a dog")])[0].error is None
    assert server.requests[0]["structured_outputs"] == {"json": QA_SCHEMA}
    assert "response_format" not in server.requests[0]


def test_concurrency_is_bounded_and_spread_over_servers():
    with OpenAIServer(latency_s=0.05) as a, OpenAIServer(latency_s=0.05) as b:
        cfg = VqaConfig(model="m", openai={"base_urls": [a.base_url, b.base_url], "concurrency": 4})
        start = time.perf_counter()
        done = OpenAIBackend(cfg, cfg.openai.base_urls).complete([build_messages(f"cat {i}") for i in range(48)])
        seconds = time.perf_counter() - start
    assert all(c.error is None for c in done) and sum(c.completion_tokens for c in done) == 48 * 60
    assert len(a.requests) + len(b.requests) == 48 and min(len(a.requests), len(b.requests)) >= 16
    assert a.max_in_flight + b.max_in_flight <= 8 and max(a.max_in_flight, b.max_in_flight) >= 3
    assert seconds < 48 / 8 * 0.05 * 3  # 8 in flight: ~0.3 s of latency; serial would be 2.4 s


def test_a_server_down_for_the_whole_shard_fails_the_shard(tmp_path):
    make_captions(tmp_path, 0, [f"a cat {i}" for i in range(40)])
    stage = VqaStage(config(tmp_path, model="m", openai={"base_urls": [f"http://127.0.0.1:{closed_port()}/v1"],
                                                          **FAST}))
    start = time.perf_counter()
    with pytest.raises(VqaServerUnavailable, match="reached no working server"):
        run_stage(stage)
    assert time.perf_counter() - start < 5
    assert not os.path.exists(DatasetLayout(str(tmp_path)).annotation("vqa", "00000"))
    assert stage.records.get("00000") is None


def test_server_errors_on_every_request_fail_the_shard_but_a_few_do_not(tmp_path):
    with OpenAIServer(fail_all=503) as down:
        make_captions(tmp_path, 0, ["a cat", "a dog"])
        with pytest.raises(VqaServerUnavailable, match="HTTP 503"):
            run_stage(VqaStage(config(tmp_path, model="m", openai={"base_urls": [down.base_url], **FAST})))
    with OpenAIServer() as up:
        make_captions(tmp_path, 1, ["[[500]] a cat"] + [f"a dog {i}" for i in range(9)])
        summary = run_stage(VqaStage(config(tmp_path, model="m", openai={"base_urls": [up.base_url], **FAST})))
    assert summary["shards"]["00001"]["failures"] == {"request_failed": 1}
    assert summary["last_run"]["processed"] == ["00000", "00001"]


def loopback_command(*extra: str) -> str:
    return f"{sys.executable} -m tasks.demo.openai_server --host {{host}} --port {{port}} " + " ".join(extra)


def gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_managed_servers_start_serve_and_stop(tmp_path):
    make_captions(tmp_path, 0, ["a red circle", "a blue square"])
    make_captions(tmp_path, 1, ["a green star"])
    server = {"command": loopback_command("--startup-delay", "0.5"), "num_servers": 2,
              "startup_timeout_s": 30, "log_dir": str(tmp_path / "logs")}
    stage = VqaStage(config(tmp_path, model="m", openai={**FAST, "timeout_s": 5, "server": server}))
    with stage.serving():
        servers = stage.servers
        pids = [p.pid for p in servers.procs]
        assert len(set(servers.ports)) == 2 and servers.dead() is None
        summary = run_stage(stage)
    assert summary["counts"]["answered"] == 3 and summary["failures"] == {}
    assert all(gone(pid) for pid in pids) and stage.servers is None
    assert len(list((tmp_path / "logs").glob("goldiclip-vqa-server-*.log"))) == 2
    with pytest.raises(RuntimeError, match="inside `VqaStage.serving"):
        run_stage(VqaStage(stage.config), force=True)


def test_managed_server_is_stopped_when_the_stage_fails_midway(tmp_path):
    make_captions(tmp_path, 0, ["a red circle"])
    make_captions(tmp_path, 1, ["a cat"])
    (tmp_path / "annotations" / "captions" / "00001.parquet").write_bytes(b"not parquet")
    server = {"command": loopback_command(), "startup_timeout_s": 30}
    stage = VqaStage(config(tmp_path, model="m", openai={**FAST, "server": server}))
    with pytest.raises(Exception, match="(?i)parquet"), stage.serving():
        pid = stage.servers.procs[0].pid
        run_stage(stage)
    assert gone(pid)
    assert stage.records.get("00000") is not None and stage.records.get("00001") is None


def test_managed_server_that_dies_mid_stage_fails_the_shard_fast(tmp_path):
    make_captions(tmp_path, 0, [f"a cat {i}" for i in range(30)])
    server = {"command": loopback_command("--die-after", "5"), "startup_timeout_s": 30}
    stage = VqaStage(config(tmp_path, model="m", openai={**FAST, "concurrency": 2, "server": server}))
    with pytest.raises(VqaServerUnavailable, match="vqa server gone: server 0 .* exited with code 3"), stage.serving():
        pid = stage.servers.procs[0].pid
        run_stage(stage)
    assert gone(pid) and stage.records.get("00000") is None


def test_managed_server_start_up_failures_are_clear(tmp_path):
    crash = ManagedServers(VqaConfig(openai={"server": {
        "command": f"{sys.executable} -c \"print('no GPU found'); raise SystemExit(7)\"",
        "log_dir": str(tmp_path)}}).openai.server, model="m")
    with pytest.raises(RuntimeError, match="exited with code 7 while starting(.|\n)*no GPU found"), crash:
        pass
    slow = ManagedServers(VqaConfig(openai={"server": {
        "command": f"{sys.executable} -c \"import time; time.sleep(60)\"", "startup_timeout_s": 1,
        "stop_timeout_s": 5}}).openai.server, model="m")
    with pytest.raises(RuntimeError, match="not healthy after 1.0s"), slow:
        pass
    assert slow.procs == [] and crash.procs == []


def test_transformers_backend_with_a_tiny_random_phi3(tmp_path):
    from tasks.demo.standin_models import save_tiny_phi3

    model_dir = save_tiny_phi3(tmp_path / "phi3-tiny")
    make_captions(tmp_path, 0, ["a red circle", "a blue square on a green background", "a star"])
    cfg = config(tmp_path, backend="transformers", model=str(model_dir), max_new_tokens=12,
                 transformers={"batch_size": 2})
    summary = run_stage(VqaStage(cfg))
    counts, failures = summary["counts"], summary["failures"]
    assert counts["images"] == 3 and counts["generated_tokens"] > 0
    assert counts.get("answered", 0) + sum(failures.values()) == 3  # garbage text: counted, never a crash
    rows = vqa_rows(tmp_path)
    assert all(isinstance(r["raw_output"], str) and r["raw_output"] for r in rows.values())
    assert {r["error"] for r in rows.values()} <= {None, "unparseable", "no_valid_pairs"}


def test_vqa_flow_runs_the_stage_inside_its_managed_server(tmp_path, prefect_harness):
    from pipelines.vqa import vqa_flow

    make_captions(tmp_path, 0, ["a red circle", "[[500]] a cat"])
    cfg = config(tmp_path, model="m", openai={**FAST, "server": {"command": loopback_command(),
                                                                 "startup_timeout_s": 30}})
    summary = vqa_flow(cfg)
    assert summary["counts"]["answered"] == 1 and summary["failures"] == {"request_failed": 1}
    assert summary["servers"] == "managed"


def test_a_refusing_server_is_marked_down_skipped_and_used_again_once_healthy():
    port = closed_port()
    down_url = f"http://127.0.0.1:{port}/v1"
    with OpenAIServer(latency_s=0.05) as up:  # the second batch takes >= 0.75 s: several /health probes
        cfg = VqaConfig(model="m", openai={"base_urls": [down_url, up.base_url], "concurrency": 2, "retries": 0,
                                           "reprobe_s": 0.1, **{k: v for k, v in FAST.items() if k != "retries"}})
        backend = OpenAIBackend(cfg, cfg.openai.base_urls)
        done = backend.complete([build_messages(f"a cat {i}") for i in range(30)])
        # retries: 0, yet every request is answered: the refused ones moved to the live server at once
        assert all(c.error is None for c in done)
        refused = backend.stats[down_url]
        assert refused["marked_down"] == 1 and refused["answered"] == 0
        assert refused["sent"] == refused["connection_errors"] <= 4  # only those racing the mark; then skipped
        with OpenAIServer(port=port) as back:  # the server comes back on its address
            done = backend.complete([build_messages(f"a dog {i}") for i in range(60)])
        assert all(c.error is None for c in done) and down_url not in backend.down
        assert len(back.requests) > 0 and backend.stats[down_url]["answered"] == len(back.requests)
