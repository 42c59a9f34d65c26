"""The whole demo DAG with `dataset.root` on S3 (moto's server on loopback) equals a local-disk run.

Both runs read the same synthetic source from one loopback HTTP server (so the same URLs and
bytes), the same stand-in OWLv2 and VQA server, and train the same tiny debug GoldiCLIP with Ray
Train (its `storage_path` on S3 in the second run); the eval set of the S3 run is on S3 too.
Equal: every stage's counts and failures, the training shards' keys, the tokenizer, the run's name,
its metric rows and checkpoint weights, and the evaluation metrics (CPU training with one worker
and no loader process is deterministic, so equal to the bit). Everything the S3 run writes is on
S3: nothing appears on the local disk, and the Prefect artifacts name the `s3://` files.

The one thing not deterministic across processes is the `local` tokenizer: Hugging Face
`tokenizers`' BPE trainer gives tokens of equal frequency ids in hash order, which differs per
process. So the S3 run gets the local run's tokenizer under its root (the train stage then uses it
as it would its own from an earlier run); building it on S3 is tests/storage/test_s3.py's.
"""

from __future__ import annotations

import time

import pytest
import torch

from pipelines.demo import DEMO_EVAL_SET
from storage import DatasetLayout, iter_shard, join, read_json
from storage.fs import put_dir
from tasks.config import load_config

pytestmark = pytest.mark.slow
STAGES = ("download", "captions", "phrases", "boxes", "vqa", "shards", "train", "evaluate")


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory):
    """The demo's synthetic set, its HTTP server and the VQA stand-in server, for the module."""
    from tasks.demo.openai_server import OpenAIServer
    from tasks.demo.source import generate_demo_source, serve_directory, write_url_lists
    from tasks.demo.vqa_standin import scene_answers

    source_dir = tmp_path_factory.mktemp("demo-source")
    generate_demo_source(source_dir, num_images=40, num_eval_images=16)
    with serve_directory(source_dir) as base_url, OpenAIServer(answer_fn=scene_answers) as vqa:
        yield write_url_lists(source_dir, base_url), vqa.base_url


def _config(root: str, eval_pairs: str, source, vqa_url: str, owl_dir: str):
    """The `demo` preset as `goldiclip demo` sets it up (pipelines/demo.py), made tiny."""
    return load_config(preset="demo", overrides={
        "dataset.root": root,
        "sources.0.paths": [str(source.url_list)],
        "captions.dreamlip_csvs": [str(p) for p in source.dreamlip_csvs],
        "boxes.model": owl_dir,
        "vqa.openai.base_urls": [vqa_url],
        "evaluate.datasets": [{"name": DEMO_EVAL_SET, "format": "jsonl", "path": eval_pairs}],
        "download.shard_size": 16, "download.processes": 1,
        "shards.shard_size": 16,
        "train.steps": 4, "train.warmup_steps": 1, "train.checkpoint_every": 2, "train.log_every": 1,
        "train.num_workers": 1, "train.batch_size_per_worker": 8, "train.loader_workers": 0,
        "train.report_every_s": 0,
    })


def _train_keys(layout: DatasetLayout) -> list[str]:
    return sorted(s["__key__"] for n in layout.list_shards(layout.train_dir, ".tar")
                  for s in iter_shard(layout.train_tar(n), decode_json=False))


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from tasks.train.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)["model"]


def _newest_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created).data


