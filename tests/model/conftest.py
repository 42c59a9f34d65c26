"""Session fixtures for the model tests: a locally trained tokenizer and the debug config."""

import pytest
import torch

from model import build_local_tokenizer, config_for_tokenizer, get_preset

from .helpers import corpus


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_local_tokenizer(corpus(), tmp_path_factory.mktemp("tokenizer"), vocab_size=400)


@pytest.fixture(scope="session")
def debug_config(tokenizer):
    return config_for_tokenizer(get_preset("debug"), tokenizer)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine, two OpenMP threads
    spin against other processes and run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
