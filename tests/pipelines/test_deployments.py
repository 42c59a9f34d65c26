"""prefect.yaml end to end: a real Prefect server, `prefect deploy`, a process worker, a run.

Everything runs as its own process, as a user would run it (docs/deployments.md): the server
with its own PREFECT_HOME, the work pool, the deployments, a worker on the pool, and the
download deployment on a tiny URL list served by a loopback server in this process. The
server and the worker are stopped with SIGINT, then terminated if they linger, also when the
test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from storage import DatasetLayout, iter_shard
from tasks.demo.http_server import LoopbackServer, Reply, image_bytes

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "goldiclip-process"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run(args: list[str], env: dict, timeout: float = 120) -> str:
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A `prefect server start` of our own; yields the environment that points clients at it."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_CLI_PROMPT": "false",
        "GOLDICLIP_REPO": str(ROOT), "PYTHONPATH": str(ROOT),
    })
    log = (home / "server.log").open("w")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not come up:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {**env, "PREFECT_API_URL": api_url}
    finally:
        _stop(server)
        log.close()


def _config(tmp_path: Path, server: LoopbackServer, num_images: int) -> Path:
    urls = [server.route(f"/img/{i}.jpg", Reply(body=image_bytes(160 + 8 * i, 120))) for i in range(num_images)]
    url_list = tmp_path / "urls.tsv"
    url_list.write_text("".join(f"caption {i}\t{u}\n" for i, u in enumerate(urls)))
    config = {
        "dataset": {"root": str(tmp_path / "data")},
        "sources": [{"name": "tiny", "format": "cc3m", "paths": [str(url_list)]}],
        "download": {"shard_size": 2, "processes": 1, "concurrency": 4, "timeout_s": 5, "retries": 1,
                     "allow_private_addresses": True},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _create_pool(api_url: str) -> None:
    """`prefect work-pool create goldiclip-process --type process`, through the client (a CLI start is ~8 s here)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))


def _run_deployment(api_url: str, name: str, parameters: dict, timeout: float):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        return run_deployment(name, parameters=parameters, timeout=timeout)


def test_every_deployment_entrypoint_is_a_flow_of_the_dag():
    from prefect.flows import load_flow_from_entrypoint

    from pipelines.dag import STAGE_FLOWS

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    names = {d["name"]: load_flow_from_entrypoint(str(ROOT / d["entrypoint"])).name for d in deployments}
    assert names == {"goldiclip-pipeline": "goldiclip-pipeline", **{stage: stage for stage in STAGE_FLOWS}}
    for d in deployments:
        assert d["work_pool"]["name"] == POOL and "config" in d["parameters"]


def test_deploy_and_run_the_download_deployment(prefect_server, tmp_path):
    """`prefect deploy --all` would load all nine entrypoints (a minute here); two prove the path."""
    env = prefect_server
    _create_pool(env["PREFECT_API_URL"])
    worker_log = (tmp_path / "worker.log").open("w")
    # The worker starts (imports, polls) while the deployments are created.
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL],
                              env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, cwd=tmp_path,
                              stdout=worker_log, stderr=subprocess.STDOUT)
    try:
        out = _run([PREFECT, "--no-prompt", "deploy", "--name", "download", "--name", "captions"], env, timeout=180)
        assert "download/download" in out and "captions/captions" in out, out
        with LoopbackServer() as images:
            config = _config(tmp_path, images, num_images=5)
            run = _run_deployment(env["PREFECT_API_URL"], "download/download", {"config": str(config)}, 120)
        assert run.state.is_completed(), f"{run.state}\n{(tmp_path / 'worker.log').read_text()[-4000:]}"
    finally:
        _stop(worker)
        worker_log.close()

    layout = DatasetLayout(str(tmp_path / "data"))
    shards = layout.list_shards(layout.images_dir, ".tar")
    assert shards == ["00000", "00001", "00002"]
    keys = [s["__key__"] for shard in shards for s in iter_shard(layout.images_tar(shard))]
    assert len(keys) == 5
    assert Path(layout.stage_summary("download")).exists()