def test_the_demo_dag_on_s3_equals_a_local_run(prefect_harness, ray_on_s3, demo_source, owl_dir, tmp_path,
                                              monkeypatch):
    from pipelines.dag import goldiclip_pipeline
    from tasks.train.checkpoint import open_tokenizer
    from tasks.train.loop import read_metrics

    source, vqa_url = demo_source
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would land here
    local = _config(str(tmp_path / "data"), str(source.eval_pairs), source, vqa_url, owl_dir)
    root = ray_on_s3.prefix("demo")
    put_dir(str(source.eval_pairs.parent), join(root, "eval_set"))
    on_s3 = _config(root, join(root, "eval_set", source.eval_pairs.name), source, vqa_url, owl_dir)

    expected = goldiclip_pipeline(local)
    put_dir(join(local.dataset.root, "tokenizer"), join(root, "tokenizer"), last="tokenizer_config.json")
    started = time.monotonic()
    got = goldiclip_pipeline(on_s3)
    seconds = time.monotonic() - started
    print(f"S3 run of the demo DAG: {seconds:.1f} s;",
          {stage: (expected[stage].get("seconds"), got[stage].get("seconds")) for stage in got})

    assert list(got) == list(expected) == list(STAGES)
    for stage in STAGES:
        for field in ("num_shards_done", "counts", "failures"):
            assert got[stage][field] == expected[stage][field], (stage, field, seconds)
        assert got[stage]["last_run"]["skipped"] == []
    assert expected["download"]["counts"]["ok"] >= 36 and sum(expected["download"]["failures"].values()) >= 3
    assert expected["shards"]["num_shards_done"] >= 2 and expected["train"]["counts"]["steps"] == 4

    # The same data, tokenizer, run, training history and weights.
    layout_s3, layout_local = DatasetLayout(root), DatasetLayout(local.dataset.root)
    assert _train_keys(layout_s3) == _train_keys(layout_local) != []
    assert (open_tokenizer(join(root, "tokenizer")).get_vocab()
            == open_tokenizer(join(local.dataset.root, "tokenizer")).get_vocab())
    assert got["train"]["run"] == expected["train"]["run"]
    assert got["train"]["run_dir"] == f"{root}/runs/{got['train']['run']}"
    assert got["train"]["checkpoint"] == f"{got['train']['run_dir']}/checkpoint_00000004"
    rows_s3, rows_local = read_metrics(got["train"]["run_dir"]), read_metrics(expected["train"]["run_dir"])
    assert [r["step"] for r in rows_s3] == [1, 2, 3, 4]
    drop = ("images_per_s",)  # wall-clock pace
    assert ([{k: v for k, v in r.items() if k not in drop} for r in rows_s3]
            == [{k: v for k, v in r.items() if k not in drop} for r in rows_local])
    weights_s3, weights_local = _weights(got["train"]["checkpoint"]), _weights(expected["train"]["checkpoint"])
    assert weights_s3.keys() == weights_local.keys()
    assert all(torch.equal(weights_s3[k], weights_local[k]) for k in weights_s3)

    # Evaluation of the S3 checkpoint on the S3 eval set: the local run's numbers.
    assert got["evaluate"]["checkpoint"] == got["train"]["checkpoint"]
    assert got["evaluate"]["metrics"] == expected["evaluate"]["metrics"]
    assert f"{DEMO_EVAL_SET}/conditioned/t2i_R@1" in got["evaluate"]["metrics"]
    assert read_json(join(root, "eval", "metrics.json"))["metrics"] == got["evaluate"]["metrics"]

    # Everything on S3, nothing on the local disk; the artifacts name the files there.
    fs = ray_on_s3.fs()
    written = {p.removeprefix(f"{ray_on_s3.bucket}/{root.rsplit('/', 1)[-1]}/") for p in fs.find(root)}
    for path in ("galleries/boxes.html", "galleries/vqa.html", "eval/metrics.json", "eval/paper_tables.md",
                 "_stages/evaluate.json", "tokenizer/tokenizer.json", "sources/manifest.json",
                 f"runs/{got['train']['run']}/plots/losses.png", f"runs/{got['train']['run']}/metrics.jsonl"):
        assert path in written, sorted(written)
    assert not any(".tmp-" in p for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert f"`{got['train']['checkpoint']}`" in _newest_artifact("train-report")
    assert f"`{root}/galleries/vqa.html`" in _newest_artifact("vqa-gallery")
    assert f"`{root}/eval/metrics.json`" in _newest_artifact("evaluate-paper-tables")
