"""A debug GoldiCLIP checkpoint and a small retrieval set, shared by the evaluate tests."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tasks.train.checkpoint import MODEL_CONFIG_FILE
from tests.tasks.evaluate.images import write_images


@pytest.fixture(scope="package")
def debug_checkpoint(tmp_path_factory):
    """A randomly initialised debug GoldiCLIP saved as a plain state_dict (`model.pt`) with its
    config beside it, a local tokenizer in the run's tokenizer/, and 12 images with captions."""
    from model import GoldiCLIP, build_local_tokenizer, config_for_tokenizer, get_preset

    root = tmp_path_factory.mktemp("eval")
    names = [f"{i:05d}.jpg" for i in range(12)]
    write_images(root / "eval/images", names, size=(40, 30))
    lines = [{"image": f"images/{n}", "caption": f"a {c} square number {i}"}
             for i, (n, c) in enumerate(zip(names, ["red", "blue", "green"] * 4))]
    lines.append({"image": "images/00000.jpg", "caption": "a second caption"})
    lines.append({"image": "images/missing.jpg", "caption": "an image that is not there"})
    (root / "eval/pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = root / "data/runs/demo/checkpoint_000001"
    run.mkdir(parents=True)
    tokenizer = build_local_tokenizer([x["caption"] for x in lines] * 3, run.parent / "tokenizer", vocab_size=128)
    torch.manual_seed(0)
    model = GoldiCLIP(config_for_tokenizer(get_preset("debug"), tokenizer))
    torch.save(model.state_dict(), run / "model.pt")
    (run / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.config)))
    return root, run, model
