"""Image views for training (METHOD.md sec. 4; DINO's `DataAugmentationDINO`), with PIL and torch only.

torchvision is deliberately not a dependency (its PyPI build does not load beside this
torch), so the few transforms DINO uses are written here, following torchvision's
definitions:

- `random_resized_crop_box`: torchvision's `RandomResizedCrop.get_params` (10 tries at a
  random area fraction in `scale` and log-uniform aspect ratio in `ratio`, then a centre
  crop clamped to `ratio`); the crop is returned as a box so callers can move annotation
  boxes with it (`map_box`).
- `color_jitter`: brightness, contrast, saturation and hue in a random order, each factor
  drawn uniformly (DINO: 0.4, 0.4, 0.2, 0.1, applied with p = 0.8).
- grayscale (p = 0.2), Gaussian blur (sigma in [0.1, 2]), solarize (threshold 128).

DINO's recipe per view: global view 1 blur p = 1.0; global view 2 blur p = 0.1 and solarize
p = 0.2; local views blur p = 0.5. Every view gets flip p = 0.5 and the jitter/grayscale.
All randomness comes from the `random.Random` passed in, so a seeded stream is reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# CLIP's normalisation is the default; a model's own is `VisionConfig.image_mean/image_std` (eval uses the same).
from model.config import CLIP_MEAN, CLIP_STD

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ViewRecipe:
    """One kind of DINO view: size, crop scale, and the probabilities of its photometric ops."""

    size: int
    scale: tuple[float, float]
    flip: float = 0.5
    jitter: float = 0.8
    grayscale: float = 0.2
    blur: float = 0.0
    solarize: float = 0.0


def dino_recipes(global_size: int, local_size: int, num_global: int, num_local: int,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 jitter: float = 0.8, grayscale: float = 0.2) -> tuple[list[ViewRecipe], list[ViewRecipe]]:
    """(global recipes, local recipes) as in DINO: the first global view always blurred, the
    second rarely blurred and sometimes solarised (further global views alternate); every view
    colour-jittered with probability `jitter` and greyed with probability `grayscale`."""
    colour = {"jitter": jitter, "grayscale": grayscale}
    first = ViewRecipe(global_size, global_scale, blur=1.0, **colour)
    second = ViewRecipe(global_size, global_scale, blur=0.1, solarize=0.2, **colour)
    globals_ = [first if i % 2 == 0 else second for i in range(num_global)]
    locals_ = [ViewRecipe(local_size, local_scale, blur=0.5, **colour) for _ in range(num_local)]
    return globals_, locals_


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """A crop (x0, y0, x1, y1) in pixels, as torchvision's RandomResizedCrop draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.randint(0, width - w)
            y0 = rng.randint(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    in_ratio = width / height  # fallback: centre crop at the nearest allowed aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return (x0, y0, x0 + w, y0 + h)


def map_box(box: Box, crop: Box, *, flipped: bool = False, min_visible: float = 0.5) -> Box | None:
    """A pixel box of the source image -> the same box in [0, 1] coordinates of the crop.

    Resizing the crop to any output size keeps relative coordinates, so the result holds
    for the resized view. None when less than `min_visible` of the box's area is inside.
    """
    cx0, cy0, cx1, cy1 = crop
    x0, y0, x1, y1 = max(box[0], cx0), max(box[1], cy0), min(box[2], cx1), min(box[3], cy1)
    area = max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
    if x1 <= x0 or y1 <= y0 or area <= 0 or (x1 - x0) * (y1 - y0) < min_visible * area:
        return None
    cw, ch = cx1 - cx0, cy1 - cy0
    rel = ((x0 - cx0) / cw, (y0 - cy0) / ch, (x1 - cx0) / cw, (y1 - cy0) / ch)
    if flipped:
        rel = (1 - rel[2], rel[1], 1 - rel[0], rel[3])
    return rel


def _adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` (a fraction of the colour circle, in [-0.5, 0.5])."""
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 255))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def color_jitter(image: Image.Image, rng: random.Random, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - brightness, 1 + brightness)),
        lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - contrast, 1 + contrast)),
        lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - saturation, 1 + saturation)),
        lambda im: _adjust_hue(im, rng.uniform(-hue, hue)),
    ]
    rng.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W), un-normalised: the model normalises on its device (`VisionTower.normalize`)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_tensor(image: Image.Image, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """RGB PIL image -> normalised float (3, H, W): (x - mean) / std per channel, x in [0, 1]."""
    pixels = to_pixels(image).float().div_(255)  # (3, H, W)
    return pixels.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


def crop_and_resize(image: Image.Image, crop: Box, size: int) -> Image.Image:
    return image.resize((size, size), Image.BICUBIC, box=crop)


def dino_view(image: Image.Image, recipe: ViewRecipe, rng: random.Random) -> torch.Tensor:
    """One augmented view of an RGB image: uint8 (3, size, size)."""
    crop = random_resized_crop_box(*image.size, rng, recipe.scale)
    view = crop_and_resize(image, crop, recipe.size)
    if rng.random() < recipe.flip:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < recipe.jitter:
        view = color_jitter(view, rng)
    if rng.random() < recipe.grayscale:
        view = ImageOps.grayscale(view).convert("RGB")
    if rng.random() < recipe.blur:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < recipe.solarize:
        view = ImageOps.solarize(view, threshold=128)
    return to_pixels(view)


def eval_view(image: Image.Image, size: int, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Evaluation view: resize the short side to `size`, centre crop, normalise (CLIP's)."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.convert("RGB").resize((max(size, round(width * scale)), max(size, round(height * scale))),
                                          Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return to_tensor(resized.crop((left, top, left + size, top + size)), mean, std)


__all__ = ["CLIP_MEAN", "CLIP_STD", "ViewRecipe", "color_jitter", "crop_and_resize", "dino_recipes", "dino_view",
           "eval_view", "map_box", "random_resized_crop_box", "to_pixels", "to_tensor"]
