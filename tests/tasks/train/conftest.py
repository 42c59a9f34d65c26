"""A debug GoldiCLIP and its tokenizer, shared by the training tests."""

from __future__ import annotations

import pytest
import torch

from model import GoldiCLIP
from model.tokenizer import build_local_tokenizer
from tasks.config import TrainConfig
from tasks.train.loop import model_config

TRAIN = TrainConfig(preset="debug", steps=100, warmup_steps=10, weight_decay=0.3)


@pytest.fixture(scope="package")
def tokenizer(tmp_path_factory):
    texts = ["a red square on grey", "a blue circle", "what colour is it? red"] * 20
    return build_local_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=128)


@pytest.fixture(scope="package")
def model(tokenizer):
    torch.manual_seed(0)
    return GoldiCLIP(model_config(TRAIN, tokenizer))
