"""The checkpoint layout: checkpoints as data, finding the latest, tokenizers and exports, on any fsspec root."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel

from model import GoldiCLIP
from storage import join, open_fs, read_bytes
from storage.fs import atomic_write_bytes
from tasks.evaluate.export import export_checkpoint, load_exported
from tasks.train.checkpoint import (
    CHECKPOINT_FILE,
    MODEL_CONFIG_FILE,
    TOKENIZER_MARKER,
    checkpoint_dir_name,
    checkpoint_step,
    find_tokenizer,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    newest_checkpoint,
    open_tokenizer,
    read_data_position,
    runs_dir,
    save_checkpoint,
    save_tokenizer,
    tokenizer_dir,
)
from tasks.train.optim import build_optimizer, build_scheduler
from tests.tasks.train.conftest import TRAIN


def test_checkpoint_is_data_and_restores(tmp_path, model, tokenizer):
    optimizer = build_optimizer(model, TRAIN, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, TRAIN)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    data = {"step": 3, "samples_seen": 48, "seed": 0, "errors": {"bad_image": 1}, "samples_read": 49}
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    path = save_checkpoint(str(tmp_path), model=model, optimizer=optimizer, scheduler=scheduler, step=3, data=data,
                           tokenizer=str(tmp_path / "tok"))
    state = torch.load(path, map_location="cpu", weights_only=True)  # raises on anything but data
    assert state["step"] == 3 and state["data"] == data
    assert any(k.startswith("teacher.") for k in state["model"])  # EMA teacher
    assert any("center" in k for k in state["model"]) and "weighting.log_vars.sd" in state["model"]
    restored = GoldiCLIP(model.config)
    restored.load_state_dict(load_checkpoint(path)["model"])
    fresh_scheduler = build_scheduler(build_optimizer(restored, TRAIN, torch.device("cpu")), TRAIN)
    fresh_scheduler.load_state_dict(state["scheduler"])
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert (tmp_path / MODEL_CONFIG_FILE).exists() and read_data_position(str(tmp_path)) == data


def test_export_round_trip(tmp_path, model, tokenizer):
    optimizer = build_optimizer(model, TRAIN, torch.device("cpu"))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "ckpt").mkdir()
    save_checkpoint(str(tmp_path / "ckpt"), model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, TRAIN), step=0,
                    data={"step": 0}, tokenizer=str(tmp_path / "tok"))
    out = Path(export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "export")))
    clip = CLIPModel.from_pretrained(str(out))
    assert torch.equal(clip.visual_projection.weight, model.vision.visual_projection.weight)
    assert torch.equal(clip.text_projection.weight, model.text.text_projection.weight)
    exported = load_exported(str(out))
    images = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size)
    texts = torch.tensor([[tokenizer.bos_token_id, 5, 6, tokenizer.eos_token_id] + [0] * 4] * 3)
    for mode in ("conditioned", "agnostic"):
        expected = model.eval().score(texts, images, mode=mode)
        assert torch.allclose(exported.score(texts, images, mode=mode), expected, atol=1e-5)
    assert (out / TOKENIZER_MARKER).exists()


def _save(directory: str, model, step: int, tokenizer: str = "") -> str:
    optimizer = build_optimizer(model, TRAIN, torch.device("cpu"))
    return save_checkpoint(directory, model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, TRAIN),
                           step=step, data={"step": step, "samples_seen": 4 * step}, tokenizer=tokenizer)


def test_the_latest_complete_checkpoint_of_a_run_on_memory_fs(model):
    run = "memory://ckpt-latest/runs/goldiclip-debug-00"
    assert latest_checkpoint(run) is None
    for step in (3, 12, 100):
        _save(join(run, checkpoint_dir_name(step)), model, step)
    # A killed upload: checkpoint_00000200's file is cut short, so its zip directory is missing.
    cut = join(run, checkpoint_dir_name(200))
    _save(cut, model, 200)
    data = read_bytes(join(cut, CHECKPOINT_FILE))
    atomic_write_bytes(join(cut, CHECKPOINT_FILE), data[: len(data) // 2])
    assert not is_complete(cut) and is_complete(join(run, checkpoint_dir_name(100)))
    latest = latest_checkpoint(run)
    assert latest == join(run, "checkpoint_00000100") and checkpoint_step(latest) == 100  # by step, not name order
    state = load_checkpoint(latest)
    assert state["step"] == 100 and read_data_position(latest) == {"step": 100, "samples_seen": 400}
    assert torch.equal(load_checkpoint(join(latest, CHECKPOINT_FILE))["model"]["pooling.query_proj.weight"],
                       model.state_dict()["pooling.query_proj.weight"])
    with pytest.raises(ValueError, match=CHECKPOINT_FILE):
        load_checkpoint(join(run, "nothing-here"))


def test_newest_checkpoint_under_runs_is_the_last_written(model, tmp_path):
    runs = str(tmp_path / "runs")
    with pytest.raises(ValueError, match="train first"):
        newest_checkpoint(runs)
    _save(join(runs, "b-run", checkpoint_dir_name(50)), model, 50)
    _save(join(runs, "a-run", checkpoint_dir_name(2)), model, 2)  # written last: newest, though fewer steps
    assert newest_checkpoint(runs) == join(runs, "a-run", checkpoint_dir_name(2))


def test_a_checkpoint_finds_its_tokenizer_on_memory_fs(model, tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    root = "memory://ckpt-tokenizer/data"
    save_tokenizer(str(tmp_path / "tok"), tokenizer_dir(root))
    # Named by the checkpoint (a URL), or found in a parent's tokenizer/ folder.
    named = _save(join(runs_dir(root), "run", checkpoint_dir_name(1)), model, 1, tokenizer=tokenizer_dir(root))
    assert find_tokenizer(named, model.config, load_checkpoint(named)["tokenizer"]) == tokenizer_dir(root)
    assert find_tokenizer(join(runs_dir(root), "run", checkpoint_dir_name(1)), model.config) == tokenizer_dir(root)
    assert open_tokenizer(tokenizer_dir(root)).get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ValueError, match="set evaluate.tokenizer"):
        find_tokenizer("memory://ckpt-tokenizer-none/a/b/c", model.config)


def test_the_local_tokenizer_is_built_under_an_fsspec_root():
    from tasks.config import PipelineConfig
    from tasks.demo.train_shards import write_train_shards
    from tasks.train.stage import prepare_tokenizer

    root = "memory://ckpt-build-tokenizer/data"
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_train_shards(Path(tmp) / "train", num_shards=1, per_shard=8)
        config = PipelineConfig.model_validate({"dataset": {"root": root}, "train": {
            "preset": "debug", "tokenizer": "local", "local_tokenizer_vocab_size": 128}})
        built = prepare_tokenizer(config, urls)
    assert built == tokenizer_dir(root) == "memory://ckpt-build-tokenizer/data/tokenizer"
    fs, path = open_fs(built)
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)} >= {"tokenizer.json", "tokenizer_config.json"}
    assert "square</w>" in open_tokenizer(built).get_vocab()  # trained on the shards' captions
    assert prepare_tokenizer(config, []) == built  # there already: not rebuilt (no captions needed)
