"""WorkerPool: real spawned processes, killed for real; a death costs only the call it was running."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tasks.worker_pool import WorkerDied, WorkerPool


def die_once(marker: str) -> int:
    """Kill this worker the first time ``marker`` is seen, as the OOM killer would; else its pid."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died")
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def die_always(_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def slow_square(x: int) -> int:
    time.sleep(0.2)
    return x * x


def square_or_die_once(item: tuple[int, str | None]) -> int:
    x, marker = item
    if marker is not None:
        die_once(marker)
    return slow_square(x)


def test_a_dead_worker_is_replaced_and_its_call_runs_again(tmp_path):
    pool = WorkerPool(1)
    try:
        pid, deaths = pool.run(die_once, str(tmp_path / "marker"))
        assert deaths == 1 and pid != os.getpid()
        assert pool.run(die_once, str(tmp_path / "marker")) == (pid, 0)  # the replacement serves later calls
    finally:
        pool.shutdown()


def test_a_call_that_kills_every_worker_raises_an_os_error():
    pool = WorkerPool(1, retries=1)
    try:
        with pytest.raises(WorkerDied, match="died running die_always 2 times") as died:
            pool.run(die_always, None)
        assert isinstance(died.value, OSError)  # what the stage flow retries
        assert pool.run(slow_square, 3) == (9, 0)
    finally:
        pool.shutdown()


def test_a_death_in_map_costs_only_its_item(tmp_path):
    pool = WorkerPool(2)
    try:
        items = [(x, str(tmp_path / "marker") if x == 3 else None) for x in range(8)]
        assert pool.map(square_or_die_once, items) == ([x * x for x in range(8)], 1)
    finally:
        pool.shutdown()


def test_calls_after_shutdown_still_run():
    pool = WorkerPool(1)
    assert pool.run(slow_square, 2) == (4, 0)
    pool.shutdown()
    assert pool.run(slow_square, 5) == (25, 0)
