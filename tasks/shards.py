"""Shards stage: images + every annotation -> training tars ``train/{shard:05d}.tar``.

Each sample is the JPEG and one JSON with all that training needs (METHOD.md
sec. 5 and 7): key, url, width, height, the DreamLIP captions (raw and a short
and a long caption per captioner), the phrases with their sentences, the OWLv2
boxes and the VQA pairs. Annotations are joined by key; a sample missing boxes,
phrases or VQA is kept with those fields empty, and one with no caption text is
dropped and counted (``require_captions``), since every training step needs one.

How samples are shuffled while each output stays its own idempotent unit:

- The input shards (those the download stage finished, in order) are cut into
  *windows* of ``shuffle_window`` consecutive shards. Samples are shuffled across
  all the shards of a window, never across windows; a window as large as the
  dataset is a global shuffle.
- A window's sample count comes from the upstream records (captioned images when
  captions are required, else downloaded ones), so how many outputs it makes,
  ``ceil(count / shard_size)``, and their global numbers are known before any tar
  is read.
- Within a window every kept key is ranked by a seeded hash of the key; that
  ranking is the shuffle (deterministic, independent of the order shards were
  written in), and output j of the window takes the j-th of equal slices of it.
- So every output shard is computed on its own from its window's inputs: it is
  one stage unit with its own record, written atomically (temporary name, then
  rename); killed mid-write, a rerun finds no record and rebuilds it. Its
  fingerprint covers the config, its position and the recorded outputs (size and
  checksum) of every input of its window in every upstream stage (download,
  captions, phrases, boxes, vqa), so finishing or changing e.g. the boxes of one
  input shard redoes exactly the outputs of its window, and appending input shards
  leaves earlier windows alone.
- Every input is checked against its record before it is used (the tables in full,
  the tars by size, then by checksum while they stream); a damaged one fails the
  outputs of its window, naming it, and marks its upstream shard to be redone.

The price is reading: each output streams its window's tars (about
``shuffle_window`` input shards) and keeps only its own slice, so images are read
roughly as many times as a window has outputs. A small window keeps that low;
the training loader's shard and sample shuffles mix across windows on top.
Stale temporaries of killed writers are removed when a run starts (not those of an
output another live run holds the lease of and is writing), and outputs
numbered beyond a new, smaller plan are deleted (record first), so ``train/``
only ever holds the current plan's complete tars.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass

from storage import ShardRecord, ShardWriter, StageRecords, exists, iter_shard, read_table
from storage.fs import open_fs, remove_stale_temporaries
from storage.integrity import DigestMismatch
from storage.tables import CAPTIONERS
from tasks.config import ShardsConfig, fingerprint
from tasks.stage import ShardOutcome, Stage

ANNOTATIONS = ("captions", "phrases", "boxes", "vqa")


@dataclass(frozen=True)
class OutputShard:
    """Output ``index`` is slice ``part`` of ``num_parts`` of the window over ``inputs``."""

    index: int
    inputs: tuple[str, ...]
    part: int
    num_parts: int


def shuffle_rank(key: str, seed: int) -> int:
    """A seeded pseudo-random rank of a key: sorting by it shuffles deterministically."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "big")


def has_caption_text(captions: dict | None) -> bool:
    return bool(captions) and any([captions["raw"], *(captions["short"] or []), *(captions["long"] or [])])


def sample_json(meta: dict, captions: dict | None, phrases: list | None, boxes: dict | None, qa: list | None) -> dict:
    """The one JSON of a training sample; missing annotations are empty, never absent."""

    def by_captioner(values: list | None) -> dict[str, str]:
        return {c: v or "" for c, v in zip(CAPTIONERS, values or [], strict=False)}

    return {
        "key": meta["key"],
        "url": meta.get("url", ""),
        "width": meta.get("width"),
        "height": meta.get("height"),
        "captions": {
            "raw": (captions or {}).get("raw") or "",
            "short": by_captioner((captions or {}).get("short")),
            "long": by_captioner((captions or {}).get("long")),
        },
        "phrases": phrases or [],
        "boxes": (boxes or {}).get("boxes") or [],
        "has_confident_box": bool((boxes or {}).get("has_confident_box")),
        "qa": qa or [],
    }


