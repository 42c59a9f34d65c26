"""AdamW groups and the warm-up + cosine schedule (METHOD.md sec. 8)."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.train.optim import build_optimizer, lr_factor
from tests.tasks.train.conftest import TRAIN


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
