"""The vqa stage's servers on a Ray cluster (``vqa.openai.server.placement: ray``).

One Ray actor per server, pinned to its node (``NodeAffinitySchedulingStrategy``)
and reserving the server's GPUs: by default one server per GPU on every alive
node with GPUs (``num_gpus_per_server``, ``servers_per_node``, ``node_resource``
choose otherwise). Each actor starts the server command as a subprocess with
``CUDA_VISIBLE_DEVICES`` set to the GPU ids Ray assigned to it, bound to its
node's address (``ray.util.get_node_ip_address()``) on a free port (or
``base_port`` + its number on the node), waits until ``GET /health`` answers 200,
and reports its URL. The URLs go to the openai backend's least-loaded client
(``tasks/annotate/vqa_backends.py``), which takes a dead server out of the
rotation and sends its requests to the others.

No orphans: the server runs in a process group (session) of its own, which
``stop`` ends (SIGTERM, then SIGKILL, so the engine and GPU workers ``vllm serve``
spawns go too). If the actor dies instead (``ray.kill``, a crashed worker, a lost
raylet), Ray kills the actor's direct child, the server process, but not the
processes that process started. So the server is launched through this file run as
a script: it forks a watchdog into the server's group, then becomes the server
(``exec``); the watchdog holds the read end of a pipe whose only writer is the
actor, and when that pipe closes (the actor process is gone, however it died) it
stops the whole group.

This module imports only the standard library at the top, so that ``python
vqa_servers.py`` works without the project on the path; Ray and the project's
modules are imported where they are used.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.config import RayConfig
    from tasks.config.annotate import ManagedServerConfig, RayServerPlacementConfig

log = logging.getLogger(__name__)

ACTOR_CALL_TIMEOUT_S = 30.0


def plan_servers(nodes: list[dict], placement: RayServerPlacementConfig) -> list[tuple[str, str, int]]:
    """``(node id, node address, servers)`` for every alive node that takes servers, from ``ray.nodes()``."""
    plan = []
    for node in nodes:
        have = node.get("Resources") or {}
        if not node.get("Alive") or (placement.node_resource and have.get(placement.node_resource, 0) <= 0):
            continue
        gpus = have.get("GPU", 0)
        if placement.num_gpus_per_server > gpus:
            continue
        count = placement.servers_per_node or int(gpus // placement.num_gpus_per_server)
        if count:
            plan.append((node["NodeID"], node["NodeManagerAddress"], count))
    return plan


class ServerActor:
    """The body of one server's actor: start, health-check, poll and stop one server on this node."""

    def __init__(self, cfg: ManagedServerConfig, model: str, index: int, slot: int):
        self.cfg = cfg
        self.model = model
        self.index = index  # the server's number in the stage ({index})
        self.slot = slot  # its number on this node (base_port + slot)
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self._life_w: int | None = None  # the watchdog's pipe: closed when this process exits, however
        self._stopping = False

    def start(self) -> dict:
        import ray

        from tasks.annotate.vqa_backends import free_port

        host = ray.util.get_node_ip_address()
        port = self.cfg.base_port + self.slot if self.cfg.base_port else free_port(host)
        gpu_ids = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
        gpus = ",".join(gpu_ids)
        fill = {"model": self.model, "host": host, "port": port, "index": self.index, "gpus": gpus}
        argv = [arg.format(**fill) for arg in shlex.split(self.cfg.command)]  # split first: paths may hold spaces
        env = {**os.environ, **{k: v.format(**fill) for k, v in self.cfg.env.items()}}
        if self.cfg.ray.num_gpus_per_server > 0:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        log_dir = Path(self.cfg.log_dir or os.environ.get("TMPDIR", "/tmp"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"goldiclip-vqa-server-{time.strftime('%Y%m%d-%H%M%S')}-{self.index}-{host}-port{port}.log"
        life_r, self._life_w = os.pipe()  # both ends non-inheritable; only life_r is passed on
        try:
            with open(log_path, "ab") as log_file:
                launcher = [sys.executable, os.path.abspath(__file__), "--life-fd", str(life_r),
                            "--stop-timeout", str(self.cfg.stop_timeout_s), "--", *argv]
                self.proc = subprocess.Popen(launcher, stdout=log_file, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, pass_fds=(life_r,),
                                             start_new_session=True)
        finally:
            os.close(life_r)
        self.info = {"index": self.index, "node_id": ray.get_runtime_context().get_node_id(), "host": host,
                     "port": port, "pid": self.proc.pid, "gpus": gpu_ids, "log": str(log_path),
                     "url": f"http://{host}:{port}/v1", "argv": argv}
        return self.info

    def wait_healthy(self) -> dict:
        from tasks.annotate.vqa_backends import _tail

        deadline = time.monotonic() + self.cfg.startup_timeout_s
        health = f"http://{self.info['host']}:{self.info['port']}/health"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vqa server {self.index} on {self.info['host']} exited with code {self.proc.returncode} while "
                    f"starting; log {self.info['log']} ends with:\n{_tail(Path(self.info['log']))}"
                )
            if self._stopping:
                raise RuntimeError(f"vqa server {self.index} stopped while starting")
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        return self.info
            if time.monotonic() > deadline:
                raise RuntimeError(f"vqa server {self.index} on {self.info['host']} not healthy after "
                                   f"{self.cfg.startup_timeout_s}s (GET /health); log: {self.info['log']}")
            time.sleep(0.25)

    def poll(self) -> str | None:
        """A description if the server process has exited, else None."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return (f"server {self.index} (pid {self.proc.pid} on {self.info['host']}) exited with code "
                f"{self.proc.returncode}; log: {self.info['log']}")

    def stop(self) -> None:
        """SIGTERM to the server's group, SIGKILL after ``stop_timeout_s`` (also to the watchdog and any worker)."""
        self._stopping = True
        proc = self.proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.cfg.stop_timeout_s)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._life_w is not None:
            os.close(self._life_w)
            self._life_w = None


