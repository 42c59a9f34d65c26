"""Ray for the stages: join or start the cluster, and run a stage's shards on a pool of actors.

DESIGN.md puts the model stages on Ray (boxes: an actor pool, one actor per GPU).
An actor builds its own copy of the stage, so the model loads once per actor and
stays loaded for every shard it takes; a shard is the unit of work, as everywhere
else, so outputs and records are written exactly as a local run writes them (the
actor calls ``Stage.run_shard``). The pool hands an idle actor to each caller: the
flow keeps one Prefect task per shard (per-shard runs, logs and retries in the
UI) and each task blocks on its actor. Every stage can run this way: CPU actors
for download, captions, phrases and shards, GPU actors for boxes and vqa.

An actor works for the flow's run: it shares the run's id (so the shard leases of
``tasks.lease`` are one run's), prepares its copy of the stage after the flow
prepared its own (``Stage.prepare_worker``), and records its Ray node, address and
pid in each shard record. A shard whose actor is lost (its node died) is retried on
the pool; after ``max_restarts`` such losses it fails as ``ShardActorLost``, an
``OSError``, so the flow's I/O retry rule applies. Nothing here imports Prefect.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import queue
import socket
import tempfile
import threading
import time

from tasks.config import ActorPoolConfig, ConfigError, PipelineConfig, RayConfig
from tasks.stage import ShardResult, Stage

log = logging.getLogger(__name__)

LOCAL_NODE_IP = "127.0.0.2"  # loopback that Ray does not rewrite to the host's address (127.0.0.1 it does)

# The driver's environment that a cluster's workers need, forwarded when joining ``ray.address``
# (runtime_env env_vars): nodes started with ``ray start`` see only the environment of the shell
# that started them, and the actors read and write the dataset root themselves. Names or
# fnmatch patterns: object-store credentials and endpoint (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_PROFILE, ...; a profile or a
# GOOGLE_APPLICATION_CREDENTIALS file must exist on the nodes too), fsspec's own settings, and
# the Hugging Face cache and offline mode the model stages load weights with.
FORWARDED_ENV = ("AWS_*", "GOOGLE_APPLICATION_CREDENTIALS", "FSSPEC_*", "HF_HUB_OFFLINE", "HF_HOME")


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of ``environ`` (default: this process's) that ``FORWARDED_ENV`` names."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items()) if any(fnmatch.fnmatchcase(k, p) for p in FORWARDED_ENV)}


class ShardActorLost(OSError):
    """A shard's actor was lost (its node died, its process was killed) more times than the pool retries.

    An ``OSError``: the flow retries the shard like any other I/O trouble; the outputs of a
    shard are written whole and recorded last, so a retry never duplicates anything.
    """


def start_ray(settings: RayConfig) -> None:
    """Join ``ray.address``, or start a local Ray (no dashboard, on loopback) unless one is running."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if settings.address:
        runtime_env = project_runtime_env() if settings.ship_code else {}
        if env := forwarded_env():
            runtime_env["env_vars"] = env
        ray.init(address=settings.address, _node_ip_address=settings.node_ip_address,
                 runtime_env=runtime_env or None)
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


