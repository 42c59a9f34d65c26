"""Spawned worker processes where a dead worker costs only the call it was running (issue 13).

A ``concurrent.futures.ProcessPoolExecutor`` breaks as a whole when one worker dies
(the OOM killer is the usual cause): every running and queued call then raises
``BrokenProcessPool``, so does every later submit, and ``BrokenProcessPool`` is no
``OSError``, so the stage flow's retry on I/O trouble never fires: one death failed
every shard of a run. ``WorkerPool`` keeps one single-process executor per worker (a
slot) instead. A call takes a free slot, so a death breaks only the call that slot
was running; the slot gets a fresh process and that call runs again, up to
``retries`` times, after which it raises ``WorkerDied``, an ``OSError``, which the
flow retries like any I/O trouble. Calls on other slots never notice.

Workers are spawned, not forked: the driver holds threads (Prefect, event loops).
Stages keep one pool per driver process (``shared_pool``), so workers and what their
initializer loads (a spaCy model) outlive a shard.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import queue
import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")


class WorkerDied(ChildProcessError):
    """A worker process died (killed, out of memory) running a call, on every try."""


class WorkerPool:
    """``size`` spawned worker processes; ``run`` and ``map`` survive a worker's death (see above)."""

    def __init__(self, size: int, *, initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 retries: int = 1):
        if size < 1:
            raise ValueError(f"a worker pool needs at least one process, got {size}")
        self.size = size
        self.retries = retries
        self._initializer, self._initargs = initializer, initargs
        # Idle slots: a started executor, or None for a slot whose process is not started yet.
        self._idle: queue.SimpleQueue[cf.ProcessPoolExecutor | None] = queue.SimpleQueue()
        for _ in range(size):
            self._idle.put(None)
        self.closed = False

    def _start(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                      initializer=self._initializer, initargs=self._initargs)

    def run(self, fn: Callable[..., T], *args: Any) -> tuple[T, int]:
        """``fn(*args)`` in a worker process; returns its result and how many workers died running it.

        Raises ``WorkerDied`` when a worker died on each of ``1 + retries`` tries, and
        whatever ``fn`` raises (its worker lives on).
        """
        deaths = 0
        while True:
            slot = self._idle.get()
            try:
                slot = slot or self._start()
                return slot.submit(fn, *args).result(), deaths
            except BrokenProcessPool as exc:
                slot.shutdown(wait=True)  # its one process is gone: this only reaps it
                slot = None
                deaths += 1
                if deaths > self.retries:
                    raise WorkerDied(f"a worker process died running {getattr(fn, '__name__', fn)} "
                                     f"{deaths} times (killed, or out of memory)") from exc
            finally:
                self._release(slot)

    def map(self, fn: Callable[[Any], T], items: Iterable[Any]) -> tuple[list[T], int]:
        """``[fn(item) ...]`` over the workers, in order; and how many workers died in all."""
        with cf.ThreadPoolExecutor(self.size, thread_name_prefix="worker-pool") as threads:
            done = list(threads.map(lambda item: self.run(fn, item), items))
        return [result for result, _ in done], sum(deaths for _, deaths in done)

    def _release(self, slot: cf.ProcessPoolExecutor | None) -> None:
        if self.closed and slot is not None:
            slot.shutdown(wait=True)
            slot = None
        self._idle.put(slot)

    def shutdown(self) -> None:
        """Stop the workers: idle ones now, busy ones when their call returns.

        A call made after this still runs, on a process started for it and stopped after.
        """
        self.closed = True
        idle = []
        while True:
            try:
                idle.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for slot in idle:
            if slot is not None:
                slot.shutdown(wait=True)
            self._idle.put(None)


_lock = threading.Lock()
_shared: dict[str, tuple[Hashable, WorkerPool]] = {}


def shared_pool(owner: str, key: Hashable, make: Callable[[], WorkerPool]) -> WorkerPool:
    """This driver process's one pool for ``owner`` (a stage), made by ``make`` anew when ``key`` changes."""
    with _lock:
        current = _shared.get(owner)
        if current is None or current[0] != key or current[1].closed:
            if current is not None:
                current[1].shutdown()
            _shared[owner] = (key, make())
        return _shared[owner][1]


def close_shared(owner: str) -> None:
    """Stop ``owner``'s pool, if it has one; its next ``shared_pool`` starts fresh processes."""
    with _lock:
        current = _shared.pop(owner, None)
    if current is not None:
        current[1].shutdown()