class RayServers:
    """Start the servers on the cluster's nodes, wait until healthy, stop them on exit (``ManagedServers``' API)."""

    def __init__(self, cfg: ManagedServerConfig, model: str, ray_settings: RayConfig):
        self.cfg = cfg
        self.model = model
        self.ray_settings = ray_settings
        self.actors: list = []
        self.servers: list[dict] = []  # each server's ``ServerActor.info``

    @property
    def base_urls(self) -> list[str]:
        return [s["url"] for s in self.servers]

    @property
    def logs(self) -> list[str]:
        """Where each server logs, as ``node-address:path`` (the file is on that node)."""
        return [f"{s['host']}:{s['log']}" for s in self.servers]

    def __enter__(self) -> RayServers:
        atexit.register(self.stop)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from tasks.config import ConfigError
        from tasks.ray_actors import start_ray

        start_ray(self.ray_settings)
        placement = self.cfg.ray
        plan = plan_servers(ray.nodes(), placement)
        if not plan:
            nodes = {n["NodeManagerAddress"]: {k: v for k, v in (n.get("Resources") or {}).items()
                                               if k in ("CPU", "GPU") or k == placement.node_resource}
                     for n in ray.nodes() if n.get("Alive")}
            raise ConfigError(
                f"vqa.openai.server.ray: no alive Ray node takes a server (num_gpus_per_server="
                f"{placement.num_gpus_per_server:g}, node_resource={placement.node_resource!r}); nodes: {nodes}"
            )
        index = 0
        for node_id, address, count in plan:
            for slot in range(count):
                actor = ray.remote(ServerActor).options(
                    num_gpus=placement.num_gpus_per_server, num_cpus=placement.num_cpus_per_server,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                    max_restarts=0, max_concurrency=4,  # poll and stop answer while wait_healthy runs
                ).remote(self.cfg, self.model, index, slot)
                self.actors.append(actor)
                log.info("vqa server %d: actor on node %s (%s), %g GPU(s)", index, address, node_id[:12],
                         placement.num_gpus_per_server)
                index += 1
        try:
            self.servers = ray.get([a.start.remote() for a in self.actors], timeout=self.cfg.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"vqa server actors not started after {self.cfg.startup_timeout_s}s: their nodes lack free "
                f"resources ({placement.num_gpus_per_server:g} GPU, {placement.num_cpus_per_server:g} CPU each; "
                "another stage's actors may hold them)"
            ) from None
        for s in self.servers:
            log.info("vqa server %d starting on %s (GPUs %s, pid %d): %s; log: %s:%s", s["index"], s["url"],
                     s["gpus"] or "none", s["pid"], shlex.join(s["argv"]), s["host"], s["log"])
        ray.get([a.wait_healthy.remote() for a in self.actors])
        log.info("vqa servers healthy: %s", self.base_urls)

    def dead(self) -> str | None:
        """A description when every server is gone (its process exited, or its actor or node died), else None.

        One dead server among live ones is not fatal: the client sends its requests to the others.
        """
        import ray

        if not self.actors:
            return None
        gone = []
        refs = [a.poll.remote() for a in self.actors]
        for i, ref in enumerate(refs):
            try:
                what = ray.get(ref, timeout=ACTOR_CALL_TIMEOUT_S)
            except Exception as e:  # a dead actor or node
                what = f"server {i}: {type(e).__name__}"
            if what is None:
                return None
            gone.append(what)
        return f"all {len(gone)} vqa servers gone: " + "; ".join(gone)

    def stop(self) -> None:
        """Stop every server (each actor stops its group), then the actors; a dead actor's watchdog did it already."""
        import ray

        if self.actors:
            refs = [a.stop.remote() for a in self.actors]
            with contextlib.suppress(Exception):
                ray.wait(refs, num_returns=len(refs), timeout=self.cfg.stop_timeout_s + ACTOR_CALL_TIMEOUT_S)
            for actor in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            log.info("vqa server(s) stopped; logs: %s", self.logs)
        self.actors = []
        atexit.unregister(self.stop)


def _watch(life_fd: int, stop_timeout: float) -> None:
    """The watchdog: wait until the actor's end of the pipe closes, then stop the whole group (itself included)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM is for the server
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            if not os.read(life_fd, 4096):
                break  # EOF: the actor's process is gone
        except InterruptedError:
            continue
        except OSError:
            break
    group = os.getpgrp()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + stop_timeout
    while time.monotonic() < deadline and _running(group):
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Is ``pid`` (the group leader, the server) still running (not gone, not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _launch(args: list[str]) -> None:
    """``--life-fd N --stop-timeout S -- argv...``: fork the watchdog, then become the server."""
    split = args.index("--")
    opts, argv = args[:split], args[split + 1:]
    life_fd = int(opts[opts.index("--life-fd") + 1])
    stop_timeout = float(opts[opts.index("--stop-timeout") + 1])
    if os.fork() == 0:
        try:
            _watch(life_fd, stop_timeout)
        finally:
            os._exit(0)
    os.close(life_fd)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"cannot run {argv[0]}: {e}", flush=True)
        os._exit(127)


if __name__ == "__main__":
    _launch(sys.argv[1:])
