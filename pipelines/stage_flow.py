"""Run any stage as a Prefect flow body: a task per pending shard, artifacts at the end.

Every stage flow calls ``run_stage_flow``: it prepares the stage, submits one
Prefect task per pending shard (so the UI shows per-shard runs, retries and
logs), bounds how many run at once, keeps a progress artifact current, logs
progress a person can read (shards done, items with their rate, time left: a tqdm bar
on a terminal, and a log line at most every minute or 10% of the shards), and
publishes counts and failures by reason as table artifacts. A shard that fails
does not stop the others; the flow fails at the end, naming them, after every
finished shard has been recorded.

Two runs of a stage at once (two deployment runs, a deployment run and a CLI run):
a shard another live run holds (its lease, ``tasks.lease``) is passed over, and once
every other shard is finished the flow runs a second task for it that waits until
that run records it (then it is a skip), or lets go of it or dies (then it is
processed here). The counts table says which node ran each shard.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from pipelines.overview import OverviewRefresher
from tasks.annotate.gallery import write_gallery
from tasks.progress import LogThrottle, ShardProgress
from tasks.lease import describe_holder
from tasks.ray_actors import ShardActorPool, shard_runner
from tasks.stage import ShardResult, Stage


def _retry_on_io_error(task, task_run, state) -> bool:
    """Retry a shard on I/O trouble (storage, network), never on our own bugs."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


def shard_task(stage: Stage, runner: Stage | ShardActorPool, *, wait: bool = False):
    """The stage's Prefect task (``download_shard``, ``detect_boxes``, ...) over plain parameters.

    The stage and its runner (the stage itself, or a Ray actor pool) are bound here, so a
    task run's parameters are just the shard and ``force`` and its name says what ran.
    ``wait``: a shard another run holds is waited for (else it is returned as held, at once).
    """

    def run(shard: str, force: bool) -> ShardResult:
        result = runner.run_shard(shard, force=force, wait=wait)
        if result.held_by is not None:
            get_run_logger().info("%s shard %s held by %s; coming back to it after the other shards",
                                  stage.name, shard, describe_holder(result.held_by))
            return result
        failed = sum(result.failures.values())
        get_run_logger().info(
            "%s shard %s: %s; %d failed %s in %.1fs",
            stage.name,
            shard,
            dict(result.counts),
            failed,
            dict(result.failures) if failed else "",
            result.seconds,
        )
        return result

    run.__name__ = run.__qualname__ = stage.task_name
    return task(run, name=stage.task_name, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
                retry_condition_fn=_retry_on_io_error)


def _artifact_key(stage: Stage, what: str) -> str:
    return f"{stage.name}-{what}".lower().replace("_", "-")


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def run_throughput(stage: Stage, summary: dict, wall_seconds: float) -> float | None:
    """``stage.throughput_count`` per second of this run: its processed shards over its wall time."""
    unit = stage.throughput_count
    processed = summary["last_run"]["processed"]
    if unit is None or not processed:
        return None
    return _rate(sum(summary["shards"][s]["counts"].get(unit, 0) for s in processed), wall_seconds)


def node_label(node: dict | None) -> str:
    """Where a shard ran, short: ``<address or host>:<pid>`` ("" for records without it)."""
    if not node:
        return ""
    return f"{node.get('ip') or node.get('host') or '?'}:{node.get('pid', '?')}"


def publish_summary(stage: Stage, summary: dict, failed_shards: dict[str, str], wall_seconds: float) -> None:
    """The counts table (per shard, with the stage's rate and node) and the failures-by-reason table."""
    shards = summary["shards"]
    count_names = sorted({k for rec in shards.values() for k in rec["counts"]})
    rows = []
    for name, rec in sorted(shards.items()):
        status = "skipped (done)" if name in summary["last_run"]["skipped"] else "processed"
        rows.append(
            {"shard": name, "status": status, **{k: rec["counts"].get(k, 0) for k in count_names},
             "failed": sum(rec["failures"].values()), "seconds": rec["seconds"], "node": node_label(rec.get("node"))}
        )
    for name, err in sorted(failed_shards.items()):
        rows.append({"shard": name, "status": f"error: {err[:200]}", **dict.fromkeys(count_names, 0),
                     "failed": 0, "seconds": 0, "node": ""})
    rows.append(
        {"shard": "total", "status": f"{summary['num_shards_done']} done",
         **{k: summary["counts"].get(k, 0) for k in count_names},
         "failed": sum(summary["failures"].values()), "seconds": summary["seconds"],
         "node": f"{len({node_label(r.get('node')) for r in shards.values()} - {''})} nodes/processes"}
    )
    description = f"{stage.name}: counts per shard"
    if unit := stage.throughput_count:
        for row in rows[:-1]:
            row[f"{unit}/s"] = _rate(row.get(unit, 0), row["seconds"])
        rows[-1][f"{unit}/s"] = run_throughput(stage, summary, wall_seconds)
        description += (f"; {unit}/s per shard over its own seconds, and in the total row this run's "
                        f"processed shards over its wall time ({wall_seconds:.1f} s, shards in parallel)")
    create_table_artifact(rows, key=_artifact_key(stage, "counts"), description=description)
    reasons = Counter(summary["failures"])
    create_table_artifact(
        [{"reason": r, "count": n} for r, n in reasons.most_common()] or [{"reason": "none", "count": 0}],
        key=_artifact_key(stage, "failures"),
        description=f"{stage.name}: failures by reason (each counted and skipped, none fatal)",
    )


