"""Training pieces without Ray: AdamW groups, the schedule, checkpoints as data, export round-trip."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPModel

from model import GoldiCLIP
from model.tokenizer import build_local_tokenizer
from tasks.config import TrainConfig
from tasks.evaluate.export import export_checkpoint, load_exported
from tasks.train.loop import build_optimizer, build_scheduler, load_checkpoint, lr_factor, model_config, save_checkpoint

TRAIN = TrainConfig(preset="debug", steps=100, warmup_steps=10, weight_decay=0.3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["a red square on grey", "a blue circle", "what colour is it? red"] * 20
    return build_local_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=128)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GoldiCLIP(model_config(TRAIN, tokenizer))


def test_no_weight_decay_on_one_dimensional_params_and_scales(model):
    optimizer = build_optimizer(model, TRAIN, torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    no_decay_ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    for name in ("retrieval_loss.log_scale", "retrieval_loss.bias", "weighting.log_vars.ret"):
        assert id(named[name]) in no_decay_ids
    assert any(id(p) in no_decay_ids for n, p in named.items() if "layer_norm" in n and n.endswith("weight"))
    teacher = {id(p) for n, p in model.named_parameters() if n.startswith("teacher.")}
    assert teacher and not teacher & {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert betas_and_eps(optimizer) == ((0.9, 0.98), 1e-8)


def betas_and_eps(optimizer):
    return tuple(optimizer.defaults["betas"]), optimizer.defaults["eps"]


def test_warmup_then_cosine():
    factor = [lr_factor(s, warmup_steps=10, total_steps=100, min_ratio=0.0) for s in range(100)]
    assert factor[0] == pytest.approx(0.1) and factor[9] == pytest.approx(1.0)
    assert factor[10] == pytest.approx(1.0) and factor[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factor[10:], factor[11:]))
    assert lr_factor(100, warmup_steps=10, total_steps=100, min_ratio=0.1) == pytest.approx(0.1)
    assert not math.isnan(lr_factor(0, warmup_steps=0, total_steps=1, min_ratio=0.0))


def test_checkpoint_is_data_and_restores(tmp_path, model, tokenizer):
    optimizer = build_optimizer(model, TRAIN, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, TRAIN)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    data = {"step": 3, "samples_seen": 48, "seed": 0, "errors": {"bad_image": 1}, "samples_read": 49}
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, step=3, data=data,
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
    assert (tmp_path / "goldiclip_config.json").exists()


def test_export_round_trip(tmp_path, model, tokenizer):
    optimizer = build_optimizer(model, TRAIN, torch.device("cpu"))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "ckpt").mkdir()
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, TRAIN), step=0,
                    data={"step": 0}, tokenizer=str(tmp_path / "tok"))
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    clip = CLIPModel.from_pretrained(str(out))
    assert torch.equal(clip.visual_projection.weight, model.vision.visual_projection.weight)
    assert torch.equal(clip.text_projection.weight, model.text.text_projection.weight)
    exported = load_exported(out)
    images = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size)
    texts = torch.tensor([[tokenizer.bos_token_id, 5, 6, tokenizer.eos_token_id] + [0] * 4] * 3)
    for mode in ("conditioned", "agnostic"):
        expected = model.eval().score(texts, images, mode=mode)
        assert torch.allclose(exported.score(texts, images, mode=mode), expected, atol=1e-5)
    assert (out / "tokenizer_config.json").exists()
