"""Tiny image folders and a scorer whose recalls are known by hand, for the evaluate tests."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from tasks.evaluate.scoring import ImageFeatures


def write_images(directory: Path, names, size=(12, 10)) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (20 * i % 255, 100, 200)).save(directory / name)


class OneHotScorer:
    """Image i and its texts are the same one-hot vector: perfect retrieval in every mode."""

    image_size = 8
    device = torch.device("cpu")

    def __init__(self, num_images: int, caption_to_image: dict[str, int]):
        self.num_images, self.caption_to_image = num_images, caption_to_image
        self.next_image = 0

    def encode_images(self, pixels):
        index = torch.arange(self.next_image, self.next_image + len(pixels))
        self.next_image += len(pixels)
        features = torch.nn.functional.one_hot(index, self.num_images).float()
        return ImageFeatures(features, features[:, None])

    def encode_texts(self, texts):
        index = torch.tensor([self.caption_to_image[t] for t in texts])
        return torch.nn.functional.one_hot(index, self.num_images).float()

    def score(self, texts, images, mode):
        return texts @ images.global_.T

    def score_pairs(self, texts, images):
        return (texts * images.global_).sum(-1)
