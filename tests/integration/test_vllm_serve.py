"""The vqa stage against a real ``vllm serve``, started and stopped by its managed-server mode.

The loopback server in ``tasks/demo/openai_server.py`` proves the client; this proves
it against vLLM itself: its start-up and ``/health``, its request and
structured-output dialect, its answers, and what happens when it dies. The
server is vLLM's CPU build from ``make vllm-env`` (``.venv-vllm``; or the
``vllm`` executable named by ``GOLDICLIP_VLLM``) serving the tiny random Phi3 of
``save_tiny_phi3``. The stage config is the GPU one (``open30m``); only the model
path and the server's flags differ. The model is random, so its text is
garbage: only the grammar makes it JSON.

Three server starts (~45-70 s each here): one for the run whose last shard is
broken, two for the run whose server is killed and its rerun. Deselect with
``-m "not vllm"``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from storage import DatasetLayout, read_table
from storage.tables import VQA
from tasks.config import load_config
from tasks.stage import run_stage
from tasks.annotate.vqa import VqaStage
from tasks.annotate.vqa_backends import OpenAIBackend, VqaServerUnavailable
from tasks.annotate.vqa_parse import QA_SCHEMA, build_messages, parse_qa
from tests.tasks.annotate.test_vqa import gone, make_captions

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
VLLM = os.environ.get("GOLDICLIP_VLLM") or str(REPO / ".venv-vllm" / "bin" / "vllm")
# CPU-sized server flags; a GPU node uses open30m's (bfloat16, 2048, 256, prefix caching).
# A fixed KV cache skips vLLM's memory probe (which wants 92% of the node free);
# compact JSON stops the grammar from allowing endless whitespace (docs/vllm.md).
SERVER_FLAGS = ("--dtype float32 --max-model-len 1024 --max-num-seqs 4 --enforce-eager --kv-cache-memory-bytes 64M "
                "--structured-outputs-config.backend xgrammar "
                "--structured-outputs-config.disable_any_whitespace true")
CAPTIONS = ["a red circle on a blue background", "a white dog next to a black cat", "a small purple star",
            "two cars", "a green square"]
JSON_START = '{"qa":[{"question":"'


def vllm_config(root: Path, model_dir: Path):
    """open30m's vqa config with the tiny model and one CPU server on a free loopback port."""
    if not os.access(VLLM, os.X_OK):
        pytest.fail(f"no vLLM at {VLLM}: run `make vllm-env` (or set GOLDICLIP_VLLM to a `vllm` executable, "
                    f"or deselect these tests with -m 'not vllm')")
    server = {"command": f"{VLLM} serve {{model}} --host {{host}} --port {{port}} {SERVER_FLAGS}",
              "log_dir": str(root / "server-logs")}
    return load_config(preset="open30m", overrides={"dataset.root": str(root), "vqa.model": str(model_dir),
                                                    "vqa.openai.server": server})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tasks.demo.standin_models import save_tiny_phi3

    return save_tiny_phi3(tmp_path_factory.mktemp("phi3-tiny"))


