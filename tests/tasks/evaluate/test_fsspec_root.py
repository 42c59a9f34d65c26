"""Evaluate and export a checkpoint that lives on an fsspec filesystem (`memory://`, in-process).

The train stage's checkpoint layout under `memory://<root>/runs/<run>/checkpoint_<step>`, the
local tokenizer under `memory://<root>/tokenizer`, metrics and stage records under the same
root, and the export written to `memory://` and loaded back: nothing may assume a local path.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel

from model import GoldiCLIP, config_for_tokenizer, get_preset, load_tokenizer
from storage import join, open_fs, read_json
from storage.fs import local_copy
from tasks.config import PipelineConfig, TrainConfig
from tasks.evaluate.export import export_checkpoint, load_exported
from tasks.evaluate.stage import EvaluateStage, metrics_path
from tasks.stage import SINGLE_UNIT, run_stage
from tasks.train.checkpoint import (
    checkpoint_dir_name,
    latest_checkpoint,
    runs_dir,
    save_checkpoint,
    save_tokenizer,
    tokenizer_dir,
)
from tasks.train.optim import build_optimizer, build_scheduler


@pytest.fixture
def memory_root():
    root = f"memory://goldiclip-{uuid.uuid4().hex[:8]}/data"
    yield root
    fs, path = open_fs(root)
    fs.rm(path.rsplit("/", 1)[0], recursive=True)


def test_evaluate_and_export_a_checkpoint_on_memory_fs(debug_checkpoint, memory_root):
    root, run, _ = debug_checkpoint
    # The tokenizer as the train stage leaves it for train.tokenizer `local`: under the root.
    save_tokenizer(str(run.parent / "tokenizer"), tokenizer_dir(memory_root))
    tokenizer = load_tokenizer(run.parent / "tokenizer")
    torch.manual_seed(1)
    model = GoldiCLIP(config_for_tokenizer(get_preset("debug"), tokenizer))
    train = TrainConfig(preset="debug", steps=10, warmup_steps=1)
    optimizer = build_optimizer(model, train, torch.device("cpu"))
    checkpoint = join(runs_dir(memory_root), "goldiclip-debug-0123", checkpoint_dir_name(7))
    save_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, train),
                    step=7, data={"step": 7}, tokenizer=tokenizer_dir(memory_root))
    assert latest_checkpoint(join(runs_dir(memory_root), "goldiclip-debug-0123")) == checkpoint

    config = PipelineConfig.model_validate({
        "dataset": {"root": memory_root},  # no checkpoint given: the newest under memory://.../runs
        "evaluate": {"modes": ["conditioned", "agnostic"],
                     "datasets": [{"name": "pairs", "format": "jsonl", "path": str(root / "eval/pairs.jsonl")}]},
    })
    summary = run_stage(EvaluateStage(config))
    assert summary["checkpoint"] == checkpoint and summary["last_run"]["processed"] == [SINGLE_UNIT]
    assert summary["counts"] == {"pairs/images": 12, "pairs/texts": 13}
    assert read_json(metrics_path(config))["metrics"] == summary["metrics"]
    assert read_json(join(memory_root, "_stages", "evaluate.json")) == summary
    assert 0 <= summary["metrics"]["pairs/conditioned/t2i_R@1"] <= 1
    assert run_stage(EvaluateStage(config))["last_run"]["skipped"] == [SINGLE_UNIT]

    exported = join(memory_root, "export")
    assert export_checkpoint(checkpoint, exported) == exported
    with local_copy(exported) as local:
        clip = CLIPModel.from_pretrained(local)
        assert load_tokenizer(local).get_vocab() == tokenizer.get_vocab()
    assert torch.equal(clip.visual_projection.weight, model.vision.visual_projection.weight)
    restored = load_exported(exported)
    images = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size)
    texts = torch.tensor([[tokenizer.bos_token_id, 5, 6, tokenizer.eos_token_id] + [0] * 4] * 3)
    for mode in ("conditioned", "agnostic"):
        assert torch.allclose(restored.score(texts, images, mode=mode), model.eval().score(texts, images, mode=mode),
                              atol=1e-5)

    # The export itself is a checkpoint evaluate reads, on the same filesystem.
    direct = PipelineConfig.model_validate({**config.model_dump(mode="json"),
                                            "evaluate": {**config.evaluate.model_dump(mode="json"),
                                                         "checkpoint": exported}})
    again = run_stage(EvaluateStage(direct))
    assert again["checkpoint"] == exported and again["last_run"]["processed"] == [SINGLE_UNIT]
    assert again["metrics"] == pytest.approx(summary["metrics"])
    assert not Path("memory:").exists()  # no URL was taken for a local path
