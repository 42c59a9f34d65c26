"""Every spot that once assumed a local root, on a real S3 API (moto's server on loopback).

- listings see what another process wrote since (s3fs caches them unless told not to);
- the `local` tokenizer is built under an `s3://` root and read back from there;
- evaluate finds the newest checkpoint under `s3://.../runs`, reads an eval set on S3, writes its
  metrics there, and scores exactly as from a local copy of the same files;
- `goldiclip export` from an `s3://` checkpoint to an `s3://` directory, loaded back;
- the Prefect artifacts' links to files on S3 (the URI; an https link only when configured);
- Ray Train with `storage_path` on S3: a run that failed after a checkpoint resumes from it.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from storage import DatasetLayout, ShardWriter, StageRecords, atomic_write_bytes, exists, join, make_key, read_json
from storage import write_table
from storage.fs import local_copy, markdown_link, public_url, put_dir
from storage.records import ShardRecord
from tasks.config import PipelineConfig
from tasks.demo.train_shards import sample_record

REPO = Path(__file__).resolve().parents[2]


def _in_another_process(code: str) -> None:
    """Run ``code`` in a fresh Python (its own s3fs instance, no shared cache) with this environment."""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=os.environ.copy(), check=True, timeout=120)


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("data.pkl", b"x")
    return buffer.getvalue()


def test_listings_see_what_another_process_wrote(s3_server):
    from tasks.train.checkpoint import CHECKPOINT_FILE, MODEL_CONFIG_FILE, latest_checkpoint

    root = s3_server.prefix("listing")
    layout = DatasetLayout(root)
    run = join(root, "runs", "goldiclip-debug-0")
    atomic_write_bytes(layout.train_tar(0), b"tar")
    for name, data in ((MODEL_CONFIG_FILE, b"{}"), (CHECKPOINT_FILE, _zip_bytes())):
        atomic_write_bytes(join(run, "checkpoint_00000002", name), data)
    # This process lists both directories first (what s3fs would cache) ...
    assert layout.list_shards(layout.train_dir, ".tar") == ["00000"]
    assert latest_checkpoint(run) == join(run, "checkpoint_00000002")
    assert not exists(join(run, "checkpoint_00000004", CHECKPOINT_FILE))
    # ... then a Ray worker or download process elsewhere writes the next ones.
    _in_another_process(f"""
import io, zipfile, s3fs
buffer = io.BytesIO()
with zipfile.ZipFile(buffer, "w") as z:
    z.writestr("data.pkl", b"x")
fs = s3fs.S3FileSystem()
fs.pipe({{{layout.train_tar(1)!r}: b"tar", {join(run, "checkpoint_00000004", MODEL_CONFIG_FILE)!r}: b"{{}}",
         {join(run, "checkpoint_00000004", CHECKPOINT_FILE)!r}: buffer.getvalue()}})
