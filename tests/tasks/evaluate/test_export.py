"""`goldiclip export` runs in the Hugging Face tools: the real `pipeline("zero-shot-image-classification")`
and `CLIPProcessor` on an export of a debug checkpoint with the demo's own (non-CLIP) pixel mean/std.

The pipeline's preprocessing (transformers' CLIP image processor, PIL backend) and the evaluation's
(`preprocess_image`) are the same resize-shortest-edge + centre crop, bicubic, rescale, normalise;
they differ only in rounding a centre-crop offset that falls on half a pixel (transformers
truncates, the evaluation rounds halves to even as torchvision does). The images here are sizes
where both crops agree, so pixels match to float rounding (1e-6) and scores to 1e-5 (measured:
pixels equal, probabilities within 1.5e-7). Where the offsets differ (a 50x37 image at size 32:
43 - 32 = 11 pixels of margin) the crop is shifted by one pixel.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, pipeline

from model import GoldiCLIP, build_local_tokenizer, config_for_tokenizer, get_preset, tokenize
from tasks.config import TrainConfig
from tasks.evaluate.data import preprocess_image
from tasks.evaluate.export import export_checkpoint, load_exported
from tasks.train.checkpoint import save_checkpoint
from tasks.train.optim import build_optimizer, build_scheduler

DEMO_MEAN, DEMO_STD = (0.90, 0.87, 0.84), (0.11, 0.12, 0.14)  # pipelines/configs/demo.yaml
# (width, height): squares, and long sides that scale to whole pixels with an even crop margin.
SIZES = [(32, 32), (48, 48), (20, 20), (64, 32), (96, 64), (32, 40)]
LABELS = ["red square", "blue circle", "green triangle", "yellow star"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export directory, the GoldiCLIP it came from): a random debug GoldiCLIP saved as a training checkpoint."""
    tmp = tmp_path_factory.mktemp("export")
    words = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green", "yellow") for s in ("square", "circle",
             "triangle", "star") for p in ("left", "right")]
    tokenizer = build_local_tokenizer(words * 4, tmp / "tokenizer", vocab_size=128)
    config = config_for_tokenizer(get_preset("debug", vision={"image_mean": DEMO_MEAN, "image_std": DEMO_STD}),
                                  tokenizer)
    torch.manual_seed(0)
    model = GoldiCLIP(config)
    train = TrainConfig(preset="debug", steps=10, warmup_steps=1)
    optimizer = build_optimizer(model, train, torch.device("cpu"))
    save_checkpoint(str(tmp / "checkpoint_00000007"), model=model, optimizer=optimizer,
                    scheduler=build_scheduler(optimizer, train), step=7, data={"step": 7},
                    tokenizer=str(tmp / "tokenizer"))
    out = export_checkpoint(str(tmp / "checkpoint_00000007"), str(tmp / "export"))
    return out, model.eval()


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def eval_pixels(image: Image.Image, model: GoldiCLIP) -> torch.Tensor:
    """The image as the evaluation stage reads it (lossless PNG bytes, then `preprocess_image`)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    vision = model.config.vision
    return preprocess_image(buffer.getvalue(), vision.image_size, vision.image_mean, vision.image_std)


def test_export_writes_the_models_own_preprocessing(exported):
    out, model = exported
    config = json.loads(open(f"{out}/preprocessor_config.json").read())
    size = model.config.vision.image_size
    assert config["size"] == {"shortest_edge": size} and config["crop_size"] == {"height": size, "width": size}
    assert config["image_mean"] == pytest.approx(DEMO_MEAN) and config["image_std"] == pytest.approx(DEMO_STD)
    assert config["resample"] == Image.Resampling.BICUBIC and config["do_center_crop"]

    processor = CLIPProcessor.from_pretrained(out)
    hf = processor(images=images(), return_tensors="pt")["pixel_values"]  # (I, 3, S, S)
    ours = torch.stack([eval_pixels(image, model) for image in images()])
    assert hf.shape == ours.shape and torch.allclose(hf, ours, atol=1e-6)
    assert processor.tokenizer("a red square")["input_ids"] == tokenize(processor.tokenizer, ["a red square"],
                                                                          8)[0, :5].tolist()


def test_hf_pipeline_scores_equal_goldiclips_text_agnostic_scores(exported):
    out, model = exported
    classify = pipeline("zero-shot-image-classification", model=out)
    template = "a photo of a {}."
    ids = tokenize(classify.tokenizer, [template.format(label) for label in LABELS], model.config.text.context_length)
    pixels = torch.stack([eval_pixels(image, model) for image in images()])
    cosine = model.score(ids, pixels, mode="agnostic").T  # (I, labels)
    expected = (model.retrieval_loss.log_scale.detach().exp() * cosine).softmax(-1)

    for image, probs in zip(images(), expected):
        result = classify(image, candidate_labels=LABELS, hypothesis_template=template)
        got = {r["label"]: r["score"] for r in result}
        assert torch.allclose(torch.tensor([got[label] for label in LABELS]), probs, atol=1e-5)
    assert (expected.max(-1).values - expected.min(-1).values).min() > 1e-3  # the labels are told apart

    # The same cosines straight from CLIPModel + CLIPProcessor (what `logits_per_image` scales).
    clip, processor = CLIPModel.from_pretrained(out).eval(), CLIPProcessor.from_pretrained(out)
    inputs = processor(text=[template.format(label) for label in LABELS], images=images(), return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        logits = clip(**inputs).logits_per_image  # (I, labels)
    assert torch.allclose(logits / clip.logit_scale.exp(), cosine, atol=1e-5)


def test_text_conditioned_scores_from_the_export(exported):
    """README's recipe: `load_exported` + the exported processor give the checkpoint's conditioned scores."""
    out, model = exported
    restored, processor = load_exported(out), CLIPProcessor.from_pretrained(out)
    pixels = processor(images=images(), return_tensors="pt")["pixel_values"]
    ids = tokenize(processor.tokenizer, LABELS, restored.config.text.context_length)
    reference = torch.stack([eval_pixels(image, model) for image in images()])
    for mode in ("conditioned", "agnostic"):
        assert torch.allclose(restored.score(ids, pixels, mode=mode), model.score(ids, reference, mode=mode),
                              atol=1e-5)
