"""The suite through the evaluate stage on a debug GoldiCLIP: FLAIR's per-patch pooling, every family
dispatched, CIFAR's in-memory images, and the paper tables written beside the metrics."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from model import load_tokenizer
from storage import read_json
from tasks.config import PipelineConfig
from tasks.evaluate.scoring import GoldiCLIPScorer
from tasks.stage import run_stage
from tasks.train.checkpoint import load_scoring_model
from tests.tasks.evaluate.images import write_images
from tests.tasks.evaluate.test_segmentation import _write
from tests.tasks.evaluate.test_vqa_retrieval import _write_retvqa


def test_patch_embeddings_are_each_patch_pooled_alone_without_the_sink(debug_checkpoint):
    _, run, _ = debug_checkpoint
    model, _ = load_scoring_model(str(run))
    scorer = GoldiCLIPScorer(model, load_tokenizer(run.parent / "tokenizer"), device=torch.device("cpu"),
                             dtype=torch.float32)
    images = scorer.encode_images(torch.randn(2, 3, 32, 32))
    texts = scorer.encode_texts(["a red square", "a blue circle", "green"])
    patches = images.patches.flatten(0, 1)[:, None]  # (I*P, 1, D): every patch its own one-key image
    pooled = model.pooling(texts, patches, attention_sink=False)  # (I*P, 3, D)
    embeddings = scorer.patch_embeddings(images).flatten(0, 1)  # (I*P, D)
    for t in range(3):  # the same vector whatever the text: one key takes all the attention
        assert torch.allclose(pooled[:, t], embeddings, atol=1e-5)
    with_sink = model.pooling(texts, patches, attention_sink=True)  # the zero key takes a share
    assert not torch.allclose(with_sink[:, 0], embeddings, atol=1e-3)


def test_every_family_through_the_stage(debug_checkpoint, tmp_path):
    root, run, _ = debug_checkpoint
    write_images(tmp_path / "docci/images", ["a.jpg", "b.jpg"], size=(40, 30))
    (tmp_path / "docci/annotations").mkdir()
    (tmp_path / "docci/annotations/test_annotations.json").write_text(json.dumps({"annotations": [
        {"image_id": i, "image": f"{n}.jpg", "caption": c}
        for i, n, c in [(0, "a", "a red square"), (0, "a", "number 1"), (1, "b", "a blue square")]]}))
    (tmp_path / "vg").mkdir()
    rvqa = _write_retvqa(tmp_path / "vg")
    (tmp_path / "voc").mkdir()
    _write("voc20", tmp_path / "voc")
    (tmp_path / "cifar").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (4, 3072), dtype=np.uint8)
    (tmp_path / "cifar/test_batch").write_bytes(pickle.dumps({b"data": pixels, b"labels": [0, 1, 2, 3]}, protocol=2))
    config = PipelineConfig.model_validate({
        "dataset": {"root": str(tmp_path / "data")},
        "evaluate": {"checkpoint": str(run), "modes": ["conditioned", "agnostic"], "datasets": [
            {"name": "docci_fg", "format": "docci", "path": str(tmp_path / "docci")},
            rvqa.model_dump(),
            {"name": "voc", "format": "voc20", "path": str(tmp_path / "voc"), "templates": ["a {}."]},
            {"name": "cifar", "format": "cifar10", "path": str(tmp_path / "cifar")}]},
    })
    from tasks.evaluate.stage import EvaluateStage, paper_tables_path

    metrics = run_stage(EvaluateStage(config))["metrics"]
    for name in ("docci_fg/conditioned/t2i_R@1", "rvqa/conditioned/count_R@2", "rvqa/agnostic/average_hit@2",
                 "voc/conditioned/mIoU", "cifar/agnostic/top1"):
        assert 0 <= metrics[name] <= 1, name
    assert metrics["cifar/chance/top1"] == pytest.approx(0.1)
    tables = (tmp_path / "data/eval/paper_tables.md").read_text()
    assert paper_tables_path(config) == str(tmp_path / "data/eval/paper_tables.md")
    assert f"| ours, text-conditioned | {100 * metrics['voc/conditioned/mIoU']:.1f} | - |" in tables
    assert "docci = `docci_fg`" in tables and read_json(str(tmp_path / "data/eval/metrics.json"))["metrics"]
