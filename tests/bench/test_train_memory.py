"""bench/train_memory.py: the fake-tensor estimate runs on the CPU, sees the options and the global batch,
and the planner's arithmetic."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import train_memory  # noqa: E402
from model import get_preset  # noqa: E402


@pytest.mark.slow
def test_estimate_sees_the_options_and_the_global_batch():
    sets = train_memory.option_sets(pooling_chunk=2, head_chunk=2)
    shape = dict(batch=4, captions=2, global_views=2, local_views=2, decoder_length=16)
    plain = train_memory.estimate(get_preset("debug", memory=sets["none"]), SimpleNamespace(workers=1, **shape))
    wide = train_memory.estimate(get_preset("debug", memory=sets["none"]), SimpleNamespace(workers=8, **shape))
    lean = train_memory.estimate(get_preset("debug", memory=sets["all"]), SimpleNamespace(workers=8, **shape))
    assert 0 < plain["start"] < plain["peak"]
    assert plain["ddp"] == 0 and wide["ddp"] > 0  # one more copy of the gradients with several workers
    assert wide["peak"] - wide["ddp"] > plain["peak"]  # 8x the texts to pool with and score against
    assert lean["peak"] < wide["peak"]


def test_plan_arithmetic():
    slope, fixed = train_memory.line_through([(16, 10.0), (64, 22.0)])
    assert slope == pytest.approx(0.25) and fixed == pytest.approx(6.0)
    assert train_memory.largest_batch(slope, fixed, 80.0) == 264  # 0.9 * 80 = 72 = 6 + 0.25 * 264
    assert train_memory.gpus_needed(6400, 800) == 8
    assert train_memory.gpus_needed(6400, 700) == 10  # 6,400 / 9 is not a whole batch
    assert train_memory.gpus_needed(6400, 0) is None


def test_option_sets_switch_one_option_each_then_all():
    sets = train_memory.option_sets(pooling_chunk=8, head_chunk=64)
    assert list(sets)[0] == "none" and list(sets)[-1] == "all"
    assert not any(sets["none"].values())
    assert all(sum(bool(v) for v in options.values()) == 1 for options in list(sets.values())[1:-1])
    assert all(sets["all"].values())