def get_json(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, json.loads(r.read() or b"{}")


def server_log(stage_root: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in (stage_root / "server-logs").glob("*.log"))


def group_gone(pgid: int, within_s: float = 10.0) -> bool:
    """Every process of the server's group has exited (orphaned workers are reaped by init, not at once)."""
    deadline = time.monotonic() + within_s
    while not gone(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def group_members(pgid: int) -> list[str]:
    """``pid state name`` of each process still in the group, for failure messages."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue
        name, fields = rest.rsplit(") ", 1)
        state, _ppid, group = fields.split()[:3]
        if int(group) == pgid:
            out.append(f"{pid} {state} {name}")
    return out


def is_qa_document(text: str) -> bool:
    """Valid JSON (control characters allowed, as xgrammar emits them) matching QA_SCHEMA."""
    try:
        doc = json.loads(text, strict=False)
    except json.JSONDecodeError:
        return False
    return (isinstance(doc, dict) and set(doc) == {"qa"} and isinstance(doc["qa"], list)
            and all(isinstance(p, dict) and set(p) == {"question", "answer"}
                    and all(isinstance(v, str) for v in p.values()) for p in doc["qa"]))


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory, model_dir):
    """Two good shards, then one whose captions table is unreadable, through one managed vLLM server."""
    root = tmp_path_factory.mktemp("vllm-run")
    keys = make_captions(root, 0, CAPTIONS[:3]) + make_captions(root, 1, CAPTIONS[3:])
    make_captions(root, 2, ["a cat"])
    (root / "annotations" / "captions" / "00002.parquet").write_bytes(b"not parquet")
    stage = VqaStage(vllm_config(root, model_dir))
    seen: dict = {"keys": keys, "root": root, "stage": stage}
    try:
        with stage.serving():
            servers = stage.servers
            seen["pgid"] = servers.procs[0].pid
            seen["health"] = urllib.request.urlopen(f"http://{servers.cfg.host}:{servers.ports[0]}/health").status
            seen["models"] = get_json(servers.base_urls[0] + "/models")[1]
            # vLLM's own extra-body dialect, on the same server.
            extra_body = OpenAIBackend(stage.section.model_copy(update={"structured_output": "structured_outputs"}),
                                       servers.base_urls)
            seen["extra_body_answer"] = extra_body.complete([build_messages(CAPTIONS[0])])[0]
            run_stage(stage)
    except Exception as e:  # the unreadable shard is expected; a server that never served is not
        if "extra_body_answer" not in seen:
            raise
        seen["error"] = e
    if "pgid" in seen:
        seen["gone"] = group_gone(seen["pgid"])
        seen["left"] = group_members(seen["pgid"])
    seen["log"] = server_log(root)
    return seen


def test_server_became_healthy_and_serves_the_model(broken_run, model_dir):
    assert broken_run["health"] == 200, broken_run["log"]
    assert [m["id"] for m in broken_run["models"]["data"]] == [str(model_dir)]


def test_every_request_got_an_answer_and_landed_in_the_vqa_table(broken_run):
    stage, keys = broken_run["stage"], broken_run["keys"]
    records = [stage.records.get(s) for s in ("00000", "00001")]
    assert all(r is not None and r.done for r in records), broken_run["log"]
    assert sum(r.counts["images"] for r in records) == len(CAPTIONS)
    assert not any("request_failed" in r.failures for r in records)  # every request got an answer
    assert all(r.counts["generated_tokens"] > 0 for r in records)
    layout = DatasetLayout(str(broken_run["root"]))
    rows = []
    for shard in ("00000", "00001"):
        table = read_table(layout.annotation("vqa", shard))
        assert table.schema.equals(VQA, check_metadata=False)
        rows += table.to_pylist()
    assert [r["key"] for r in rows] == keys
    for row in rows:  # the raw text is kept, and the qa column is what the parser makes of it
        assert isinstance(row["raw_output"], str) and row["raw_output"]
        parsed = parse_qa(row["raw_output"], max_pairs=5, max_question_chars=200, max_answer_chars=100)
        assert (row["qa"], row["error"]) == (parsed.pairs, parsed.error)
        assert row["error"] in (None, "no_valid_pairs", "unparseable")  # garbage text: counted, never fatal


def test_structured_output_is_requested_in_vllms_dialect_and_honoured(broken_run):
    stage = broken_run["stage"]
    body = OpenAIBackend(stage.section, ["http://unused/v1"]).request_body(build_messages("a cat"))
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "qa_pairs", "schema": QA_SCHEMA, "strict": True}}
    layout = DatasetLayout(str(broken_run["root"]))
    raw = [r["raw_output"] for s in ("00000", "00001") for r in read_table(layout.annotation("vqa", s)).to_pylist()]
    truncated = sum(stage.records.get(s).counts.get("truncated", 0) for s in ("00000", "00001"))
    # A random model writes this prefix only when the grammar forces it; every
    # answer that was not cut off at max_new_tokens is a complete QA document.
    assert all(text.startswith(JSON_START) for text in raw), raw
    assert sum(map(is_qa_document, raw)) == len(raw) - truncated >= 1, (raw, truncated)
    extra_body = broken_run["extra_body_answer"]
    assert extra_body.error is None and extra_body.text.startswith(JSON_START)


def test_server_group_is_gone_when_the_stage_fails_midway(broken_run):
    assert "parquet" in str(broken_run.get("error")).lower(), broken_run.get("error")
    assert broken_run["gone"] is True, broken_run["left"]
    stage = broken_run["stage"]
    assert stage.records.get("00002") is None and stage.servers is None


def test_server_killed_mid_stage_fails_the_shard_keeps_finished_ones_and_a_rerun_completes(tmp_path, model_dir):
    shards = [f"{s:05d}" for s in range(4)]
    for s in range(4):
        make_captions(tmp_path, s, [f"{c} {s}" for c in CAPTIONS[:3]])
    stage = VqaStage(vllm_config(tmp_path, model_dir))
    layout = DatasetLayout(str(tmp_path))
    killed: dict = {}

    def kill_after_first_shard(pid: int) -> None:
        while stage.records.get("00000") is None and "stop" not in killed:
            time.sleep(0.05)
        if "stop" not in killed:
            # Only the API server: its engine and worker processes live on, orphaned,
            # until the stage stops the whole process group.
            os.kill(pid, signal.SIGKILL)
            killed["at"] = time.monotonic()

    with pytest.raises(VqaServerUnavailable, match="vqa server gone: server 0 .* exited with code -9"):
        with stage.serving():
            pgid = stage.servers.procs[0].pid
            killer = threading.Thread(target=kill_after_first_shard, args=(pgid,), daemon=True)
            killer.start()
            try:
                run_stage(stage)
            finally:
                killed["stop"] = True
                killer.join()
    assert "at" in killed, "the stage finished before the server was killed"
    assert group_gone(pgid), group_members(pgid)
    done = [s for s in shards if stage.records.get(s) is not None]
    assert done and done == shards[: len(done)] and len(done) < len(shards)
    assert not Path(layout.annotation("vqa", shards[len(done)])).exists()  # the interrupted shard: nothing written
    kept = {s: Path(layout.annotation("vqa", s)).read_bytes() for s in done}

    rerun = VqaStage(stage.config)
    with rerun.serving():
        summary = run_stage(rerun)
    assert summary["last_run"]["skipped"] == done
    assert summary["last_run"]["processed"] == shards[len(done):]
    assert all(rerun.records.get(s).done for s in shards)
    assert {s: Path(layout.annotation("vqa", s)).read_bytes() for s in done} == kept
    assert all(len(read_table(layout.annotation("vqa", s))) == 3 for s in shards)
