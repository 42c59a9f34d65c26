"""Orchestration cost per shard: the stage flow over a stage that does no work (issue 12).

A ``NoWorkStage`` (its ``process`` returns at once, no outputs) runs through the real
orchestration: ``run_stage_flow`` inside a Prefect flow (one Prefect task per shard, the
progress artifact, the per-shard lease and record, the summary), with its shards

- ``local``: in the flow's process, 2 at a time (``parallel_shards``);
- ``ray``: on 2 Ray CPU actors of a local Ray (``<stage>.actors.executor: ray``);
- ``cluster``: on 3 Ray CPU actors of a 3-node Ray cluster on this machine (``tests.cluster``:
  a head and two ``ray start`` worker nodes on 127.0.0.2), joined through ``ray.address``.

and, for reference, ``run_stage`` alone (no Prefect: the stage contract's own cost per shard).
Each executor runs at two sizes; the cost per shard is the slope between them, so fixed costs
(the flow run, the actors' start, the summary) drop out, and they are reported apart. The
Prefect API is the ephemeral test server, started before any timing.

Anchor (issue 12): Prefect's cost today, about 40 ms per shard on this 2-core sandbox.

    python bench/orchestration.py                     # print the table
    python bench/orchestration.py --write             # and write it into BENCHMARKS.md ("## cluster")
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402  (bench/report.py)

report.quiet_flow_env()  # before anything imports Prefect
from tasks.config import PipelineConfig  # noqa: E402
from tasks.stage import ShardOutcome, Stage  # noqa: E402

ANCHOR_MS = 40.0
SECTION = "## cluster"
MACHINE = "2-core sandbox, no GPU"


class NoWorkStage(Stage):
    """A stage whose shards do nothing: what is left is the orchestration's cost."""

    name = "nowork"
    task_name = "no_work_shard"

    @property
    def section(self):
        return self.config.phrases  # any section with `actors` and `parallel_shards`

    def list_shards(self) -> list[str]:
        return [f"{i:05d}" for i in range(int(os.environ.get("BENCH_NOWORK_SHARDS", "100")))]

    def process(self, shard: str) -> ShardOutcome:
        return ShardOutcome()


def config(root: str, executor: str, actors: int, address: str | None = None) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "dataset": {"root": root},
        "phrases": {"parallel_shards": actors,
                    "actors": {"executor": executor, "num_actors": actors, "num_cpus_per_actor": 0.5,
                               "num_gpus_per_actor": 0}},
        "ray": {"address": address, "node_ip_address": "127.0.0.2"} if address else {"num_cpus": 2},
    })


