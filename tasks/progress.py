"""Progress a person can read, without flooding logs nobody watches live (issue #15 item 6).

A long command says where it is in one line: done of total, the rate, the time left at that rate
(`format_duration`, `time_left`). On a terminal every update may print (and the stage flows draw
a tqdm bar); when the output is a file, a pipe or a log collector (a Prefect worker, `nohup`, CI),
`LogThrottle` lets a line through only when `every_s` seconds have passed or the work advanced by
`every_fraction` of the total since the last line, and always the first and the last line: a
command of duration T logs at most 2 + T / every_s + 1 / every_fraction progress lines.

Used by the stage flows (`ShardProgress`: shards and items with a rate and the time left, a line
at most every 60 s or 10% of the shards; pipelines/stage_flow.py) and the train flow (step, loss,
images/s, time left; pipelines/train.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# Not a terminal: a progress line at least this far apart, unless the work moved 10% since the last.
PROGRESS_EVERY_S = 60.0
PROGRESS_EVERY_FRACTION = 0.1


def format_duration(seconds: float | None) -> str:
    """7 -> "7s", 125 -> "2m05s", 7300 -> "2h01m", 273600 -> "3d04h"; None -> "-"."""
    if seconds is None:
        return "-"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    if days:
        return f"{days}d{h:02d}h"
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{s}s"


def time_left(done: float, total: float, rate: float | None) -> float | None:
    """Seconds to finish `total` from `done` at `rate` per second (None when the rate is unknown)."""
    if rate is None or rate <= 0:
        return None
    return max(total - done, 0) / rate


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


class LogThrottle:
    """`ready(done, total)`: whether to log a progress line now (see the module docstring).

    `every_fraction=None` throttles by time alone; `every_s=0` lets every line through.
    """

    def __init__(self, every_s: float = PROGRESS_EVERY_S, every_fraction: float | None = PROGRESS_EVERY_FRACTION,
                 clock: Callable[[], float] = time.monotonic):
        self.every_s, self.every_fraction, self.clock = every_s, every_fraction, clock
        self.last_time: float | None = None
        self.last_done = 0.0

    @classmethod
    def for_output(cls, every_s: float = PROGRESS_EVERY_S, stream: TextIO | None = None) -> "LogThrottle":
        """Every line on a terminal; otherwise at most one per `every_s` seconds or 10% of the work."""
        return cls(0.0, None) if is_terminal(stream) else cls(every_s, PROGRESS_EVERY_FRACTION)

    def ready(self, done: float, total: float | None = None) -> bool:
        now = self.clock()
        due = (self.last_time is None or now - self.last_time >= self.every_s
               or (total is not None and done >= total)
               or (total and self.every_fraction is not None and (done - self.last_done) / total >= self.every_fraction))
        if due:
            self.last_time, self.last_done = now, done
        return due


class ShardProgress:
    """A stage's progress over its shards: shards done of the total, its throughput count (`unit`,
    e.g. urls) finished this run and their rate, and the time left at this run's pace of shards."""

    def __init__(self, stage: str, total: int, done: int, unit: str | None, clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.done, self.unit, self.clock = stage, total, done, unit, clock
        self.started, self.finished_this_run, self.items, self.failed = clock(), 0, 0, 0

    def add(self, counts: dict[str, int] | None) -> None:
        """One more shard finished: its counts, or None when it failed."""
        self.done += 1
        self.finished_this_run += 1
        if counts is None:
            self.failed += 1
        elif self.unit:
            self.items += counts.get(self.unit, 0)

    def rate(self) -> str:
        """This run's items per second, e.g. "48,000 urls, 312.5 urls/s" (empty for a stage without a unit)."""
        if not self.unit:
            return ""
        elapsed = self.clock() - self.started
        per_s = f", {self.items / elapsed:,.1f} {self.unit}/s" if elapsed > 0 else ""
        return f"{self.items:,} {self.unit}{per_s}"

    def line(self) -> str:
        """e.g. "download: 120/3000 shards (4.0%), 48,000 urls, 312.5 urls/s, 1h02m left, 1 shard failed"."""
        elapsed = self.clock() - self.started
        pace = self.finished_this_run / elapsed if elapsed > 0 and self.finished_this_run else None
        parts = [f"{self.stage}: {self.done}/{self.total} shards ({100 * self.done / max(self.total, 1):.1f}%)"]
        parts += [self.rate()] if self.unit else []
        parts.append(f"{format_duration(time_left(self.done, self.total, pace))} left")
        parts += [f"{self.failed} shard(s) failed"] if self.failed else []
        return ", ".join(parts)
