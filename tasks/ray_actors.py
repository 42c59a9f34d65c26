"""Ray for the stages: join or start the cluster, and run a stage's shards on a pool of actors.

DESIGN.md puts the model stages on Ray (boxes: an actor pool, one actor per GPU).
An actor builds its own copy of the stage, so the model loads once per actor and
stays loaded for every shard it takes; a shard is the unit of work, as everywhere
else, so outputs and records are written exactly as a local run writes them (the
actor calls ``Stage.run_shard``). The pool hands an idle actor to each caller: the
flow keeps one Prefect task per shard (per-shard runs, logs and retries in the
UI) and each task blocks on its actor. Nothing here imports Prefect.
"""

from __future__ import annotations

import os
import queue
import socket
import tempfile

from tasks.config import ActorPoolConfig, ConfigError, PipelineConfig, RayConfig
from tasks.stage import ShardResult, Stage


LOCAL_NODE_IP = "127.0.0.2"  # loopback that Ray does not rewrite to the host's address (127.0.0.1 it does)


def start_ray(settings: RayConfig) -> None:
    """Join ``ray.address``, or start a local Ray (no dashboard, on loopback) unless one is running."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if settings.address:
        ray.init(address=settings.address, _node_ip_address=settings.node_ip_address,
                 runtime_env=project_runtime_env() if settings.ship_code else None)
        return
    temp_dir = settings.temp_dir or os.path.join(tempfile.gettempdir(), "goldiclip-ray")
    ray.init(num_cpus=settings.num_cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             _node_ip_address=settings.node_ip_address or LOCAL_NODE_IP)


def project_runtime_env() -> dict:
    """The packages Ray workers import (train loop, stages, model), shipped from this checkout.

    Cluster nodes need the dependencies (torch, transformers, ...) in their image; the
    project's own code travels with the job, so a worker never runs another version of it.
    """
    import model
    import storage
    import tasks

    return {"py_modules": [model, storage, tasks], "excludes": ["__pycache__", "*.pyc"]}


class ShardWorker:
    """The body of one actor: a stage of its own (its model loaded on first use) running shards."""

    def __init__(self, stage_class: type[Stage], config: PipelineConfig):
        self.stage = stage_class(config)
        self.shards_run: list[str] = []

    def run_shard(self, shard: str, force: bool) -> ShardResult:
        result = self.stage.run_shard(shard, force=force)
        self.shards_run.append(shard)
        return result

    def describe(self) -> dict:
        """Where this actor runs and what it did (for logs and tests)."""
        import ray

        return {"host": socket.gethostname(), "pid": os.getpid(), "shards": list(self.shards_run),
                "accelerators": ray.get_runtime_context().get_accelerator_ids(),
                **self.stage.summary_extra()}


class ShardActorPool:
    """``settings.num_actors`` actors of ``stage``'s class; ``run_shard`` borrows an idle one.

    Thread-safe: the flow's task runner calls ``run_shard`` from as many threads as
    there are actors. An exception in the stage reaches the caller as the stage's own
    exception type (Ray re-raises it as an instance of the cause), so retry rules that
    look at the type still hold. A dead actor is restarted by Ray up to
    ``max_restarts`` times and the call that was on it is retried on the new one.
    """

    def __init__(self, stage: Stage, settings: ActorPoolConfig):
        import ray

        worker = ray.remote(ShardWorker).options(
            num_gpus=settings.num_gpus_per_actor, num_cpus=settings.num_cpus_per_actor,
            max_restarts=settings.max_restarts, max_task_retries=settings.max_restarts,
        )
        self.actors = [worker.remote(type(stage), stage.config) for _ in range(settings.num_actors)]
        self._idle: queue.Queue = queue.Queue()
        for actor in self.actors:
            self._idle.put(actor)

    @property
    def size(self) -> int:
        return len(self.actors)

    def run_shard(self, shard: str, *, force: bool = False) -> ShardResult:
        import ray

        actor = self._idle.get()
        try:
            return ray.get(actor.run_shard.remote(shard, force))
        finally:
            self._idle.put(actor)

    def describe(self) -> list[dict]:
        """Each actor's ``ShardWorker.describe``, or the error that stopped it from answering."""
        import ray

        described = []
        for actor in self.actors:
            try:
                described.append(ray.get(actor.describe.remote(), timeout=60))
            except Exception as e:  # a dead actor must not cost the run its summary
                described.append({"error": f"{type(e).__name__}: {e}"[:500]})
        return described

    def close(self) -> None:
        """Stop the actors (and free their GPUs) now rather than when the driver exits."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def shard_runner(stage: Stage):
    """What runs ``stage``'s shards: the stage itself, or a Ray actor pool if its section asks."""
    settings = getattr(stage.section, "actors", None)
    if settings is None or settings.executor == "local":
        return stage
    start_ray(stage.config.ray)
    if not stage.config.ray.address:
        check_local_resources(stage.name, settings)
    return ShardActorPool(stage, settings)


def check_local_resources(stage_name: str, settings: ActorPoolConfig) -> None:
    """Fail fast when no actor fits on the local Ray (it would wait forever for a GPU).

    Only for a Ray this process started: a cluster's autoscaler may add the nodes later.
    """
    import ray

    have = ray.cluster_resources()
    for resource, need in (("GPU", settings.num_gpus_per_actor), ("CPU", settings.num_cpus_per_actor)):
        if need > have.get(resource, 0):
            raise ConfigError(
                f"{stage_name}.actors: each actor asks for {need:g} {resource}, the local Ray has "
                f"{have.get(resource, 0):g}; lower {stage_name}.actors.num_{resource.lower()}s_per_actor "
                "(0 GPUs runs on the CPU) or set ray.address to join a cluster"
            )


__all__ = ["ShardActorPool", "ShardWorker", "check_local_resources", "project_runtime_env", "shard_runner",
           "start_ray"]
