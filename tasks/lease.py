"""Per-shard leases on storage: two runs of one stage never process the same shard at once.

A run about to process a shard creates ``<root>/_leases/<stage>/<shard>.json``
*exclusively*: a local root links a complete temporary file to the name (``link``
fails when the name exists), an object store uses ``open(path, "xb")``, which s3fs
sends as a conditional put (``If-None-Match: *``); only one creator wins. The lease
says who holds it (run id, host, pid, Ray node) and is renewed by a heartbeat thread
every third of its TTL; it is deleted when the shard is recorded or fails.

A lease is *stale*, and may be taken over, when it was last renewed more than the TTL
ago (its holder died without releasing it), when its holder is a process on this host
that no longer runs, or when it belongs to the same run (an earlier attempt at the
shard, e.g. on a Ray actor whose node was lost: the run only retries a shard once that
attempt has failed). A taker first creates ``<shard>.json.takeover-<token of the stale
lease>`` exclusively; only the one that did deletes the stale lease and creates its own
(exclusively again), so of several takers exactly one wins.

What a run does with a shard another live run holds is the orchestrator's choice
(``Stage.run_shard``): skip it, process the others, then wait until the holder
records it as done (or fails, or dies) and only then take it. So two runs of a stage
at once each end with every shard done, and no shard is processed twice.

Clocks: staleness compares the holder's renewal time with this host's clock; the
TTL (``dataset.lease_ttl_s``, default 300 s) must be far larger than clock skew.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid

from storage.fs import join, local_path, open_fs, write_json
from storage.layout import DatasetLayout, shard_name

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def describe_holder(holder: dict) -> str:
    age = time.time() - float(holder.get("renewed_at", 0))
    return (f"run {holder.get('run_id', '?')} on host {holder.get('host', '?')} (pid {holder.get('pid', '?')}, "
            f"renewed {age:.0f}s ago)")


class Lease:
    """A lease this process holds; renewed in the background until ``release``. A context manager."""

    def __init__(self, leases: ShardLeases, shard: str, body: dict, marker: str | None = None):
        self.leases = leases
        self.shard = shard
        self.body = body
        self.marker = marker  # the takeover marker this lease was won with (deleted on release)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{leases.stage}-{shard}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        interval = self.leases.ttl_s / 3
        renewed = time.monotonic()
        while not self._stop.wait(interval):
            if time.monotonic() - renewed > self.leases.ttl_s:  # stale by now: another run may take it
                self.lost = True
                log.warning("%s shard %s: lease not renewed for %.0f s (storage failing); giving it up",
                            self.leases.stage, self.shard, self.leases.ttl_s)
                return
            try:
                current = self.leases.read(self.shard)
                if current is None or current.get("token") != self.body["token"]:
                    self.lost = True
                    log.warning("%s shard %s: lease lost (now %s); another run may redo this shard",
                                self.leases.stage, self.shard,
                                describe_holder(current) if current else "no lease")
                    return
                self.body = {**self.body, "renewed_at": time.time()}
                write_json(self.leases.path(self.shard), self.body)
                renewed = time.monotonic()
            except Exception as e:  # storage trouble: try again at the next beat, well within the TTL
                log.warning("%s shard %s: lease renewal failed: %s", self.leases.stage, self.shard, e)

    def release(self) -> None:
        """Stop renewing and delete the lease (unless another run took it over meanwhile)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=self.leases.ttl_s)
        try:
            current = self.leases.read(self.shard)
            if current is not None and current.get("token") == self.body["token"]:
                fs, path = open_fs(self.leases.path(self.shard))
                fs.rm(path)
            if self.marker:
                fs, path = open_fs(self.marker)
                fs.rm(path)
        except Exception as e:  # the lease then expires after its TTL
            log.warning("%s shard %s: lease release failed: %s", self.leases.stage, self.shard, e)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ShardLeases:
    """The leases of one stage's shards under a dataset root, taken for run ``run_id``."""

    def __init__(self, layout: DatasetLayout, stage: str, run_id: str, ttl_s: float, node: dict | None = None):
        self.layout = layout
        self.stage = stage
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.node = node or {}

    def path(self, shard: str) -> str:
        return join(self.layout.root, "_leases", self.stage, f"{shard_name(shard)}.json")

    def read(self, shard: str) -> dict | None:
        """The lease of ``shard`` as stored, or None when there is none."""
        fs, path = open_fs(self.path(shard))
        with contextlib.suppress(Exception):
            fs.invalidate_cache(path)  # object stores: another process's writes, not a cached listing
        try:
            # One whole-object GET: ``open`` + ``read`` on s3fs is a HEAD then a ranged GET pinned to
            # the HEAD's ETag, which fails (FileExpired) when the holder renews the lease in between.
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError:  # cannot happen with whole-file creates; be safe: held, renewed now
            return {"run_id": "?", "host": "?", "pid": 0, "renewed_at": time.time(), "token": None}

    def is_stale(self, holder: dict) -> bool:
        if holder.get("run_id") == self.run_id:
            return True  # an earlier attempt of this run (its process or node is gone)
        if time.time() - float(holder.get("renewed_at", 0)) > self.ttl_s:
            return True
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and not pid_alive(pid)

    def _create_exclusive(self, url: str, data: bytes) -> bool:
        """Create ``url`` holding ``data``, only if it does not exist; False when it does."""
        local = local_path(url)
        if local is not None:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local), prefix=".lease-", suffix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.link(tmp, local)  # atomic, complete, and fails when the name exists
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        fs, path = open_fs(url)
        try:
            with fs.open(path, "xb") as f:  # s3fs: a conditional put (If-None-Match: *)
                f.write(data)
            return True
        except FileExistsError:
            return False

    def _takeover_marker(self, shard: str, token: str | None) -> str:
        return f"{self.path(shard)}.takeover-{token or 'unreadable'}"

    def try_acquire(self, shard: str) -> tuple[Lease | None, dict | None]:
        """``(lease, None)`` when this run now holds ``shard``; ``(None, holder)`` when another run does.

        A stale lease is taken over by whoever first creates its takeover marker (exclusively,
        named after the stale lease's token): only that taker deletes it, so of several takers
        exactly one replaces it; the others see a held shard.
        """
        for _ in range(3):  # a lease released or taken over between the create and the read
            now = time.time()
            body = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), **self.node,
                    "stage": self.stage, "shard": shard, "acquired_at": now, "renewed_at": now,
                    "ttl_s": self.ttl_s, "token": uuid.uuid4().hex}
            if self._create_exclusive(self.path(shard), json.dumps(body, indent=1, sort_keys=True).encode()):
                return Lease(self, shard, body), None
            holder = self.read(shard)
            if holder is None:
                continue  # released meanwhile
            if not self.is_stale(holder):
                return None, holder
            marker = self._takeover_marker(shard, holder.get("token"))
            if not self._create_exclusive(marker, json.dumps(body).encode()):
                return None, holder  # another taker won this one
            if holder.get("run_id") != self.run_id:
                log.warning("%s shard %s: taking over the stale lease of %s", self.stage, shard,
                            describe_holder(holder))
            fs, path = open_fs(self.path(shard))
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
            if self._create_exclusive(self.path(shard), json.dumps(body, indent=1, sort_keys=True).encode()):
                return Lease(self, shard, body, marker), None
        holder = self.read(shard)
        return None, holder or {"run_id": "?", "host": "?", "pid": 0, "renewed_at": time.time()}


__all__ = ["Lease", "ShardLeases", "describe_holder", "new_run_id", "pid_alive"]