def ray_node() -> dict:
    """This Ray worker's node, for shard records: node id, address, host name and process id."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(), "pid": os.getpid()}


class ShardWorker:
    """The body of one actor: a stage of its own (its model loaded on first use) running shards.

    It works for the driver's run (``run_id``, ``run_started``: shard leases, force) and
    prepares its stage before the first shard (there, so that an error in it reaches the
    flow as the stage's own exception, not as a dead actor).
    """

    def __init__(self, stage_class: type[Stage], config: PipelineConfig, run_id: str, run_started: float):
        self.stage = stage_class(config)
        self.stage.join_run(run_id, run_started, ray_node())
        self.prepared = False
        self.shards_run: list[str] = []

    def run_shard(self, shard: str, force: bool, wait: bool = True) -> ShardResult:
        if not self.prepared:
            self.stage.prepare_worker()
            self.prepared = True
        result = self.stage.run_shard(shard, force=force, wait=wait)
        if result.held_by is None:
            self.shards_run.append(shard)
        return result

    def describe(self) -> dict:
        """Where this actor runs and what it did (for logs and tests)."""
        import ray

        # Plain JSON values: a stage's facts may hold types the driver cannot unpickle (spaCy's lists).
        extra = json.loads(json.dumps(self.stage.summary_extra(), default=str))
        return {**ray_node(), "shards": list(self.shards_run),
                "accelerators": ray.get_runtime_context().get_accelerator_ids(), **extra}


class ShardActorPool:
    """``settings.num_actors`` actors of ``stage``'s class; ``run_shard`` borrows an idle one.

    Thread-safe: the flow's task runner calls ``run_shard`` from as many threads as
    there are actors. An exception in the stage reaches the caller as the stage's own
    exception type (Ray re-raises it as an instance of the cause), so retry rules that
    look at the type still hold. A dead actor is restarted by Ray up to
    ``max_restarts`` times. A call whose actor is lost (``RayActorError``: a killed
    process, a lost node, which Ray reports as ``ActorUnavailableError`` while the
    node is not yet declared dead) is retried on the next idle actor, up to
    ``max_restarts`` times per call, then raises ``ShardActorLost`` (an ``OSError``).
    The lost actor rejoins the pool once it answers again (restarted, here or on
    another node); one dead for good leaves it.
    """

    def __init__(self, stage: Stage, settings: ActorPoolConfig):
        import ray

        worker = ray.remote(ShardWorker).options(
            num_gpus=settings.num_gpus_per_actor, num_cpus=settings.num_cpus_per_actor,
            max_restarts=settings.max_restarts, max_task_retries=settings.max_restarts,
        )
        self.stage_name = stage.name
        self.retries = settings.max_restarts
        self.actors = [worker.remote(type(stage), stage.config, stage.run_id, stage.run_started)
                       for _ in range(settings.num_actors)]
        self._idle: queue.Queue = queue.Queue()
        self._dead: set = set()
        for actor in self.actors:
            self._idle.put(actor)

    @property
    def size(self) -> int:
        return len(self.actors)

    def _take(self):
        """An idle actor (waiting for one); ``ShardActorLost`` once every actor is dead for good."""
        while True:
            try:
                return self._idle.get(timeout=2.0)
            except queue.Empty:
                if self.actors and len(self._dead) >= len(self.actors):
                    raise ShardActorLost(f"{self.stage_name}: every Ray actor of the pool is dead") from None

    def _recover(self, actor) -> None:
        """Return ``actor`` to the pool once it answers (Ray restarts it); drop it if dead for good."""
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

        def wait_for_it():
            while self.actors:
                try:
                    ray.get(actor.__ray_ready__.remote(), timeout=30)
                except GetTimeoutError:
                    continue  # restarting (waiting for a node with room)
                except ActorDiedError:
                    self._dead.add(actor._actor_id.hex())
                    log.warning("%s: a Ray actor is dead for good (no restarts left)", self.stage_name)
                    return
                except RayActorError:  # unavailable: its node is not yet declared dead
                    time.sleep(1.0)
                    continue
                self._idle.put(actor)
                return

        threading.Thread(target=wait_for_it, name=f"{self.stage_name}-actor-recovery", daemon=True).start()

    def run_shard(self, shard: str, *, force: bool = False, wait: bool = True) -> ShardResult:
        import ray
        from ray.exceptions import RayActorError

        losses = 0
        while True:
            actor = self._take()
            try:
                result = ray.get(actor.run_shard.remote(shard, force, wait))
            except RayActorError as e:
                if e.actor_init_failed:  # building the stage failed (a bug or a bad config): not a lost node
                    self._dead.add(actor._actor_id.hex())
                    raise
                losses += 1
                self._recover(actor)
                cause = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                if losses > self.retries:
                    raise ShardActorLost(
                        f"{self.stage_name} shard {shard}: its Ray actor was lost {losses} times ({cause}); "
                        "the flow retries it"
                    ) from e
                log.warning("%s shard %s: its Ray actor was lost (%s); retrying it on the pool (%d/%d)",
                            self.stage_name, shard, cause, losses, self.retries)
                continue
            except BaseException:
                self._idle.put(actor)
                raise
            self._idle.put(actor)
            return result

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

        actors, self.actors = self.actors, []
        for actor in actors:
            ray.kill(actor, no_restart=True)


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


__all__ = ["FORWARDED_ENV", "LOCAL_NODE_IP", "ShardActorLost", "ShardActorPool", "ShardWorker",
           "check_local_resources", "forwarded_env", "project_runtime_env", "ray_node", "shard_runner", "start_ray"]
