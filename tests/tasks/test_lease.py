"""Shard leases: two runs of one stage at once process every shard exactly once; stale leases are
taken over by exactly one taker; the flow passes over a held shard and comes back to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from storage import DatasetLayout, write_json
from storage.fs import join, open_fs
from tasks.config import PipelineConfig, Section
from tasks.lease import ShardLeases
from tasks.stage import ShardOutcome, Stage, run_stage

REPO = Path(__file__).resolve().parents[2]
SHARDS = [f"{i:05d}" for i in range(6)]

# A stage whose shards take a while and say in a side file which process ran them.
SLEEPY = textwrap.dedent("""
    import os, time
    from collections import Counter
    from tasks.config import Section
    from tasks.stage import ShardOutcome, Stage

    class SleepySection(Section):
        seconds: float = 0.5

    class SleepyStage(Stage):
        name = "sleepy"
        task_name = "sleep_on_shard"

        def __init__(self, config, side_file, shards, seconds=0.5):
            super().__init__(config)
            self.side_file, self.shards, self._section = side_file, shards, SleepySection(seconds=seconds)

        @property
        def section(self):
            return self._section

        def list_shards(self):
            return list(self.shards)

        def process(self, shard):
            with open(self.side_file, "a") as f:  # O_APPEND: one whole line per call
                f.write(f"{shard} {os.getpid()}\\n")
            time.sleep(self.section.seconds)
            return ShardOutcome(Counter(rows=1))