def timed_run(executor: str, shards: int, actors: int, address: str | None) -> float:
    """Seconds of one run over ``shards`` fresh shards (a fresh root: nothing to skip)."""
    from prefect import flow

    from pipelines.stage_flow import run_stage_flow
    from tasks.stage import run_stage

    os.environ["BENCH_NOWORK_SHARDS"] = str(shards)
    root = tempfile.mkdtemp(prefix="bench-nowork-")
    stage = NoWorkStage(config(root, "local" if executor == "run_stage" else executor, actors, address))
    try:
        start = time.perf_counter()
        if executor == "run_stage":
            summary = run_stage(stage)
        else:
            summary = flow(name="nowork")(run_stage_flow)(stage)
        seconds = time.perf_counter() - start
        assert summary["num_shards_done"] == shards, summary["num_shards_done"]
        return seconds
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(executor: str, sizes: tuple[int, int], actors: int, address: str | None, repeats: int) -> dict:
    small, large = sizes
    timed_run(executor, 5, actors, address)  # warm-up, untimed: the first flow run, Ray's start, imports
    runs = {n: [timed_run(executor, n, actors, address) for _ in range(repeats)] for n in (small, large)}
    best = {n: min(v) for n, v in runs.items()}
    per_shard = (best[large] - best[small]) / (large - small)
    fixed = best[small] - per_shard * small
    print(f"{executor}: {runs} -> {per_shard * 1000:.1f} ms/shard, fixed {fixed:.1f} s", flush=True)
    return {"executor": executor, "actors": actors, "runs": runs, "ms_per_shard": per_shard * 1000,
            "fixed_s": fixed, "best_large_s": best[large], "large": large}


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def write_cluster_part(part_title: str, text: str) -> None:
    """Replace one ``### part`` of BENCHMARKS.md's ``## cluster`` section (or add it), keeping the others."""
    path = report.BENCHMARKS
    whole = path.read_text()
    start = whole.find(f"\n{SECTION}\n")
    if start == -1:
        section = f"{SECTION}\n\nCluster mode (issue 12): the stages on Ray actors of several nodes. Parts below, each written by its script.\n"
    else:
        end = whole.find("\n## ", start + 1)
        section = whole[start + 1: end if end != -1 else len(whole)]
    part = text.rstrip("\n") + "\n"
    m = re.search(rf"^### {re.escape(part_title)}\n", section, flags=re.M)
    if m:
        nxt = section.find("\n### ", m.end())
        section = section[: m.start()] + part + (section[nxt:] if nxt != -1 else "")
    else:
        section = section.rstrip("\n") + "\n\n" + part
    report.write_section(section)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=(50, 300), help="shards of the small and the large run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per size (the best counts)")
    ap.add_argument("--executors", nargs="+", default=["run_stage", "local", "ray", "cluster"],
                    choices=["run_stage", "local", "ray", "cluster"])
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()

    import ray
    from prefect.testing.utilities import prefect_test_harness

    load_before = load()
    rows = []
    with prefect_test_harness(server_startup_timeout=120):
        for executor in args.executors:
            if executor == "cluster":
                from tests.cluster import LocalCluster

                if ray.is_initialized():
                    ray.shutdown()
                with LocalCluster(head_cpus=1, workers={"node_a": 1, "node_b": 1}) as cluster:
                    rows.append({**measure("ray", args.sizes, 3, cluster.address, args.repeats), "executor": "cluster"})
                    ray.shutdown()
            else:
                rows.append(measure(executor, args.sizes, 2, None, args.repeats))
    if ray.is_initialized():
        ray.shutdown()
    load_after = load()

    what = {"run_stage": "`run_stage` (no Prefect), shards one by one in the process",
            "local": "Prefect flow, local executor, 2 shards at a time",
            "ray": "Prefect flow, 2 Ray actors on a local Ray (1 node)",
            "cluster": "Prefect flow, 3 Ray actors on a 3-node cluster (`ray start` x 3, loopback)"}
    command = report.command_line()
    lines = [
        "### orchestration cost per shard",
        "",
        "`bench/orchestration.py`: a stage whose `process` does nothing (`NoWorkStage`) through the real "
        "orchestration: `run_stage_flow` in a Prefect flow (one Prefect task per shard, its lease and record, "
        "the progress artifact, the summary) against the ephemeral Prefect API started before timing, after an "
        "untimed warm-up run per executor (Ray started, imports done). Each "
        f"executor runs {args.sizes[0]} and {args.sizes[1]} fresh shards (best of {args.repeats} each); the cost "
        "per shard is the slope between the two, the fixed cost (flow run, actors' start, summary) the "
        f"intercept. Anchor (issue 12): today's Prefect cost, about {ANCHOR_MS:.0f} ms per shard here. "
        f"One-minute load average {load_before} before, {load_after} after (a shared sandbox: the 2 cores "
        "are shared with other sessions' tests, so absolute figures move with the load; the comparison "
        "between rows is what this table is for).",
        "",
        "| executor | ms per shard | fixed s | seconds for the large run | vs anchor | command | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {what[r['executor']]} | {r['ms_per_shard']:.1f} | {r['fixed_s']:.1f} | "
                     f"{r['best_large_s']:.1f} ({r['large']} shards) | {r['ms_per_shard'] / ANCHOR_MS:.2f}x | "
                     f"`{command}` | {MACHINE} | {report.today()} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_cluster_part("orchestration cost per shard", table)


if __name__ == "__main__":
    main()
