"""Synthetic annotations, a tokenizer corpus and tiny GoldiCLIP batches for the model tests."""

import random

import torch

from model import build_decoder_batch, tokenize

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["square", "circle", "triangle", "star", "hexagon"]


def synthetic_annotation(rng: random.Random) -> dict:
    colour, shape, other = rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(COLOURS)
    sentence = f"a {colour} {shape} on a {other} background"
    return {
        "captions": [f"{sentence}.", f"the {shape} is {colour}.", f"a {other} background with a {shape}.",
                     f"an image of a {colour} {shape}."],
        "short_captions": [sentence, f"a {colour} {shape}"],
        "boxes": [{"phrase": f"the {colour} {shape}", "sentence": sentence,
                   "box": (rng.random() * 0.5, rng.random() * 0.5, 0.5 + rng.random() * 0.5, 0.5 + rng.random() * 0.5)}],
        "qa": [{"question": f"what colour is the {shape}?", "answer": colour}],
    }


def corpus() -> list[str]:
    rng = random.Random(0)
    texts = []
    for _ in range(200):
        annotation = synthetic_annotation(rng)
        texts += annotation["captions"] + [annotation["qa"][0]["question"]]
    texts += ["caption is", "REF , box is", "OBGR , grounded caption is", "VQA , answer is"]
    texts += [" ".join(str(n) for n in range(i, 1000, 7)) for i in range(7)]
    return texts


def make_batch(config, tokenizer, *, num_images: int = 4, num_captions: int = 3, num_global: int = 2,
               num_local: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    annotations = [synthetic_annotation(rng) for _ in range(num_images)]
    size, local = config.vision.image_size, config.vision.local_image_size
    captions = [rng.sample(a["captions"], num_captions) for a in annotations]
    caption_ids = tokenize(tokenizer, [c for cs in captions for c in cs], config.text.context_length)
    batch = {
        "images": torch.randn(num_images, 3, size, size, generator=generator),
        "caption_ids": caption_ids.view(num_images, num_captions, -1),
        "global_views": torch.randn(num_images, num_global, 3, size, size, generator=generator),
        "local_views": torch.randn(num_images, num_local, 3, local, local, generator=generator),
    }
    batch |= build_decoder_batch(annotations, tokenizer, max_length=config.text.context_length, rng=rng)
    return batch
