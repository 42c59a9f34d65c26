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

    from tasks.config import RayConfig
    from tasks.ray_actors import start_ray

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")  # one Ray per test process
    start_ray(RayConfig(num_cpus=2, temp_dir=os.path.join(tempfile.gettempdir(), f"goldiclip-ray-tests-{worker}")))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def owl_dir(tmp_path_factory):
    """A tiny random OWLv2 saved like a real checkpoint (model + processor), for the boxes tests."""
    from tasks.demo.standin_models import save_tiny_owlv2

    return str(save_tiny_owlv2(tmp_path_factory.mktemp("owlv2-tiny")))