class TrainingShardsStage(Stage):
    name = "shards"
    task_name = "write_training_shard"
    throughput_count = "samples"
    upstream = ("download", *ANNOTATIONS)
    # Each output streams its window's tars anyway: their checksums are checked on the way.
    checked_while_reading = frozenset({("download", "tar")})

    @property
    def section(self) -> ShardsConfig:
        return self.config.shards

    def _records(self, stage: str) -> dict[str, ShardRecord]:
        return {r.shard: r for r in StageRecords(self.layout, stage).all()}

    @functools.cached_property
    def plan(self) -> list[OutputShard]:
        cfg = self.section
        self._upstream = {stage: self._records(stage) for stage in self.upstream}
        # A shard marked to be redone keeps its place: its window waits for it (and says so)
        # rather than being re-planned without it.
        inputs = sorted(s for s, r in self._upstream["download"].items() if r.done or r.invalidated)
        plan: list[OutputShard] = []
        for w in range(0, len(inputs), cfg.shuffle_window):
            window = tuple(inputs[w : w + cfg.shuffle_window])
            if cfg.require_captions:
                count = sum(self._upstream["captions"][s].counts.get("captioned", 0)
                            for s in window if s in self._upstream["captions"])
            else:
                count = sum(self._upstream["download"][s].counts.get("ok", 0) for s in window)
            num_parts = math.ceil(count / cfg.shard_size)
            plan += [OutputShard(len(plan) + j, window, j, num_parts) for j in range(num_parts)]
        return plan

    def prepare(self) -> None:
        self.__dict__.pop("plan", None)  # re-read the upstream records on every run
        self._remove_stale_temporaries()
        self._remove_outputs_beyond(len(self.plan))

    def _remove_stale_temporaries(self) -> int:
        """Delete the temporaries of killed writers in ``train/``, not those of another run's writers at
        work: an output's temporary is kept while its shard's lease is held by another live run
        (``tasks.lease``; a writer holds it from before its temporary appears until after the rename).
        A crashed run's lease is stale (its process is gone, or it was not renewed for the TTL), so its
        temporaries go."""
        leases = self.leases

        def in_flight(path: str) -> bool:
            shard = os.path.basename(path).split(".", 1)[0]
            if not shard.isdigit():
                return False
            holder = leases.read(shard)
            return holder is not None and not leases.is_stale(holder)

        return remove_stale_temporaries(self.layout.train_dir, in_flight=in_flight)

    def prepare_worker(self) -> None:
        """A Ray actor's copy: the plan is read on first use; cleaning up is the flow's ``prepare``
        alone (here it would delete the temporaries of shards other actors are writing)."""

    def _remove_outputs_beyond(self, num_outputs: int) -> None:
        """Outputs of an earlier, larger plan would be read as training data: delete them, record first."""
        for shard in self.layout.list_shards(self.layout.train_dir, ".tar"):
            if int(shard) >= num_outputs:
                for url in (self.layout.stage_shard_record(self.name, shard), self.layout.train_tar(shard)):
                    fs, path = open_fs(url)
                    if fs.exists(path):
                        fs.rm(path)

    def list_shards(self) -> list[str]:
        return [f"{out.index:05d}" for out in self.plan]

    def output_files(self, shard: str) -> dict[str, str]:
        return {"tar": self.layout.train_tar(shard)}

    def input_shards(self, shard: str) -> dict[str, list[str]]:
        return {stage: list(self.plan[int(shard)].inputs) for stage in self.upstream}

    def upstream_record(self, stage: str, shard: str) -> ShardRecord | None:
        self.plan  # noqa: B018 - reads every upstream record once per run
        return self._upstream[stage].get(shard)

    def fingerprint(self, shard: str) -> str:
        out = self.plan[int(shard)]
        return fingerprint(super().fingerprint(shard), out.part, out.num_parts)

    def _table(self, kind: str, shard: str, columns: list[str]) -> dict[str, dict]:
        url = self.layout.images_table(shard) if kind == "downloads" else self.layout.annotation(kind, shard)
        if not exists(url):
            return {}
        return {row["key"]: row for row in read_table(url, columns=columns).to_pylist() if row["key"]}

    def process(self, shard: str) -> ShardOutcome:
        cfg = self.section
        out = self.plan[int(shard)]
        counts: Counter = Counter()
        failures: Counter = Counter()
        tables: dict[str, dict[str, dict]] = {kind: {} for kind in ANNOTATIONS}
        ok_keys: list[str] = []
        for s in out.inputs:
            downloads = self._table("downloads", s, ["key", "status"])
            ok_keys += [k for k, r in downloads.items() if r["status"] == "success"]
            tables["captions"].update(self._table("captions", s, ["key", "raw", "short", "long"]))
            tables["phrases"].update(self._table("phrases", s, ["key", "phrases"]))
            tables["boxes"].update(self._table("boxes", s, ["key", "boxes", "has_confident_box"]))
            tables["vqa"].update(self._table("vqa", s, ["key", "qa"]))

        ranked = sorted(ok_keys, key=lambda k: shuffle_rank(k, cfg.seed))
        if cfg.require_captions:
            dropped = [k for k in ranked if not has_caption_text(tables["captions"].get(k))]
            # Each dropped key is counted by exactly one output of the window.
            failures["no_captions"] = sum(shuffle_rank(k, cfg.seed) % out.num_parts == out.part for k in dropped)
            ranked = [k for k in ranked if has_caption_text(tables["captions"].get(k))]
        lo, hi = (len(ranked) * out.part) // out.num_parts, (len(ranked) * (out.part + 1)) // out.num_parts
        position = {k: i for i, k in enumerate(ranked[lo:hi])}

        tars = {f.shard: f for f in self.input_files(shard) if (f.stage, f.name) == ("download", "tar")}
        samples: list[tuple[int, str, dict]] = []
        for s in out.inputs:
            if not exists(self.layout.images_tar(s)):
                continue
            expected = tars[s].expected if s in tars else None  # None: a record from before checksums
            try:
                for sample in iter_shard(self.layout.images_tar(s), expected=expected):
                    key = sample["__key__"]
                    if key in position and "jpg" in sample:
                        doc = sample_json(
                            sample.get("json") or {"key": key}, tables["captions"].get(key),
                            (tables["phrases"].get(key) or {}).get("phrases"), tables["boxes"].get(key),
                            (tables["vqa"].get(key) or {}).get("qa"),
                        )
                        samples.append((position[key], sample["jpg"], doc))
            except DigestMismatch as e:
                raise self.input_damaged(tars[s], e.problem) from None
        failures["image_missing"] = len(position) - len(samples)
        samples.sort(key=lambda item: item[0])

        with ShardWriter(self.layout.train_tar(shard)) as writer:
            for _, jpg, doc in samples:
                writer.write(doc["key"], {"jpg": jpg, "json": doc})
        counts["samples"] = len(samples)
        counts["with_captions"] = sum(has_caption_text(tables["captions"].get(d["key"])) for _, _, d in samples)
        counts["with_phrases"] = sum(bool(d["phrases"]) for _, _, d in samples)
        counts["with_boxes"] = sum(bool(d["boxes"]) for _, _, d in samples)
        counts["with_vqa"] = sum(bool(d["qa"]) for _, _, d in samples)
        return ShardOutcome(counts, +failures)  # unary + drops zero counts

    def summary_extra(self) -> dict:
        windows = sorted({(o.inputs, o.num_parts) for o in self.plan})
        return {"windows": [{"inputs": list(w), "outputs": n} for w, n in windows]}


__all__ = ["OutputShard", "TrainingShardsStage", "has_caption_text", "sample_json", "shuffle_rank"]
