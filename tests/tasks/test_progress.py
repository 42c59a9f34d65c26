"""Readable progress: durations, time left, and the throttle that keeps non-terminal logs short."""

from __future__ import annotations

import io

from tasks.progress import LogThrottle, ShardProgress, format_duration, time_left


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_format_duration():
    assert [format_duration(s) for s in (None, 0, 7, 125, 7300, 86_400 * 3 + 3600 * 4 + 59)] == [
        "-", "0s", "7s", "2m05s", "2h01m", "3d04h"]


def test_time_left():
    assert time_left(25, 100, 5.0) == 15.0
    assert time_left(100, 100, 5.0) == 0.0
    assert time_left(10, 100, None) is None and time_left(10, 100, 0.0) is None


def test_throttle_by_time_and_by_fraction_with_first_and_last_lines():
    clock = FakeClock()
    throttle = LogThrottle(every_s=60, every_fraction=0.1, clock=clock)
    passed = []
    for done in range(1, 1001):  # 1,000 units of work, one per second
        clock.now = float(done)
        if throttle.ready(done, 1000):
            passed.append(done)
    # the first, then whichever comes first of 60 s or 10% (100 units) -> every 60 s here, and the last
    assert passed[0] == 1 and passed[-1] == 1000
    assert passed[1:-1] == list(range(61, 1000, 60))
    assert len(passed) <= 2 + 1000 / 60 + 1 / 0.1


def test_throttle_lets_fast_progress_through_every_tenth():
    clock = FakeClock()
    throttle = LogThrottle(every_s=60, every_fraction=0.1, clock=clock)
    passed = [done for done in range(0, 101) if throttle.ready(done, 100)]  # all within one clock instant
    assert passed == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def test_terminal_gets_every_line_a_file_is_throttled():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    on_tty = LogThrottle.for_output(60, stream=Tty())
    assert all(on_tty.ready(done, 100) for done in range(100))
    in_file = LogThrottle.for_output(60, stream=io.StringIO())
    assert [in_file.ready(done, 1000) for done in range(3)] == [True, False, False]


def test_shard_progress_counts_this_runs_items_and_extrapolates_its_pace():
    clock = FakeClock()
    progress = ShardProgress("download", total=100, done=20, unit="urls", clock=clock)  # 20 done by an earlier run
    for _ in range(10):
        clock.now += 6.0
        progress.add({"urls": 1000, "ok": 990})
    progress.add(None)  # a failed shard counts as finished, its items as none
    # 11 shards in 60 s this run: 69 left at 11/60 per second = 376 s
    assert progress.line() == "download: 31/100 shards (31.0%), 10,000 urls, 166.7 urls/s, 6m16s left, 1 shard(s) failed"
    no_unit = ShardProgress("train", total=1, done=0, unit=None, clock=clock)
    assert no_unit.line() == "train: 0/1 shards (0.0%), - left" and no_unit.rate() == ""
