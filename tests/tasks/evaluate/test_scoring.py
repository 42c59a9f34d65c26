"""Scoring with a GoldiCLIP: tiled and pairwise conditioned scores, the checkpoint's tokenizer, pixel statistics."""

from __future__ import annotations

import torch
from PIL import Image

from model import load_tokenizer
from tasks.config import EvaluateConfig
from tasks.evaluate.data import CLIP_MEAN, CLIP_STD
from tasks.evaluate.scoring import (
    GoldiCLIPScorer,
    ImageFeatures,
    build_scorer,
    conditioned_matrix,
    encode_image_set,
    pair_scores,
)
from tasks.train.checkpoint import load_scoring_model, save_checkpoint


def test_rerank_pairs_equal_the_conditioned_matrix(debug_checkpoint):
    _, run, _ = debug_checkpoint
    model, _ = load_scoring_model(str(run))
    scorer = GoldiCLIPScorer(model, load_tokenizer(run.parent / "tokenizer"),
                             device=torch.device("cpu"), dtype=torch.float32)
    images = scorer.encode_images(torch.randn(5, 3, 32, 32))
    texts = scorer.encode_texts(["a red square", "a blue one", "green", "red red", "a square"])
    full = conditioned_matrix(scorer, texts, images, image_chunk=2, text_chunk=3)
    assert torch.allclose(full, scorer.score(texts, images, "conditioned"), atol=1e-6)
    pairs = torch.cartesian_prod(torch.arange(5), torch.arange(5))
    assert torch.allclose(pair_scores(scorer, texts, images, pairs, chunk=4).view(5, 5), full, atol=1e-5)


def test_a_train_stage_checkpoint_loads_with_its_tokenizer(debug_checkpoint, tmp_path):
    _, run, model = debug_checkpoint
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    directory = str(tmp_path / "runs/goldiclip-debug-x/checkpoint_00000005")
    save_checkpoint(directory, model=model, optimizer=optimizer, scheduler=scheduler, step=5, data={},
                    tokenizer=str(run.parent / "tokenizer"))
    scorer = build_scorer(EvaluateConfig(), directory)
    assert torch.equal(scorer.model.pooling.query_proj.weight, model.pooling.query_proj.weight)
    assert scorer.tokenizer.eos_token_id == model.config.text.eos_token_id
    # The tokenizer the checkpoint names, though none lies beside it.
    assert scorer.tokenizer.get_vocab() == load_tokenizer(run.parent / "tokenizer").get_vocab()


def test_images_are_normalised_with_the_scorer_s_statistics(tmp_path):
    # A model trained with its own pixel mean/std (VisionConfig.image_mean/image_std) must be
    # evaluated with the same; a scorer that names none gets CLIP's.
    path = tmp_path / "grey.png"
    Image.new("RGB", (20, 20), (128, 128, 128)).save(path)

    class Recorder:
        image_size, device = 8, torch.device("cpu")

        def encode_images(self, pixels):
            self.pixels = pixels
            return ImageFeatures(pixels.flatten(1)[:, :4], pixels.flatten(2).transpose(1, 2))

    grey = torch.full((3,), 128 / 255)
    plain = Recorder()
    encode_image_set(plain, [str(path)], batch_size=4, threads=1)
    assert torch.allclose(plain.pixels[0, :, 0, 0], (grey - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    own = Recorder()
    own.image_mean, own.image_std = (0.9, 0.8, 0.7), (0.1, 0.2, 0.3)
    encode_image_set(own, [str(path)], batch_size=4, threads=1)
    expected = (grey - torch.tensor(own.image_mean)) / torch.tensor(own.image_std)
    assert torch.allclose(own.pixels[0, :, 0, 0], expected, atol=1e-5)