""")
namespace: dict = {}
exec(compile(SLEEPY, "sleepy_stage", "exec"), namespace)  # noqa: S102 - the same code the runs below use
SleepyStage = namespace["SleepyStage"]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A dataset root on local disk, or on the loopback S3 server (leases by conditional put)."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_server").prefix("leases")


def lease_files(root: str, stage: str = "sleepy") -> list[str]:
    """The names under ``<root>/_leases/<stage>`` (leases, takeover markers, temporaries), as stored now."""
    fs, path = open_fs(join(root, "_leases", stage))
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) if fs.exists(path) else []


def config(root, ttl: float = 300.0) -> PipelineConfig:
    return PipelineConfig.model_validate({"dataset": {"root": str(root), "lease_ttl_s": ttl}})


def side_calls(path) -> Counter:
    return Counter(line.split()[0] for line in Path(path).read_text().splitlines()) if Path(path).exists() else Counter()


def test_two_concurrent_runs_process_every_shard_exactly_once(tmp_path, root):
    side, go = tmp_path / "calls.txt", tmp_path / "go"
    script = SLEEPY + textwrap.dedent(f"""
        import json, logging, sys
        from tasks.config import PipelineConfig
        from tasks.stage import run_stage
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        stage = SleepyStage(PipelineConfig.model_validate({{"dataset": {{"root": {root!r}}}}}),
                            {str(side)!r}, {SHARDS!r})
        while not os.path.exists({str(go)!r}):  # both runs start together
            time.sleep(0.01)
        summary = run_stage(stage)
        print(json.dumps({{"last_run": summary["last_run"], "done": summary["num_shards_done"]}}))
    """)
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,  # env: S3's too
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(3)  # both imported and polling
    go.touch()
    outs = [run.communicate(timeout=120) for run in runs]
    for run, (out, err) in zip(runs, outs):
        assert run.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]

    assert side_calls(side) == Counter(dict.fromkeys(SHARDS, 1))  # each shard processed once, in all
    processed = [set(s["last_run"]["processed"]) for s in summaries]
    assert processed[0].isdisjoint(processed[1]) and processed[0] | processed[1] == set(SHARDS)
    for s in summaries:  # both runs end with every shard done
        assert s["done"] == len(SHARDS) and sorted(s["last_run"]["processed"] + s["last_run"]["skipped"]) == SHARDS
    # They really ran at once: one of them found a shard held by the other (and said so).
    assert any("held by run" in err for _, err in outs), [err[-2000:] for _, err in outs]
    assert lease_files(root) == []  # every lease released


def stale_lease(leases: ShardLeases, shard: str, **holder) -> dict:
    body = {"run_id": "other", "host": "elsewhere", "pid": 1, "renewed_at": time.time() - 1000,
            "acquired_at": time.time() - 2000, "token": "t-stale", **holder}
    write_json(leases.path(shard), body)
    return body


def test_stale_and_dead_leases_are_taken_over_live_ones_waited_for(tmp_path, root):
    cfg = config(root, ttl=2.0)
    stage = SleepyStage(cfg, str(tmp_path / "calls.txt"), ["00000", "00001", "00002", "00003"], seconds=0.0)
    leases = ShardLeases(stage.layout, "sleepy", "other-run", 2.0)
    stale_lease(leases, "00000")  # renewed long ago
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale_lease(leases, "00001", host=socket.gethostname(), pid=int(dead.stdout), renewed_at=time.time())
    # A live lease of another run on another host: renewed now, never again (its holder hangs).
    stale_lease(leases, "00002", renewed_at=time.time(), token="t-live")

    started = time.monotonic()
    summary = run_stage(stage)
    waited = time.monotonic() - started
    assert summary["last_run"]["processed"] == ["00000", "00001", "00002", "00003"]
    assert side_calls(tmp_path / "calls.txt") == Counter(dict.fromkeys(["00000", "00001", "00002", "00003"], 1))
    # The held shard came last, once its lease was older than the TTL.
    order = [line.split()[0] for line in (tmp_path / "calls.txt").read_text().splitlines()]
    assert order[-1] == "00002" and waited >= 1.0
    assert lease_files(root) == []  # leases and markers released
    rec = stage.records.get("00003")
    assert rec.node["host"] == socket.gethostname() and rec.node["pid"] == os.getpid()


def test_a_lease_is_created_exclusively(root):
    """Local: a link onto the name; S3: a conditional put (If-None-Match: *). A second create of the name
    fails and leaves the first's bytes; of eight runs asking for a free shard at once, one gets it."""
    from storage.fs import read_bytes

    layout = DatasetLayout(root)
    url = join(root, "_leases", "sleepy", "probe.json")
    first, second = ShardLeases(layout, "sleepy", "run-a", 60.0), ShardLeases(layout, "sleepy", "run-b", 60.0)
    assert first._create_exclusive(url, b"first")
    assert not second._create_exclusive(url, b"second")
    assert read_bytes(url) == b"first"

    barrier = threading.Barrier(8)
    got: list = []

    def acquire(i):
        leases = ShardLeases(layout, "sleepy", f"run-{i}", 60.0)
        barrier.wait()
        lease, holder = leases.try_acquire("00007")
        got.append((i, lease, holder))

    threads = [threading.Thread(target=acquire, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [(i, lease) for i, lease, _ in got if lease is not None]
    assert len(got) == 8 and len(winners) == 1
    (winner, lease), = winners
    assert all(holder["run_id"] == f"run-{winner}" and holder["token"] == lease.body["token"]
               for _, lease_, holder in got if lease_ is None)
    lease.release()
    after, _ = second.try_acquire("00007")
    assert after is not None
    after.release()
    assert lease_files(root) == ["probe.json"]


def test_a_lease_read_while_it_is_renewed_is_always_whole(root):
    """Reading a lease while its holder rewrites it (a renewal: a new object under the name on S3) gives
    the old or the new body, never an error or a torn read, which would look like another holder."""
    layout = DatasetLayout(root)
    leases = ShardLeases(layout, "sleepy", "reader", 60.0)
    body = {"run_id": "holder", "host": "elsewhere", "pid": 7, "renewed_at": time.time(), "token": "t-held"}
    write_json(leases.path("00000"), body)
    stop = threading.Event()
    renewals = []

    def renew():
        while not stop.is_set():  # bodies of different lengths, as renewal times are
            write_json(leases.path("00000"), {**body, "renewed_at": time.time(), "pad": "x" * (len(renewals) % 7)})
            renewals.append(1)

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        deadline, reads = time.monotonic() + 2.0, []
        while time.monotonic() < deadline:
            reads.append(leases.read("00000"))
    finally:
        stop.set()
        renewer.join()
    assert len(renewals) > 5 and len(reads) > 20
    assert all(r is not None and r["token"] == "t-held" and r["run_id"] == "holder" for r in reads)


def test_of_many_takers_of_a_stale_lease_exactly_one_wins(root):
    layout = DatasetLayout(root)
    stale_lease(ShardLeases(layout, "sleepy", "x", 5.0), "00000")
    barrier = threading.Barrier(8)
    won: list = []

    def take(i):
        leases = ShardLeases(layout, "sleepy", f"run-{i}", 5.0)
        barrier.wait()
        lease, holder = leases.try_acquire("00000")
        if lease is not None:
            won.append(lease)
        else:
            assert holder is not None

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert ShardLeases(layout, "sleepy", "y", 5.0).read("00000")["token"] == won[0].body["token"]
    won[0].release()
    assert ShardLeases(layout, "sleepy", "y", 5.0).read("00000") is None


def test_a_lease_is_renewed_while_its_shard_runs(root):
    layout = DatasetLayout(root)
    leases = ShardLeases(layout, "sleepy", "run-a", 0.6)
    lease, _ = leases.try_acquire("00000")
    try:
        first = leases.read("00000")["renewed_at"]
        time.sleep(1.0)  # > ttl: without the heartbeat it would be stale now
        other = ShardLeases(layout, "sleepy", "run-b", 0.6)
        assert leases.read("00000")["renewed_at"] > first
        assert other.try_acquire("00000")[0] is None
    finally:
        lease.release()
    taken, _ = other.try_acquire("00000")
    assert taken is not None
    taken.release()


@pytest.mark.usefixtures("prefect_harness")
def test_flow_passes_over_a_held_shard_then_takes_the_other_runs_record(tmp_path):
    """Under Prefect: the held shard is not processed; once the other run records it, it is a skip."""
    from prefect import flow

    from pipelines.stage_flow import run_stage_flow

    cfg = config(tmp_path / "root")
    stage = SleepyStage(cfg, str(tmp_path / "calls.txt"), ["00000", "00001", "00002"], seconds=0.0)
    other = SleepyStage(cfg, str(tmp_path / "other-calls.txt"), ["00000", "00001", "00002"], seconds=0.0)
    lease, _ = other.leases.try_acquire("00001")  # the other run is working on shard 00001

    def other_run_finishes():
        while len(side_calls(tmp_path / "calls.txt")) < 2:  # our run did the rest first
            time.sleep(0.05)
        time.sleep(0.5)
        with lease:
            other._process_shard("00001", other.fingerprint("00001"), False)

    finisher = threading.Thread(target=other_run_finishes)
    finisher.start()

    @flow(name="sleepy")
    def sleepy_flow():
        return run_stage_flow(stage)

    summary = sleepy_flow()
    finisher.join()
    assert summary["last_run"] == {"processed": ["00000", "00002"], "skipped": ["00001"]}
    assert set(side_calls(tmp_path / "calls.txt")) == {"00000", "00002"}
    assert set(side_calls(tmp_path / "other-calls.txt")) == {"00001"}
    assert summary["num_shards_done"] == 3
