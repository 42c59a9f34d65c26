"""The stage contract (DESIGN.md) as one small base class every stage shares.

A stage lists its shards, fingerprints each, skips shards already done with the
same fingerprint, processes the rest, writes outputs atomically, and records
counts, failures by reason, seconds and its output files (size and checksum) per
shard. Orchestration (Prefect tasks, concurrency, artifacts) lives in
``pipelines/``; everything here runs and is tested without Prefect.

The fingerprint of a shard is its stage's name and ``code_version``, its config
section (minus speed-only knobs), ``extra_fingerprint`` and what its inputs *are*:
the size and checksum of every upstream output it reads, as the upstream records
say. So whatever changes an upstream output (a config change, ``--force``, a fixed
bug, a new model) redoes the shards that read it, and through their outputs every
later stage; a rewrite that leaves the bytes as they were redoes nothing downstream.

Integrity: before ``process`` a shard checks its inputs against the upstream records
(sizes always, checksums unless the stage checks them while streaming the file);
a mismatch invalidates the upstream record, so its stage redoes that shard on its
next run, and fails this shard with ``InputDamaged`` naming the file. A shard about to
be skipped checks its own outputs' sizes (one stat each) and is redone when one is
missing or cut short.

Concurrency: a shard is processed under a lease on storage (``tasks.lease``), so two runs
of a stage at once never process the same shard: ``run_shard(wait=False)`` answers a
shard another live run holds with a result whose ``held_by`` names that run, and the
orchestrator (``run_stage``, the flow) comes back to it with ``wait=True`` after the other
shards: it then waits until the holder records it (a skip) or its lease goes stale.
Each record says where the shard ran (``node``: Ray node, address, host and pid).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from storage import DatasetLayout, ShardRecord, StageRecords
from storage.integrity import FileDigest, file_digest, file_problem
from tasks.config import PipelineConfig, Section, fingerprint
from tasks.lease import ShardLeases, describe_holder, new_run_id

log = logging.getLogger(__name__)


# The one unit of a stage whose work is not split into shards (a training run, an evaluation).
SINGLE_UNIT = "00000"


@dataclass
class ShardOutcome:
    """What ``Stage.process`` returns: counts of what it did, failures by reason."""

    counts: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)


class InputDamaged(RuntimeError):
    """An input file is not what its upstream record says (or that record was invalidated).

    Not an ``OSError``: retrying the shard cannot help; the upstream stage must redo its shard.
    """


@dataclass(frozen=True)
class InputFile:
    """One file a shard reads: which upstream stage and shard wrote it, and what its record says."""

    stage: str
    shard: str
    name: str  # the output's name in that stage (``tar``, ``table``)
    url: str
    expected: FileDigest


@dataclass
class ShardResult:
    shard: str
    skipped: bool
    counts: dict[str, int]
    failures: dict[str, int]
    seconds: float
    # Where it ran: {"node_id", "ip", "host", "pid"} (node_id "local" outside Ray); None for records
    # written before nodes were recorded.
    node: dict | None = None
    # Not run: another live run holds the shard's lease (who: run_id, host, pid, renewed_at).
    held_by: dict | None = None


def local_node() -> dict:
    """Where this process runs, for shard records (a Ray actor reports its node instead)."""
    return {"node_id": "local", "ip": None, "host": socket.gethostname(), "pid": os.getpid()}


class Stage(ABC):
    """One stage of the pipeline over the shards of a dataset root."""

    name: str
    # The Prefect task run per shard, verb_noun (``download_shard``, ``detect_boxes``), so the
    # UI and the logs say what ran.
    task_name: str
    # Bump (from 1) when a change to this stage's code changes what it writes: its shards are
    # redone, and the stages downstream with them wherever the output bytes changed.
    code_version: ClassVar[int] = 1
    # Stages whose outputs this stage reads (their records feed its fingerprint and checks).
    upstream: tuple[str, ...] = ()
    # The outputs (by name) this stage reads of an upstream stage; a stage left out: all of them.
    reads: ClassVar[dict[str, tuple[str, ...]]] = {}
    # (upstream stage, output name) whose checksum ``process`` checks while it streams the file
    # (``iter_shard(expected=...)``) rather than in a read before it; sizes are checked first anyway.
    checked_while_reading: ClassVar[frozenset[tuple[str, str]]] = frozenset()
    # The count whose rate (per second) the orchestrator reports, e.g. "images".
    throughput_count: str | None = None

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.layout = DatasetLayout(config.dataset.root)
        self.records = StageRecords(self.layout, self.name)

    # The run this stage object works for: one id and start time shared by the flow and its Ray
    # actors (``join_run``), so their leases are one run's and a retry can take over its own.
    @property
    def run_id(self) -> str:
        if "_run_id" not in self.__dict__:
            self._run_id = new_run_id()
        return self._run_id

    @property
    def run_started(self) -> float:
        if "_run_started" not in self.__dict__:
            self._run_started = time.time()
        return self._run_started

    def join_run(self, run_id: str, run_started: float, node: dict | None = None) -> None:
        """Work for the run of another copy of this stage (a Ray actor's copy, for the flow's run)."""
        self._run_id, self._run_started = run_id, run_started
        self._node = node

    def node(self) -> dict:
        return getattr(self, "_node", None) or local_node()

    @property
    def leases(self) -> ShardLeases:
        return ShardLeases(self.layout, self.name, self.run_id, self.config.dataset.lease_ttl_s,
                           {"node_id": self.node()["node_id"]})

    def prepare_worker(self) -> None:
        """Make a copy of the stage built elsewhere (a Ray actor) ready for shards, after the flow's
        ``prepare``: by default ``prepare`` again, which finds its once-per-run work done and reads
        its result back (the URL split, the caption partition) or loads what ``process`` uses (a
        model). A stage whose ``prepare`` must run only once per run overrides this."""
        self.prepare()

    @property
    @abstractmethod
    def section(self) -> Section:
        """This stage's config section (its fingerprinted part decides what is redone)."""

    @property
    def parallel_shards(self) -> int:
        """How many shards the orchestrator runs at once."""
        return getattr(self.section, "parallel_shards", 1)

    def prepare(self) -> None:
        """Work done once per run before the shards (validate inputs, build an index)."""

    @abstractmethod
    def list_shards(self) -> list[str]:
        """Names (``00000``...) of the shards this stage would produce."""

    @abstractmethod
    def process(self, shard: str) -> ShardOutcome:
        """Produce every output of ``shard`` atomically; count, never raise, on bad data."""

    def discard(self, shard: str) -> None:
        """Before a forced redo: delete what earlier runs left of ``shard`` that ``process`` would
        resume from instead of redoing (its record first). Most stages overwrite; nothing to do."""

    def extra_fingerprint(self) -> Any:
        """Anything besides the config section and the inputs that decides the output (a model version)."""
        return None

    def output_files(self, shard: str) -> dict[str, str]:
        """The files ``process(shard)`` writes, by name (``{"table": url}``): the shard record keeps
        each one's size and checksum, which later stages fingerprint and check. None declared:
        downstream stages fall back to this stage's record fingerprint."""
        return {}

    def input_shards(self, shard: str) -> dict[str, list[str]]:
        """The shards of each upstream stage that ``shard`` reads (default: the same shard of each)."""
        return {stage: [shard] for stage in self.upstream}

    def upstream_record(self, stage: str, shard: str) -> ShardRecord | None:
        """The record of an upstream shard (a stage that already read them all may answer from memory)."""
        return StageRecords(self.layout, stage).get(shard)

    def input_files(self, shard: str) -> list[InputFile]:
        """Every recorded upstream output ``shard`` reads (upstream shards not done have none)."""
        files = []
        for stage, shards in self.input_shards(shard).items():
            wanted = self.reads.get(stage)
            for s in shards:
                rec = self.upstream_record(stage, s)
                if rec is None or not rec.done:
                    continue
                for name, (path, digest) in rec.output_digests().items():
                    if wanted is None or name in wanted:
                        files.append(InputFile(stage, s, name, self.layout.absolute(path), digest))
        return files

    def upstream_fingerprint(self, shard: str) -> dict:
        """What ``shard`` reads, per upstream stage and shard: the size and checksum of each output
        it reads; the record's fingerprint for a record without outputs; None for a shard not done."""
        out: dict[str, dict] = {}
        for stage, shards in self.input_shards(shard).items():
            wanted = self.reads.get(stage)
            out[stage] = {}
            for s in shards:
                rec = self.upstream_record(stage, s)
                if rec is None or not rec.done:
                    out[stage][s] = None
                elif not rec.outputs:
                    out[stage][s] = rec.fingerprint
                else:
                    out[stage][s] = {name: (o["size"], o["checksum"]) for name, o in sorted(rec.outputs.items())
                                     if wanted is None or name in wanted}
        return out

    def fingerprint(self, shard: str) -> str:
        parts = (self.name, self.section.fingerprint_payload(), self.upstream_fingerprint(shard),
                 self.extra_fingerprint())
        # The code version enters once bumped past 1: a stage with no upstream (download) keeps
        # the fingerprints of shards finished before code versions existed, and is not redone.
        return fingerprint(*parts) if self.code_version == 1 else fingerprint(*parts, self.code_version)

    def input_damaged(self, file: InputFile, problem: str) -> InputDamaged:
        """Invalidate the upstream shard that wrote ``file`` (its stage redoes it next run); the error to raise."""
        path = self.layout.relative(file.url)
        StageRecords(self.layout, file.stage).invalidate(
            file.shard, f"{path}: {problem} (found by the {self.name} stage)")
        return InputDamaged(
            f"{path} ({file.stage} shard {file.shard}) is damaged: {problem}; {file.stage} shard {file.shard} "
            f"is marked to be redone: rerun {file.stage}, then {self.name}"
        )

    def verify_inputs(self, shard: str) -> None:
        """Raise ``InputDamaged`` when an input of ``shard`` is missing, cut short or not its recorded
        bytes, or an upstream shard it reads was marked to be redone and is not yet."""
        for stage, shards in self.input_shards(shard).items():
            for s in shards:
                rec = self.upstream_record(stage, s)
                if rec is not None and not rec.done and rec.invalidated:
                    raise InputDamaged(f"{stage} shard {s} is marked to be redone ({rec.invalidated}); "
                                       f"rerun {stage}, then {self.name}")
        for f in self.input_files(shard):
            problem = file_problem(f.url, f.expected, checksum=(f.stage, f.name) not in self.checked_while_reading)
            if problem:
                raise self.input_damaged(f, problem)

    def done_record(self, shard: str, fp: str) -> ShardRecord | None:
        """The record of ``shard`` when it is done with fingerprint ``fp`` and its outputs are all
        there at their recorded sizes; else None (the shard is to be (re)done)."""
        rec = self.records.get(shard)
        if rec is None or not rec.done or rec.fingerprint != fp:
            return None
        problems = self.records.output_problems(rec, checksums=False)
        if problems:
            log.warning("%s shard %s: %s; redoing it", self.name, shard, "; ".join(problems))
            return None
        return rec

    def record_outputs(self, shard: str) -> dict[str, dict]:
        """Path, size and checksum of each output of ``shard``, read back right after ``process``."""
        outputs = {}
        for name, url in self.output_files(shard).items():
            try:
                digest = file_digest(url)
            except FileNotFoundError:
                raise RuntimeError(f"{self.name} shard {shard}: process() did not write its {name} {url}") from None
            outputs[name] = {"path": self.layout.relative(url), **digest.as_dict()}
        return outputs

    def finished_record(self, shard: str, fp: str, force: bool) -> ShardRecord | None:
        """The record of ``shard`` if it needs no work: done with ``fp`` (under ``force``: done by
        another run since this run began)."""
        rec = self.done_record(shard, fp)
        if rec is not None and force and rec.finished_at < self.run_started:
            return None
        return rec

    def run_shard(self, shard: str, *, force: bool = False, wait: bool = True) -> ShardResult:
        """Skip ``shard`` if done, else process and record it under its lease.

        Held by another live run: ``wait=False`` returns at once (``held_by`` says who);
        ``wait=True`` waits until that run records it (then it is a skip), fails or dies.
        """
        fp = self.fingerprint(shard)
        if not force and (rec := self.done_record(shard, fp)) is not None:
            return self._skipped(rec)
        leases = self.leases
        lease, holder = leases.try_acquire(shard)
        logged = 0.0
        poll = min(2.0, max(0.2, leases.ttl_s / 10))
        while lease is None:
            if not wait:
                log.info("%s shard %s held by %s; later", self.name, shard, describe_holder(holder))
                return ShardResult(shard, True, {}, {}, 0.0, held_by=holder)
            if time.monotonic() - logged > 60:
                log.warning("%s shard %s held by %s, waiting (taken over once its lease is %.0fs old)",
                            self.name, shard, describe_holder(holder), leases.ttl_s)
                logged = time.monotonic()
            time.sleep(poll)
            if (rec := self.finished_record(shard, fp, force)) is not None:
                return self._skipped(rec)
            lease, holder = leases.try_acquire(shard)
        with lease:
            # Another run may have recorded it between the check above and the lease.
            if (rec := self.finished_record(shard, fp, force)) is not None:
                return self._skipped(rec)
            return self._process_shard(shard, fp, force)

    def _skipped(self, rec: ShardRecord) -> ShardResult:
        return ShardResult(rec.shard, True, rec.counts, rec.failures, rec.seconds, node=rec.node)

    def _process_shard(self, shard: str, fp: str, force: bool) -> ShardResult:
        self.verify_inputs(shard)
        start = time.perf_counter()
        if force:
            self.discard(shard)
        outcome = self.process(shard)
        seconds = round(time.perf_counter() - start, 3)
        outputs = self.record_outputs(shard)
        node = self.node()
        # The record is written last: it only ever claims outputs already in place.
        self.records.put(ShardRecord(shard, fp, dict(outcome.counts), dict(outcome.failures), seconds,
                                     outputs=outputs, node=node))
        return ShardResult(shard, False, dict(outcome.counts), dict(outcome.failures), seconds, node=node)

    def pending(self, *, force: bool = False) -> list[str]:
        shards = self.list_shards()
        return shards if force else [s for s in shards if self.done_record(s, self.fingerprint(s)) is None]

    def summary_extra(self) -> dict:
        """Stage-level facts for ``_stages/<stage>.json`` besides the per-shard records."""
        return {}

    def summarize(self, results: list[ShardResult], extra: dict | None = None) -> dict:
        """Write ``_stages/<stage>.json`` and return it with this run's skip/process split.

        ``extra``: facts only the orchestrator knows (e.g. the Ray actors that ran the shards).
        """
        last_run = {
            "processed": sorted(r.shard for r in results if not r.skipped),
            "skipped": sorted(r.shard for r in results if r.skipped),
        }
        return self.records.write_summary({"last_run": last_run, **self.summary_extra(), **(extra or {})})


def run_stage(stage: Stage, *, force: bool = False) -> dict:
    """Run every shard in this process, one after another (tests, debugging); shards another
    run holds come last, once that run has recorded them (or let go of them)."""
    stage.prepare()
    results, held = [], []
    for s in stage.list_shards():
        result = stage.run_shard(s, force=force, wait=False)
        (held if result.held_by else results).append(result)
    results += [stage.run_shard(r.shard, force=force) for r in held]
    return stage.summarize(results)
