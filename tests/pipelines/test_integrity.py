"""Issue #13 items 1 and 8 end to end: real loopback downloads, real spaCy, real Prefect flows, the real CLI.

Item 1: a finished images tar cut short (its record left as it was) is named by the
stage that reads it, its download shard is redone on the next run, and ``goldiclip
verify`` reports it (and a same-size corruption, which ``--mark`` has redone). Item 8: a forced stage whose output changed reaches the training
shards; one that rewrote the same bytes does not.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from storage import DatasetLayout, StageRecords, iter_shard, read_table, write_table
from tasks.demo.http_server import LoopbackServer, Reply, image_bytes

ROOT = Path(__file__).resolve().parents[2]
NUM_IMAGES = 12
COLOURS = ("red", "green", "blue", "yellow")
THINGS = ("car", "house", "dog", "boat")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A loopback server with NUM_IMAGES images, their CC3M-style URL list and DreamLIP CSV."""
    tmp = tmp_path_factory.mktemp("integrity-source")
    with LoopbackServer() as server:
        urls = [server.route(f"/img/{i}.jpg", Reply(body=image_bytes(120 + 8 * i, 100))) for i in range(NUM_IMAGES)]
        (tmp / "urls.tsv").write_text("".join(f"caption {i}\t{u}\n" for i, u in enumerate(urls)))
        with (tmp / "dreamlip.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Image Path", "raw_caption", "shortIB_captions", "longIB_captions", "shortSV_captions",
                        "longSV_captions", "shortLLA_captions", "longLLA_captions"])
            for i, u in enumerate(urls):
                colour, thing = COLOURS[i % 4], THINGS[i // 4 % 4]
                long = f"A {colour} {thing} stands beside a wooden fence. A tall tree grows behind the {thing}."
                w.writerow([u, f"raw {i}", f"a {thing}", long, f"a {colour} {thing}", long, f"a {thing}", long])
        yield tmp


def _config(tmp_path: Path, source: Path, **shards) -> Path:
    cfg = {
        "dataset": {"root": str(tmp_path / "data")},
        "sources": [{"name": "cc3m", "format": "cc3m", "paths": [str(source / "urls.tsv")]}],
        "download": {"shard_size": 4, "processes": 1, "concurrency": 4, "timeout_s": 10.0,
                     "allow_private_addresses": True},
        "captions": {"dreamlip_csvs": [str(source / "dreamlip.csv")]},
        "phrases": {"n_process": 1},
        "shards": {"shard_size": 4, "shuffle_window": 2, **shards},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _verify(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "verify", "--config", str(config), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _processed(summaries: dict) -> dict[str, list[str]]:
    return {stage: s["last_run"]["processed"] for stage, s in summaries.items()}


def _train_keys(layout: DatasetLayout) -> list[str]:
    return sorted(s["__key__"] for n in layout.list_shards(layout.train_dir, ".tar")
                  for s in iter_shard(layout.train_tar(n)))


@pytest.mark.usefixtures("prefect_harness")
def test_a_cut_images_tar_is_named_redone_and_reported_by_verify(tmp_path, source):
    from pipelines.dag import goldiclip_pipeline

    config = _config(tmp_path, source, require_captions=False)
    layout = DatasetLayout(str(tmp_path / "data"))
    first = goldiclip_pipeline(str(config), stages=["download", "shards"])
    assert first["download"]["counts"]["ok"] == NUM_IMAGES and first["shards"]["counts"]["samples"] == NUM_IMAGES
    assert _verify(config).returncode == 0

    tar = Path(layout.images_tar("00001"))
    size = tar.stat().st_size
    tar.write_bytes(tar.read_bytes()[: size // 2])  # the record is left as it was

    report = _verify(config)
    assert report.returncode == 1, report.stdout + report.stderr
    assert (f"DAMAGED download shard 00001: images/00001.tar: {size // 2} bytes, its record says {size}"
            in report.stdout)
    assert _verify(config, "--stages", "shards").returncode == 0  # the training tars are intact

    # The shards stage reads the tar (forced here): it names the file and its shard, and counts nothing lost.
    with pytest.raises(Exception, match=r"images/00001\.tar \(download shard 00001\) is damaged: \d+ bytes, its "
                                        r"record says \d+; download shard 00001 is marked to be redone"):
        goldiclip_pipeline(str(config), stages=["shards"], force=["shards"])
    assert StageRecords(layout, "download").get("00001").invalidated
    marked = _verify(config)
    assert marked.returncode == 1 and "DAMAGED download shard 00001: marked to be redone" in marked.stdout

    # Rerun: download redoes that shard; its new tar is byte for byte the old one, so nothing downstream is redone.
    rerun = goldiclip_pipeline(str(config), stages=["download", "shards"])
    assert _processed(rerun) == {"download": ["00001"], "shards": []}
    assert _verify(config).returncode == 0
    assert _train_keys(layout) == sorted(r["key"] for s in ("00000", "00001", "00002")
                                         for r in read_table(layout.images_table(s)).to_pylist())

    # A download shard cut short with no reader in between is redone by the download stage itself.
    other = Path(layout.images_tar("00002"))
    other.write_bytes(other.read_bytes()[:1000])
    assert _processed(goldiclip_pipeline(str(config), stages=["download"])) == {"download": ["00002"]}

    # A same-size corruption: no stat sees it; verify reads it, and --mark has the stage redo it.
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert _processed(goldiclip_pipeline(str(config), stages=["download"])) == {"download": []}
    found = _verify(config, "--stages", "download", "--mark")
    assert found.returncode == 1 and "DAMAGED download shard 00001: images/00001.tar: checksum crc32:" in found.stdout
    assert _processed(goldiclip_pipeline(str(config), stages=["download"])) == {"download": ["00001"]}
    assert _verify(config).returncode == 0


@pytest.mark.usefixtures("prefect_harness")
def test_a_forced_rerun_reaches_the_training_shards_only_when_its_output_changed(tmp_path, source):
    from prefect import flow

    from pipelines.dag import goldiclip_pipeline
    from pipelines.stage_flow import run_stage_flow
    from tasks.annotate.phrases import PhrasesStage
    from tasks.config import load_config

    config = _config(tmp_path, source)
    layout = DatasetLayout(str(tmp_path / "data"))
    stages = ["download", "captions", "phrases", "shards"]
    first = goldiclip_pipeline(str(config), stages=stages)
    assert first["phrases"]["counts"]["with_phrases"] == NUM_IMAGES
    assert len(first["shards"]["last_run"]["processed"]) == 3

    # `goldiclip run --stages phrases,shards --force phrases`: spaCy writes the same phrases again.
    same = goldiclip_pipeline(str(config), stages=["phrases", "shards"], force=["phrases"])
    assert _processed(same) == {"phrases": ["00000", "00001", "00002"], "shards": []}

    class FixedPhrasesStage(PhrasesStage):
        """The phrases stage after a bug fix that changes its output but not its config: one phrase per image."""

        def process(self, shard):
            outcome = super().process(shard)
            url = self.layout.annotation("phrases", shard)
            rows = read_table(url).to_pylist()
            write_table(url, [{**r, "phrases": r["phrases"][:1]} for r in rows], "phrases")
            return outcome

    @flow
    def forced_fixed_phrases():
        return run_stage_flow(FixedPhrasesStage(load_config(config)), force=True)

    forced_fixed_phrases()
    changed = goldiclip_pipeline(str(config), stages=["phrases", "shards"])
    assert _processed(changed) == {"phrases": [], "shards": ["00000", "00001", "00002"]}
    docs = [s["json"] for n in layout.list_shards(layout.train_dir, ".tar") for s in iter_shard(layout.train_tar(n))]
    assert len(docs) == NUM_IMAGES and all(len(d["phrases"]) == 1 for d in docs)
