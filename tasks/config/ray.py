"""Where Ray work runs: the cluster (`ray:`) and a stage's actor pool (`<stage>.actors`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import Section


class RayConfig(Section):
    """The Ray cluster of the stages that run on Ray: train, and boxes/vqa with `actors.executor: ray`."""

    address: str | None = Field(
        default=None,
        description="Join this Ray cluster (`auto`, `ray://head:10001`); None: start a local Ray in the flow's process.",
    )
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray (None: all of the machine's).")
    temp_dir: str | None = Field(
        default=None,
        description="Session directory of a local Ray (default <tmp>/goldiclip-ray); keep it short, Ray puts "
        "its sockets there.",
    )
    node_ip_address: str | None = Field(
        default=None,
        description="Address of this process's Ray node. None: 127.0.0.2 for a local Ray (Ray rewrites "
        "127.0.0.1 to the host's network address; any other 127.x keeps every Ray message on loopback), "
        "Ray's own choice when joining a cluster.",
    )
    ship_code: bool = Field(
        default=True,
        description="Joining a cluster: upload this checkout's tasks/, model/ and storage/ with the job (Ray "
        "runtime_env py_modules), so workers run the driver's code; off when the nodes' image has the same version.",
    )


class ActorPoolConfig(Section):
    """Where a stage runs its shards: in the flow's process, or on a pool of Ray actors.

    With ``executor: ray`` each actor builds the stage once (a model stage loads its model
    once) and takes whole shards, one at a time (one actor per GPU is the usual shape for
    boxes and vqa; CPU actors for download, captions, phrases and shards); the flow still
    runs one Prefect task per shard, so the UI shows per-shard runs, logs and retries. Actors read and write the
    dataset root themselves: on a cluster it must be shared storage (an fsspec URL or a
    shared file system). ``ray`` (top level) says which cluster.
    """

    executor: Literal["local", "ray"] = Field(
        default="local", description="local: shards run in the flow's process; ray: on a pool of Ray actors."
    )
    num_actors: int = Field(default=1, ge=1, description="Actors in the pool (e.g. the number of GPUs).")
    num_gpus_per_actor: float = Field(default=1.0, ge=0, description="GPUs each actor reserves (0: a CPU actor).")
    num_cpus_per_actor: float = Field(default=4.0, gt=0, description="CPUs each actor reserves (its decode threads, tokenising).")
    max_restarts: int = Field(
        default=2, ge=0,
        description="Times a dead actor (lost node, killed process) is restarted; a shard whose actor was lost "
        "is retried on the pool up to this many times, then fails as an I/O error (the flow's retries apply).",
    )


class CpuActorPoolConfig(ActorPoolConfig):
    """``ActorPoolConfig`` with CPU defaults, for the stages that need no GPU (download, captions, shards)."""

    num_gpus_per_actor: float = Field(default=0.0, ge=0, description="GPUs each actor reserves (0: a CPU actor).")
    num_cpus_per_actor: float = Field(
        default=1.0, gt=0,
        description="CPUs each actor reserves; match what the stage uses in it (download: `processes`, "
        "phrases: `n_process`).",
    )


class TwoCpuActorPoolConfig(CpuActorPoolConfig):
    """CPU actors sized for a stage whose shard runs two worker processes by default (download, phrases)."""

    num_cpus_per_actor: float = Field(
        default=2.0, gt=0,
        description="CPUs each actor reserves; match what the stage uses in it (download: `processes`, "
        "phrases: `n_process`, both 2 by default).",
    )
