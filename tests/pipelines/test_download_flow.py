"""Download and captions as Prefect flows against a real loopback server and a real Prefect API.

Covers: every bad URL counted with its reason while the shard completes, one
row per URL tried, tars only for good images, artifacts published, a rerun
skips every shard, and SIGKILL mid-run followed by a rerun loses and
duplicates nothing.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from storage import DatasetLayout, StageRecords, iter_shard, read_table
from tasks.demo.http_server import LoopbackServer, Reply, closed_port, image_bytes, redirect
from tasks.download.stage import IMAGE_REASONS

ROOT = Path(__file__).resolve().parents[2]


def _bad_routes(server: LoopbackServer) -> dict[str, str]:
    """URL -> the reason the download stage must record for it."""
    good = image_bytes(320, 240)
    return {
        server.route("/missing.jpg", Reply(status=404, content_type="text/html")): "http_404",
        server.route("/html.jpg", Reply(body=b"<html>no</html>", content_type="image/jpeg")): "not_an_image",
        server.route("/truncated.jpg", Reply(body=good[: len(good) // 2])): "decode_error",
        server.route("/tiny.jpg", Reply(body=image_bytes(1, 1))): "image_too_small",
        server.route("/loop", redirect("/loop")): "too_many_redirects",
        server.route("/huge.jpg", Reply(body=b"\xff" * 300_000)): "too_large",
        server.route("/stall.jpg", Reply(body=good, delay_s=3)): "timeout",
        f"http://127.0.0.1:{closed_port()}/refused.jpg": "connection_error",
        "ftp://127.0.0.1/x.jpg": "bad_scheme",
        "file:///etc/passwd": "bad_scheme",
    }


def _write_inputs(tmp_path: Path, server: LoopbackServer, num_good: int):
    good_urls = [server.route(f"/img/{i}.jpg", Reply(body=image_bytes(200 + i % 7 * 40, 150 + i % 5 * 30)))
                 for i in range(num_good)]
    server.route("/flaky.jpg", Reply(body=image_bytes(300, 300), fail_first=1))  # 500 then the image
    good_urls.append(server.url("/flaky.jpg"))
    bad = _bad_routes(server)
    urls_tsv = tmp_path / "urls.tsv"
    lines = [f"caption {i}\t{u}" for i, u in enumerate(good_urls)]
    lines += [f"bad {i}\t{u}" for i, u in enumerate(bad)]
    lines += ["", "only one column", f"duplicate\t{good_urls[0]}"]
    urls_tsv.write_text("\n".join(lines) + "\n")

    dreamlip = tmp_path / "dreamlip.csv"
    with dreamlip.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Path", "raw_caption", "shortIB_captions", "longIB_captions", "shortSV_captions",
                    "longSV_captions", "shortLLA_captions", "longLLA_captions"])
        for i, u in enumerate(good_urls[:-1]):  # the flaky image has no captions
            w.writerow([u, f"raw {i}", f"ib {i}", f"IB long {i}.\nSecond line.", f"sv {i}", f"SV long {i}.",
                        f"lla {i}", f"LLA long {i}. It has two sentences."])
        w.writerow([good_urls[1], "too", "few"])
    return good_urls, bad, urls_tsv, dreamlip


def _config(tmp_path, urls_tsv, dreamlip, **download) -> Path:
    cfg = {
        "dataset": {"root": str(tmp_path / "data")},
        "sources": [{"name": "cc3m", "format": "cc3m", "paths": [str(urls_tsv)]}],
        "download": {"shard_size": 8, "processes": 2, "concurrency": 8, "timeout_s": 1.0, "retries": 2,
                     "backoff_s": 0.01, "max_bytes": 200_000, "allow_private_addresses": True, **download},
        "captions": {"dreamlip_csvs": [str(dreamlip)]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _all_keys(layout: DatasetLayout) -> list[str]:
    return [s["__key__"] for shard in layout.list_shards(layout.images_dir, ".tar")
            for s in iter_shard(layout.images_tar(shard))]


@pytest.mark.usefixtures("prefect_harness")
def test_download_and_captions_flows(tmp_path):
    from prefect import get_client

    from pipelines.dag import goldiclip_pipeline
    from tasks.config import load_config

    with LoopbackServer() as server:
        good_urls, bad, urls_tsv, dreamlip = _write_inputs(tmp_path, server, num_good=12)
        config = load_config(_config(tmp_path, urls_tsv, dreamlip))
        summaries = goldiclip_pipeline(config, stages=["download", "captions"])

        download = summaries["download"]
        assert download["counts"]["urls"] == len(good_urls) + len(bad)
        assert download["counts"]["ok"] == len(good_urls)
        expected_failures = {}
        for reason in bad.values():
            expected_failures[reason] = expected_failures.get(reason, 0) + 1
        assert download["failures"] == expected_failures
        assert download["url_lists"]["list_counts"] == {"empty_line": 1, "missing_column": 1, "duplicate_url": 1}
        assert server.hits["/flaky.jpg"] == 2  # retried once after the 500

        layout = DatasetLayout(config.dataset.root)
        keys = _all_keys(layout)
        assert len(keys) == len(set(keys)) == len(good_urls)
        rows = [r for s in layout.list_shards(layout.images_dir, ".parquet")
                for r in read_table(layout.images_table(s)).to_pylist()]
        assert len(rows) == len(good_urls) + len(bad)  # one row per URL tried
        by_url = {r["url"]: r for r in rows}
        for url, reason in bad.items():
            assert by_url[url]["error_message"] == reason
            assert by_url[url]["status"] == ("failed_to_resize" if reason in IMAGE_REASONS else "failed_to_download")
        for shard in layout.list_shards(layout.images_dir, ".tar"):
            for sample in iter_shard(layout.images_tar(shard)):
                meta = sample["json"]
                assert min(meta["width"], meta["height"]) <= 256
                assert by_url[meta["url"]]["key"] == sample["__key__"]
                assert meta["status"] == "success" and {"original_width", "original_height"} <= set(meta)

        # img2dataset-compatible: open_clip's webdataset pipeline reads every image-caption pair.
        import webdataset as wds

        tars = [layout.images_tar(s) for s in layout.list_shards(layout.images_dir, ".tar")]
        pairs = list(wds.WebDataset(tars, shardshuffle=False).decode("pilrgb").to_tuple("jpg;png", "txt"))
        captions_by_url = {url: f"caption {i}" for i, url in enumerate(good_urls)}
        assert len(pairs) == len(good_urls) == len(rows) - len(bad)
        assert sorted(text for _, text in pairs) == sorted(captions_by_url.values())
        assert all(image.mode == "RGB" and min(image.size) <= 256 for image, _ in pairs)

        captions = summaries["captions"]
        assert captions["counts"] == {"images": len(good_urls), "captioned": len(good_urls) - 1}
        assert captions["failures"] == {"no_caption": 1}
        assert captions["csv_counts"]["malformed_row"] == 1
        cap_rows = {r["url"]: r for s in layout.list_shards(layout.images_dir, ".tar")
                    for r in read_table(layout.annotation("captions", s)).to_pylist()}
        i = 3
        assert cap_rows[good_urls[i]]["raw"] == f"raw {i}"
        assert cap_rows[good_urls[i]]["long"] == [f"IB long {i}.\nSecond line.", f"SV long {i}.",
                                                  f"LLA long {i}. It has two sentences."]

        # A rerun skips every shard of both stages.
        again = goldiclip_pipeline(config, stages=["download", "captions"])
        assert again["download"]["last_run"]["processed"] == []
        assert again["captions"]["last_run"]["processed"] == []
        assert len(again["download"]["last_run"]["skipped"]) == len(layout.list_shards(layout.images_dir, ".tar"))

    import asyncio

    async def artifacts():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    keys = asyncio.run(artifacts())
    assert {"download-counts", "download-failures", "download-progress", "captions-counts"} <= keys

    async def overview():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            found = await client.read_latest_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["pipeline-overview"])))
            return found[0].data

    import json

    rows = {r["stage"]: r for r in json.loads(asyncio.run(overview()))}
    num_shards = len(layout.list_shards(layout.images_dir, ".tar"))
    assert list(rows) == ["download", "captions", "phrases", "boxes", "vqa", "shards", "train", "evaluate"]
    assert rows["download"]["done"] == rows["captions"]["done"] == f"{num_shards}/{num_shards} shards"
    assert rows["captions"]["failures"] == "no_caption=1" and rows["phrases"]["state"] == "not started"

    # The same view from storage alone, on the command line.
    status = subprocess.run([sys.executable, "-m", "pipelines.cli", "status", "--config",
                             str(tmp_path / "config.yaml"), "--json"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    by_stage = {r["stage"]: r for r in json.loads(status.stdout)}
    assert by_stage["download"]["done"] == by_stage["download"]["total"] == num_shards
    assert by_stage["download"]["state"] == "done" and by_stage["train"]["state"] == "not started"
    assert by_stage["download"]["failures"] == expected_failures


def _run_cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("stage", ["download", "captions"])
def test_sigkill_mid_stage_then_rerun_loses_and_duplicates_nothing(tmp_path, stage):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    with LoopbackServer(latency_s=(0.02, 0.05)) as server:
        good_urls, bad, urls_tsv, dreamlip = _write_inputs(tmp_path, server, num_good=60)
        config_path = _config(tmp_path, urls_tsv, dreamlip, shard_size=5, processes=1, concurrency=2)
        layout = DatasetLayout(str(tmp_path / "data"))
        if stage == "captions":
            done = subprocess.run([sys.executable, "-m", "pipelines.cli", "download", "--config", str(config_path)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
        num_shards = -(-(len(good_urls) + len(bad)) // 5)

        proc = _run_cli([stage, "--config", str(config_path)], env)
        records = StageRecords(layout, stage)
        deadline = time.time() + 240
        while len(records.all()) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes, mid-stage
        proc.wait()
        finished_before = len(records.all())
        assert 0 < finished_before < num_shards, "the kill should land mid-stage"

        # Nothing a reader takes as complete is partial: every listed tar reads to its end.
        for shard in layout.list_shards(layout.images_dir, ".tar"):
            list(iter_shard(layout.images_tar(shard)))

        rerun = subprocess.run([sys.executable, "-m", "pipelines.cli", stage, "--config", str(config_path)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert len(records.all()) == num_shards

    keys = _all_keys(layout)
    assert len(keys) == len(set(keys)) == len(good_urls)
    if stage == "captions":
        cap_keys = [r["key"] for s in layout.list_shards(layout.images_dir, ".tar")
                    for r in read_table(layout.annotation("captions", s)).to_pylist()]
        assert len(cap_keys) == len(set(cap_keys)) == len(good_urls) - 1
