"""Shared fixtures. Environment is set before any test module imports Prefect."""

from __future__ import annotations

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="goldiclip-prefect-home-")
for _name, _value in {
    "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
}.items():
    os.environ[_name] = _value

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """A real Prefect API (a local SQLite-backed server) for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray (2 CPUs, no dashboard) shared by every Ray test in the session."""
    import ray

    _start_test_ray()
    yield
    ray.shutdown()


def _start_test_ray() -> None:
    from tasks.config import RayConfig
    from tasks.ray_actors import start_ray

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")  # one Ray per test process
    start_ray(RayConfig(num_cpus=2, temp_dir=os.path.join(tempfile.gettempdir(), f"goldiclip-ray-tests-{worker}")))


@pytest.fixture(scope="session")
def owl_dir(tmp_path_factory):
    """A tiny random OWLv2 saved like a real checkpoint (model + processor), for the boxes tests."""
    from tasks.demo.standin_models import save_tiny_owlv2

    return str(save_tiny_owlv2(tmp_path_factory.mktemp("owlv2-tiny")))


class S3Server:
    """A loopback S3 API server (moto) with one bucket; ``prefix()`` gives each test a fresh root."""

    def __init__(self, endpoint: str, bucket: str):
        self.endpoint, self.bucket = endpoint, bucket
        self._count = 0

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    def prefix(self, name: str = "t") -> str:
        """A fresh ``s3://bucket/<name>-<n>-<random>`` no other test writes under."""
        import uuid

        self._count += 1
        return f"{self.url}/{name}-{self._count}-{uuid.uuid4().hex[:8]}"

    def fs(self):
        """A fresh s3fs filesystem on the server (no cached listings from earlier calls)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server on 127.0.0.1 (a free port) with the bucket ``goldiclip-moto``.

    It runs in a process of its own (``python -m moto.server``, as ``moto_server``), not in a
    thread of the tests' process, where every request would wait for the GIL of the flows and
    Ray drivers it serves. Sets the AWS_* variables s3fs, boto3 and pyarrow read (endpoint, dummy
    keys, region) for the session, so every ``s3://`` URL goes to the loopback server, local Ray
    workers included (they inherit the driver's environment); the previous values are restored after.
    """
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile(prefix="goldiclip-moto-", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"moto's server did not start; see {log.name}")
        time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in (*env, "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # none made before the endpoint was set may be reused
    bucket = "goldiclip-moto"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    try:
        yield S3Server(endpoint, bucket)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        os.unlink(log.name)
        s3fs.S3FileSystem.clear_instance_cache()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def ray_on_s3(s3_server, ray_cluster):
    """The session's local Ray, its processes seeing the S3 server's environment.

    A local Ray's processes inherit the environment of the moment it started; one started by an
    earlier test, before ``s3_server`` set the AWS variables, would send Ray Train's controller
    to the real AWS. Then it is restarted (same settings), now with them.
    """
    import ray

    @ray.remote(num_cpus=0)
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) != s3_server.endpoint:
        ray.shutdown()
        _start_test_ray()
    return s3_server


@pytest.fixture(scope="session")
def local_cluster_nodes():
    """A Ray cluster of three nodes on this machine (``tests.cluster.LocalCluster``): a head and
    the workers ``node_a`` and ``node_b``, 1 CPU each, on 127.0.0.2; shared by the session."""
    from tests.cluster import LocalCluster

    with LocalCluster(head_cpus=1, workers={"node_a": 1, "node_b": 1}) as cluster:
        yield cluster


@pytest.fixture
def local_cluster(local_cluster_nodes):
    """The session's 3-node cluster with every node alive (a node an earlier test killed is started
    again), this process connected to no Ray: the code under test joins ``ray.address =
    cluster.address`` itself. After the test it leaves the cluster, and a session local Ray
    (``ray_cluster``) that it had to leave is started again."""
    import ray

    local_cluster_nodes.ensure_nodes()
    had_local_ray = ray.is_initialized()
    ray.shutdown()
    yield local_cluster_nodes
    ray.shutdown()
    if had_local_ray:
        _start_test_ray()