def run_stage_flow(stage: Stage, *, force: bool = False) -> dict:
    """Run ``stage`` over all its shards inside the current flow; returns its summary."""
    logger = get_run_logger()
    stage.prepare()
    shards = stage.list_shards()
    pending = stage.pending(force=force)
    done = [s for s in shards if s not in set(pending)]
    logger.info("%s: %d shards, %d already done, %d to process", stage.name, len(shards), len(done), len(pending))

    results = [stage.run_shard(s) for s in done]  # reads their records, no work
    failed: dict[str, str] = {}
    progress_id = create_progress_artifact(
        100.0 * len(done) / max(len(shards), 1), key=_artifact_key(stage, "progress"),
        description=f"{stage.name}: shards finished",
    )
    bar = tqdm(total=len(shards), initial=len(done), desc=stage.name, unit="shard",
               disable=not sys.stderr.isatty())
    started = time.perf_counter()
    progress, log_throttle = ShardProgress(stage.name, len(shards), len(done), stage.throughput_count), LogThrottle()
    refresh_overview = OverviewRefresher(stage.config)
    runner = shard_runner(stage) if pending else stage
    pool = runner if isinstance(runner, ShardActorPool) else None
    if pool:
        logger.info("%s: %d shards on %d Ray actors", stage.name, len(pending), pool.size)
    try:
        with ThreadPoolTaskRunner(max_workers=pool.size if pool else stage.parallel_shards) as task_runner:
            # First every shard no other run holds; then, waiting, those another run held.
            held: list[str] = []
            for wait, batch, suffix in ((False, pending, ""), (True, held, "-held")):
                run_shard = shard_task(stage, runner, wait=wait)
                futures = {
                    task_runner.submit(run_shard.with_options(task_run_name=f"{stage.task_name}-{s}{suffix}"),
                                       {"shard": s, "force": force}): s
                    for s in batch
                }
                for future in as_completed(list(futures)):
                    shard = futures[future]
                    try:
                        result = future.result()
                    except Exception as e:  # recorded and re-raised below, after the summary
                        failed[shard] = f"{type(e).__name__}: {e}"
                        logger.error("%s shard %s failed: %s", stage.name, shard, failed[shard])
                    else:
                        if result.held_by is not None:
                            held.append(shard)
                            continue
                        results.append(result)
                    progress.add(None if shard in failed else results[-1].counts)
                    bar.set_postfix_str(progress.rate(), refresh=False)
                    bar.update(1)
                    finished = len(results) + len(failed)
                    if log_throttle.ready(finished, len(shards)):  # the UI's and a non-terminal's progress
                        logger.info("%s", progress.line())
                    update_progress_artifact(progress_id, 100.0 * finished / max(len(shards), 1))
                    refresh_overview()
                if held and not wait:
                    logger.warning("%s: %d shard(s) held by another run (%s), waiting for them", stage.name,
                                   len(held), ", ".join(sorted(held)))
        extra = {"actors": pool.describe()} if pool else None
    finally:
        if pool:
            pool.close()
    bar.close()

    wall_seconds = time.perf_counter() - started
    summary = stage.summarize(results, extra)
    publish_summary(stage, summary, failed, wall_seconds)
    logger.info("%s: counts %s, failures %s", stage.name, summary["counts"], summary["failures"])
    rate = run_throughput(stage, summary, wall_seconds)
    if rate is not None:
        logger.info("%s: %s %s/s this run (%d shards in %.1f s)", stage.name, f"{rate:,.1f}",
                    stage.throughput_count, len(summary["last_run"]["processed"]), wall_seconds)
    if failed:
        first = min(failed)  # its error names what to do, e.g. the damaged input file and its shard
        raise RuntimeError(
            f"{stage.name}: {len(failed)} shard(s) failed ({', '.join(sorted(failed))}); "
            f"shard {first}: {failed[first][:500]}; finished shards are kept, rerun the stage to retry the rest"
        )
    return summary


GALLERY_SAMPLES = 6


def publish_gallery(stage: Stage) -> None:
    """A few of the stage's images with every annotation so far (``<stage>-gallery``, and HTML on storage)."""
    made = write_gallery(stage.layout, stage.name, GALLERY_SAMPLES)
    if made:
        markdown, url = made
        create_markdown_artifact(markdown, key=_artifact_key(stage, "gallery"),
                                 description=f"{stage.name}: sample images with their annotations (also {url})")
