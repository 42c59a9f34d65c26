"""A Ray cluster of several nodes on this machine, for the cluster-mode tests and benchmarks.

``LocalCluster`` starts a head and worker nodes with ``ray start --block``, each in its own
session (its own process group), on 127.0.0.2 (Ray rewrites 127.0.0.1 to the host's
address; any other 127.x keeps every Ray message on loopback), with its own short temp
dir, no dashboard, and every port it listens on free or chosen by the OS (another Ray on
the machine may hold the defaults). It never runs ``ray stop`` (that stops every Ray on the
machine): ``kill_node`` SIGKILLs one node's processes (the ``ray start`` process, its raylet,
the raylet's workers), found from the pid this module started, as a lost machine would
vanish; ``restart_node`` starts a fresh node with the same name and resources;
``shutdown`` ends only the processes this module started.

Each node carries a custom resource named after it (``{"node_a": 1}``), so a test can place
work on a node, find which node an actor runs on, or kill the node that holds it. Nodes
are found in the GCS by that resource. The GCS marks a killed node dead only after its
health checks fail: the head is started with shorter checks (about 2-5 s instead of ~13 s).

    with LocalCluster(head_cpus=0, workers={"node_a": 2, "node_b": 2}) as cluster:
        config = {"ray": {"address": cluster.address}, ...}
        cluster.kill_node("node_a")
        cluster.restart_node("node_a")
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NODE_IP = "127.0.0.2"
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")

# The GCS declares a node dead after `threshold` failed checks `period` apart (Ray's defaults:
# 3 s x 5, ~13 s with the timeouts). A killed raylet refuses the connection at once, so short
# checks find it in a few seconds; the threshold stays at 5 so a busy 2-core host is not
# mistaken for a dead one.
HEAD_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "3000",
    "RAY_health_check_failure_threshold": "5",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    num_cpus: float
    resources: dict[str, float]
    head: bool = False
    proc: subprocess.Popen | None = None
    temp_dir: str = ""
    log: str = ""
    node_id: str | None = None
    generation: int = 0  # bumped by each restart
    extra: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalCluster:
    """A head and named worker nodes on this machine (see the module docstring).

    ``workers`` maps a node name to its CPUs (or to ``{"num_cpus": n, "resources": {...}}``).
    ``object_store_mb``: each node's object store (Ray's default, 30% of the RAM per node, is
    far more than tests need). ``env``: extra environment of every node (a node's workers see
    only the environment of the ``ray start`` that started it); the driver's storage settings
    (``tasks.ray_actors.FORWARDED_ENV``: AWS_*, ...) are left out unless ``env`` names them.
    """

    def __init__(self, *, head_cpus: float = 1, workers: dict | None = None, object_store_mb: int = 128,
                 env: dict[str, str] | None = None, base_dir: str | None = None):
        workers = {"node_a": 1, "node_b": 1} if workers is None else workers
        # Short: Ray puts its sockets under the temp dir (107-byte limit on a socket path).
        self.base_dir = tempfile.mkdtemp(prefix="gcc-", dir=base_dir or "/tmp")
        self.object_store_mb = object_store_mb
        # Not the driver's storage settings (AWS_* and the rest of FORWARDED_ENV): a cluster's nodes
        # do not share the shell of whoever runs the pipeline, which forwards them itself (start_ray's
        # runtime_env). Else a cluster started after the `s3_server` fixture would hide a forwarding bug.
        from tasks.ray_actors import forwarded_env

        driver_only = forwarded_env()
        self.env = {**{k: v for k, v in os.environ.items() if k not in driver_only},
                    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
                    **(env or {})}
        self.port = free_port()
        self.address = f"{NODE_IP}:{self.port}"
        self.nodes: dict[str, Node] = {"head": Node("head", head_cpus, {"head": 1}, head=True)}
        for name, spec in workers.items():
            spec = spec if isinstance(spec, dict) else {"num_cpus": spec}
            self.nodes[name] = Node(name, spec["num_cpus"], {name: 1, **spec.get("resources", {})})

    # -- start ---------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> LocalCluster:
        try:
            # All at once: a worker's `ray start` waits for the head's GCS by itself.
            for node in self.nodes.values():
                self._launch(node)
            self._wait_for(list(self.nodes), timeout)
        except BaseException:
            self.shutdown()
            raise
        return self

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _command(self, node: Node) -> list[str]:
        cmd = [RAY, "start", "--block", f"--node-ip-address={NODE_IP}", f"--num-cpus={node.num_cpus:g}",
               "--num-gpus=0", f"--resources={json.dumps(node.resources)}",
               f"--object-store-memory={self.object_store_mb * 2**20}",
               f"--temp-dir={node.temp_dir}", "--disable-usage-stats",
               # 0: the OS picks a free port (the defaults may be taken by another Ray on the machine).
               "--dashboard-agent-listen-port=0", "--dashboard-agent-grpc-port=0", "--metrics-export-port=0",
               "--runtime-env-agent-port=0", "--node-manager-port=0", "--object-manager-port=0"]
        if node.head:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false",
                    f"--ray-client-server-port={free_port()}"]
        else:
            cmd += [f"--address={self.address}"]
        return cmd

    def _launch(self, node: Node) -> None:
        node.generation += 1
        node.temp_dir = os.path.join(self.base_dir, f"{node.name[:6]}{node.generation}")
        os.makedirs(node.temp_dir, exist_ok=True)
        node.log = os.path.join(self.base_dir, f"{node.name}-{node.generation}.log")
        node.node_id = None
        env = {**self.env, **(HEAD_ENV if node.head else {})}
        with open(node.log, "wb") as log:
            # A session of its own: the node's processes are one process group, apart from pytest's.
            node.proc = subprocess.Popen(self._command(node), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=str(REPO), start_new_session=True)

    def _node_infos(self) -> list[dict]:
        """Every node the GCS knows (alive or dead): id, state, resources."""
        from ray._raylet import GcsClient

        if not hasattr(self, "_gcs"):
            self._gcs = GcsClient(address=self.address)
        infos = []
        for node_id, info in self._gcs.get_all_node_info(timeout=10).items():
            infos.append({"node_id": node_id.hex(), "alive": info.state == 0,
                          "resources": dict(info.resources_total), "head": info.is_head_node})
        return infos

    def _gcs_listening(self) -> bool:
        try:
            socket.create_connection((NODE_IP, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def _wait_for(self, names: list[str], timeout: float) -> None:
        """Until each named node is alive in the GCS (and record its node id)."""
        deadline = time.monotonic() + timeout
        while True:
            for name in names:
                node = self.nodes[name]
                if not node.alive and not node.node_id:
                    # `ray start` gives a raylet 30 s to register with the GCS, which a busy 2-core
                    # host can exceed: start it again, twice at most.
                    if node.extra.get("relaunches", 0) >= 2:
                        raise RuntimeError(f"ray node {name} exited ({node.proc.returncode}): {self.log_tail(name)}")
                    node.extra["relaunches"] = node.extra.get("relaunches", 0) + 1
                    self.kill_node(name, wait_dead=False)
                    self._launch(node)
            try:
                infos = self._node_infos() if self._gcs_listening() else []
            except Exception:  # the GCS is not up yet
                infos = []
            for name in names:
                node = self.nodes[name]
                # A restarted node has the same resource name: take the live one not seen before.
                for info in infos:
                    if info["alive"] and name in info["resources"] and info["node_id"] != node.extra.get("dead_id"):
                        node.node_id = info["node_id"]
            if all(self.nodes[n].node_id for n in names):
                return
            if time.monotonic() > deadline:
                missing = [n for n in names if not self.nodes[n].node_id]
                raise TimeoutError(f"ray nodes {missing} not alive after {timeout:.0f} s: "
                                   + " | ".join(self.log_tail(n) for n in missing))
            time.sleep(0.25)

    # -- inspect -------------------------------------------------------------------------------
    def log_tail(self, name: str, chars: int = 2000) -> str:
        try:
            return Path(self.nodes[name].log).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def node_name(self, node_id: str) -> str | None:
        """The name of the node with this Ray node id (hex), or None."""
        for node in self.nodes.values():
            if node.node_id == node_id or node.extra.get("dead_id") == node_id:
                return node.name
        return None

    def alive_nodes(self) -> set[str]:
        """Names of the nodes the GCS holds alive now."""
        alive = {i["node_id"] for i in self._node_infos() if i["alive"]}
        return {n.name for n in self.nodes.values() if n.node_id in alive}

    def pids(self, name: str) -> set[int]:
        """Every process of one node: its ``ray start``, everything under it, and its process group."""
        import psutil

        node = self.nodes[name]
        if node.proc is None:
            return set()
        pids = {node.proc.pid}
        try:
            pids |= {p.pid for p in psutil.Process(node.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter():  # a process that left the tree keeps its process group
            try:
                if os.getpgid(p.pid) == node.proc.pid:
                    pids.add(p.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return pids

    # -- lose and replace nodes ----------------------------------------------------------------
    def kill_node(self, name: str, *, wait_dead: bool = True, timeout: float = 60) -> None:
        """SIGKILL every process of one node at once (a lost machine); by default wait until the
        GCS has marked it dead."""
        node = self.nodes[name]
        pids = self.pids(name)
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.wait(timeout=30)
        node.extra["dead_id"] = node.node_id
        if wait_dead:
            deadline = time.monotonic() + timeout
            while any(i["alive"] for i in self._node_infos() if i["node_id"] == node.node_id):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the GCS still holds node {name} alive {timeout:.0f} s after its kill")
                time.sleep(0.25)

    def restart_node(self, name: str, timeout: float = 120) -> str:
        """A fresh node with ``name``'s CPUs and resources (after ``kill_node``); returns its node id."""
        node = self.nodes[name]
        if node.alive:
            self.kill_node(name)
        self._launch(node)
        self._wait_for([name], timeout)
        return node.node_id

    def add_node(self, name: str, num_cpus: float = 1, resources: dict | None = None, timeout: float = 120) -> str:
        """Another worker node (custom resource ``name``); returns its node id."""
        if name in self.nodes:
            raise ValueError(f"node {name} exists")
        self.nodes[name] = Node(name, num_cpus, {name: 1, **(resources or {})})
        self._launch(self.nodes[name])
        self._wait_for([name], timeout)
        return self.nodes[name].node_id

    def ensure_nodes(self, timeout: float = 120) -> None:
        """Restart any worker node that a test killed (the head must be alive)."""
        for name, node in self.nodes.items():
            if not node.alive and not node.head:
                self.restart_node(name, timeout)

    # -- tear down -----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """SIGKILL this cluster's processes (workers first, the head last; a graceful stop takes
        ~15 s and nothing of a test cluster needs saving) and remove its temp dirs."""
        for node in [n for n in self.nodes.values() if not n.head] + [self.nodes["head"]]:
            if node.alive:
                self.kill_node(node.name, wait_dead=False)
        shutil.rmtree(self.base_dir, ignore_errors=True)


def connect(cluster: LocalCluster, **init) -> None:
    """Make this process a driver of ``cluster`` (leaving any other Ray it was connected to)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=cluster.address, _node_ip_address=NODE_IP, log_to_driver=False, **init)


__all__ = ["LocalCluster", "NODE_IP", "connect", "free_port"]