""")

    assert layout.list_shards(layout.train_dir, ".tar") == ["00000", "00001"]
    assert exists(join(run, "checkpoint_00000004", CHECKPOINT_FILE))
    assert latest_checkpoint(run) == join(run, "checkpoint_00000004")


def test_the_local_tokenizer_is_built_under_an_s3_root_once(s3_server):
    from tasks.demo.train_shards import write_train_shards
    from tasks.train.checkpoint import TOKENIZER_MARKER, open_tokenizer, tokenizer_dir
    from tasks.train.data import train_shard_urls
    from tasks.train.stage import prepare_tokenizer

    root = s3_server.prefix("tokenizer")
    write_train_shards(join(root, "train"), num_shards=2, per_shard=8)
    config = PipelineConfig.model_validate({"dataset": {"root": root}, "train": {
        "preset": "debug", "tokenizer": "local", "local_tokenizer_vocab_size": 96}})
    urls = train_shard_urls(DatasetLayout(root).train_dir)
    assert len(urls) == 2 and all(u.startswith("s3://") for u in urls)

    built = prepare_tokenizer(config, urls)
    assert built == tokenizer_dir(root) == f"{root}/tokenizer"
    fs = s3_server.fs()
    marker = f"{built.removeprefix('s3://')}/{TOKENIZER_MARKER}"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(built.removeprefix("s3://"))}
    assert {TOKENIZER_MARKER, "tokenizer.json"} <= names
    tokenizer = open_tokenizer(built)
    assert len(tokenizer.get_vocab()) == 96 and "red" in tokenizer.decode(tokenizer("a red square")["input_ids"])
    etag = fs.info(marker)["ETag"]
    assert prepare_tokenizer(config, urls) == built  # there: not rebuilt
    assert s3_server.fs().info(marker)["ETag"] == etag and not Path("s3:").exists()


@pytest.fixture(scope="module")
def s3_checkpoint(s3_server, tmp_path_factory):
    """A debug GoldiCLIP saved as the train stage saves it (two checkpoints of one run under
    `s3://.../runs`, the `local` tokenizer under the root) and a 12-image eval set on S3; the
    same files in a local directory."""
    from model import GoldiCLIP, build_local_tokenizer, config_for_tokenizer, get_preset
    from PIL import Image

    from tasks.config import TrainConfig
    from tasks.train.checkpoint import checkpoint_dir_name, save_checkpoint, save_tokenizer, tokenizer_dir
    from tasks.train.optim import build_optimizer, build_scheduler

    local = tmp_path_factory.mktemp("s3-checkpoint")
    root = s3_server.prefix("evaluate")
    colours = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220)}
    lines = []
    for i in range(12):
        colour = sorted(colours)[i % 3]
        (local / "eval/images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), colours[colour]).save(local / f"eval/images/{i:05d}.jpg")
        lines.append({"image": f"images/{i:05d}.jpg", "caption": f"a {colour} square number {i}"})
    (local / "eval/pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    put_dir(str(local / "eval"), join(root, "eval_set"))

    tokenizer = build_local_tokenizer([x["caption"] for x in lines] * 3, local / "tokenizer", vocab_size=128)
    save_tokenizer(str(local / "tokenizer"), tokenizer_dir(root))
    torch.manual_seed(0)
    model = GoldiCLIP(config_for_tokenizer(get_preset("debug"), tokenizer))
    train = TrainConfig(preset="debug", steps=10, warmup_steps=1)
    optimizer = build_optimizer(model, train, torch.device("cpu"))
    run = join(root, "runs", "goldiclip-debug-0123")
    for step in (3, 5):
        with torch.no_grad():
            model.vision.visual_projection.weight.mul_(1.5)  # step 5's weights differ from step 3's
        for directory in (join(run, checkpoint_dir_name(step)), str(local / "runs/r" / checkpoint_dir_name(step))):
            save_checkpoint(directory, model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, train),
                            step=step, data={"step": step}, tokenizer=tokenizer_dir(root))
    return {"root": root, "local": local, "run": run, "model": model.eval(), "tokenizer": tokenizer,
            "checkpoint": join(run, checkpoint_dir_name(5))}


def _evaluate_config(root: str, eval_set: str, checkpoint: str | None = None) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "dataset": {"root": root},
        "evaluate": {"modes": ["conditioned", "agnostic"], "checkpoint": checkpoint,
                     "datasets": [{"name": "pairs", "format": "jsonl", "path": eval_set}]},
    })


def test_evaluate_reads_the_newest_s3_checkpoint_and_scores_as_from_local_files(s3_checkpoint, tmp_path):
    from tasks.evaluate.stage import EvaluateStage, metrics_path
    from tasks.stage import SINGLE_UNIT, run_stage

    root = s3_checkpoint["root"]
    config = _evaluate_config(root, join(root, "eval_set", "pairs.jsonl"))  # no checkpoint: the newest on S3
    summary = run_stage(EvaluateStage(config))
    assert summary["checkpoint"] == s3_checkpoint["checkpoint"] and summary["last_run"]["processed"] == [SINGLE_UNIT]
    assert summary["counts"] == {"pairs/images": 12, "pairs/texts": 12}
    assert metrics_path(config) == f"{root}/eval/metrics.json"
    assert read_json(metrics_path(config))["metrics"] == summary["metrics"]
    assert read_json(join(root, "_stages", "evaluate.json")) == summary
    assert run_stage(EvaluateStage(config))["last_run"]["skipped"] == [SINGLE_UNIT]

    # The same checkpoint and eval set from local files: the same numbers, to the bit.
    local = s3_checkpoint["local"]
    here = _evaluate_config(str(tmp_path / "data"), str(local / "eval/pairs.jsonl"),
                            checkpoint=str(local / "runs/r/checkpoint_00000005"))
    assert run_stage(EvaluateStage(here))["metrics"] == summary["metrics"]


def test_export_cli_from_s3_to_s3(s3_checkpoint):
    from transformers import CLIPModel

    from model import load_tokenizer
    from tasks.evaluate.export import load_exported

    out = join(s3_checkpoint["root"], "exports", "goldiclip-debug")
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "export", s3_checkpoint["checkpoint"], out],
                          cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exported to {out}" in proc.stdout
    model, tokenizer = s3_checkpoint["model"], s3_checkpoint["tokenizer"]
    with local_copy(out) as directory:
        clip = CLIPModel.from_pretrained(directory)
        assert load_tokenizer(directory).get_vocab() == tokenizer.get_vocab()
        assert {"config.json", "preprocessor_config.json", "tokenizer.json"} <= set(os.listdir(directory))
    assert torch.equal(clip.visual_projection.weight, model.vision.visual_projection.weight)
    restored = load_exported(out)  # straight from S3
    size = model.config.vision.image_size
    images = torch.randn(2, 3, size, size)
    texts = torch.tensor([[tokenizer.bos_token_id, 5, 6, tokenizer.eos_token_id] + [0] * 4] * 3)
    for mode in ("conditioned", "agnostic"):
        assert torch.allclose(restored.score(texts, images, mode=mode), model.score(texts, images, mode=mode),
                              atol=1e-5)


def test_artifact_links_to_s3_files(monkeypatch, s3_server):
    from tasks.annotate.gallery import write_gallery
    from tasks.train.report import report_markdown

    url = f"{s3_server.url}/data/runs/r/metrics.jsonl"
    monkeypatch.delenv("GOLDICLIP_STORAGE_PUBLIC_URL", raising=False)
    assert public_url(url) is None and markdown_link(url) == f"`{url}`"
    monkeypatch.setenv("GOLDICLIP_STORAGE_PUBLIC_URL", "https://{bucket}.s3.amazonaws.com/{key}")
    assert public_url(url) == "https://goldiclip-moto.s3.amazonaws.com/data/runs/r/metrics.jsonl"
    monkeypatch.setenv("GOLDICLIP_STORAGE_PUBLIC_URL", "https://minio.example.org/")
    assert markdown_link(url) == f"`{url}` ([open](https://minio.example.org/goldiclip-moto/data/runs/r/metrics.jsonl))"
    assert public_url("/data/runs/r/metrics.jsonl") is None  # a local path: the path only

    report = report_markdown(run_dir=f"{s3_server.url}/data/runs/r", rows=[{"step": 1, "loss/total": 1.0}],
                             plots={}, total_steps=2, checkpoint=f"{s3_server.url}/data/runs/r/checkpoint_00000001")
    assert "([open](https://minio.example.org/goldiclip-moto/data/runs/r/checkpoint_00000001))" in report
    assert "([open](https://minio.example.org/goldiclip-moto/data/runs/r/metrics.jsonl))" in report

    # A gallery on S3 names its HTML page there.
    root = s3_server.prefix("gallery")
    layout = DatasetLayout(root)
    rng = random.Random(0)
    with ShardWriter(layout.images_tar(0)) as writer:
        for i in range(3):
            image, meta = sample_record(make_key(0, i), rng)
            writer.write(make_key(0, i), {"jpg": image, "json": {"key": meta["key"], "url": meta["url"]}})
    write_table(layout.annotation("phrases", 0),
                [{"key": make_key(0, i), "phrases": [{"text": "red square", "sentence": "s", "field": "f"}]}
                 for i in range(3)], "phrases")
    StageRecords(layout, "phrases").put(ShardRecord(shard="00000", fingerprint="f"))
    markdown, page = write_gallery(layout, "phrases", 2)
    assert page == f"{root}/galleries/phrases.html" and exists(page)
    assert markdown.split("\n")[2] == ("The same as one HTML page: "
                                       f"`{page}` ([open](https://minio.example.org/{page.removeprefix('s3://')}))")
    assert markdown.count("data:image/jpeg;base64,") == 2


@pytest.mark.slow
def test_ray_train_on_s3_resumes_from_its_last_checkpoint(ray_on_s3):
    """Ray Train's `storage_path` is `s3://.../runs`: a run that failed after its step-2 checkpoint
    resumes from it on the next run of the stage (not from step 0), its metric history continuing."""
    from tasks.demo.train_shards import write_train_shards
    from tasks.stage import SINGLE_UNIT, run_stage
    from tasks.train.checkpoint import CHECKPOINT_FILE, latest_checkpoint, load_checkpoint
    from tasks.train.loop import STARTS_FILE, read_metrics
    from tasks.train.stage import TrainStage

    root = ray_on_s3.prefix("resume")
    write_train_shards(join(root, "train"), num_shards=2, per_shard=8)
    config = PipelineConfig.model_validate({"dataset": {"root": root}, "train": {
        "preset": "debug", "tokenizer": "local", "local_tokenizer_vocab_size": 96, "steps": 4, "warmup_steps": 1,
        "num_workers": 1, "batch_size_per_worker": 4, "captions_per_image": 2, "num_local_views": 2,
        "use_gpu": False, "resources_per_worker": {"CPU": 1}, "loader_workers": 0, "shuffle_buffer": 4,
        "checkpoint_every": 2, "log_every": 1, "max_failures": 0}, "ray": {"num_cpus": 2}})

    def fail_at_step_3(step: int, rank: int) -> None:
        if step == 3:
            raise RuntimeError("injected failure at step 3")

    with pytest.raises(Exception, match="injected failure at step 3"):
        run_stage(TrainStage(config, on_step=fail_at_step_3))
    stage = TrainStage(config)
    stage.prepare()
    assert stage.run_dir.startswith(f"{root}/runs/goldiclip-debug-")
    assert latest_checkpoint(stage.run_dir) == join(stage.run_dir, "checkpoint_00000002")
    assert stage.resume_step() == 2
    before = read_metrics(stage.run_dir)
    assert [r["step"] for r in before] == [1, 2]

    summary = run_stage(stage)
    assert summary["last_run"]["processed"] == [SINGLE_UNIT] and summary["counts"]["steps"] == 4
    assert summary["checkpoint"] == join(stage.run_dir, "checkpoint_00000004")
    starts = read_json(join(stage.run_dir, STARTS_FILE))
    assert [s["step"] for s in starts] == [0, 2]
    assert starts[1]["restored_from"].rstrip("/").endswith("checkpoint_00000002")
    rows = read_metrics(stage.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[:2] == before
    assert load_checkpoint(summary["checkpoint"])["step"] == 4
    assert exists(join(summary["checkpoint"], CHECKPOINT_FILE)) and summary["plots"]
    assert not Path("s3:").exists() and not (REPO / "s3:").exists()
