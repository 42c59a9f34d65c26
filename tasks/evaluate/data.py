"""Evaluation sets as they ship, and CLIP's image preprocessing (METHOD.md sec. 9).

Readers turn the standard files into one shape, so the evaluator never sees a format:

    RetrievalSet        images (paths) + texts, each text naming its image by index
    ClassificationSet   images (paths) + a label per image + class names

- coco: ``captions_val2017.json`` (``images[].id/file_name``, ``annotations[].image_id/caption``)
  plus the image directory; about 5 captions per image.
- flickr30k: Karpathy-style ``dataset_flickr30k.json`` (``images[].split/filename/sentences[].raw``,
  ``filepath`` when present, as in the COCO Karpathy file) plus the image directory, one split.
- jsonl: ``{"image": path, "caption": text}`` (or ``"captions": [...]``) per line; lines naming
  the same image add captions to it; paths are relative to ``images`` or to the jsonl's directory.
- classification: ``root/<class>/<image>``; the class name is the folder name with ``_`` as spaces.

Problems in the annotation files (a bad line, a caption of an unknown image) are counted by
reason and skipped, never fatal. Paths are local paths or fsspec URLs.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from model.config import CLIP_MEAN, CLIP_STD
from storage import join, open_fs, read_bytes
from tasks.config import EvalDatasetConfig

RESIZE_MODES = ("center_crop", "squash")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FOLDER_TEMPLATES = ("a photo of a {}.",)  # class folders name no dataset, so no dataset templates


@dataclass
class RetrievalSet:
    name: str
    image_paths: list[str]
    texts: list[str]
    text_image: list[int]  # the index into image_paths each text describes
    failures: Counter = field(default_factory=Counter)

    def select_images(self, keep: list[int]) -> RetrievalSet:
        """The set restricted to images `keep` (in that order) and their texts."""
        new_index = {old: new for new, old in enumerate(keep)}
        pairs = [(t, new_index[i]) for t, i in zip(self.texts, self.text_image) if i in new_index]
        return RetrievalSet(self.name, [self.image_paths[i] for i in keep], [t for t, _ in pairs],
                            [i for _, i in pairs], Counter(self.failures))


@dataclass
class ClassificationSet:
    name: str
    image_paths: list[str]
    labels: list[int]
    class_names: list[str]
    templates: list[str]
    failures: Counter = field(default_factory=Counter)

    def select_images(self, keep: list[int]) -> ClassificationSet:
        return ClassificationSet(self.name, [self.image_paths[i] for i in keep], [self.labels[i] for i in keep],
                                 self.class_names, self.templates, Counter(self.failures))


def _grouped(name: str, captions_by_image: dict[str, list[str]], failures: Counter,
             max_images: int | None) -> RetrievalSet:
    """Images in first-seen order, those without captions dropped (counted)."""
    image_paths, texts, text_image = [], [], []
    for path, captions in captions_by_image.items():
        if not captions:
            failures["image_without_captions"] += 1
            continue
        if max_images is not None and len(image_paths) == max_images:
            break
        texts += captions
        text_image += [len(image_paths)] * len(captions)
        image_paths.append(path)
    return RetrievalSet(name, image_paths, texts, text_image, failures)


def _clean(text) -> str | None:
    return text.strip() or None if isinstance(text, str) else None


def read_coco(config: EvalDatasetConfig) -> RetrievalSet:
    data = json.loads(read_bytes(config.path))
    failures = Counter()
    by_id = {img["id"]: join(config.images, img["file_name"]) for img in data["images"]}
    captions = {path: [] for path in by_id.values()}
    for ann in data["annotations"]:
        caption = _clean(ann.get("caption"))
        if ann.get("image_id") not in by_id:
            failures["caption_of_unknown_image"] += 1
        elif caption is None:
            failures["empty_caption"] += 1
        else:
            captions[by_id[ann["image_id"]]].append(caption)
    return _grouped(config.name, captions, failures, config.max_images)


def read_karpathy(config: EvalDatasetConfig) -> RetrievalSet:
    data = json.loads(read_bytes(config.path))
    failures = Counter()
    captions = {}
    for img in data["images"]:
        if img.get("split") != config.split:
            continue
        path = join(config.images, *([img["filepath"]] if img.get("filepath") else []), img["filename"])
        kept = [c for c in (_clean(s.get("raw")) for s in img.get("sentences", [])) if c is not None]
        if len(kept) < len(img.get("sentences", [])):
            failures["empty_caption"] += len(img["sentences"]) - len(kept)
        captions[path] = kept
    if not captions:
        raise ValueError(f"{config.path} has no images in split {config.split!r}")
    return _grouped(config.name, captions, failures, config.max_images)


def read_jsonl(config: EvalDatasetConfig) -> RetrievalSet:
    image_dir = config.images or config.path.rstrip("/").rsplit("/", 1)[0]
    failures = Counter()
    captions: dict[str, list[str]] = {}
    for line in read_bytes(config.path).decode("utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = row["image"]
            raw = row["captions"] if "captions" in row else [row["caption"]]
            if not isinstance(image, str) or not isinstance(raw, list):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            failures["bad_line"] += 1
            continue
        kept = [c for c in map(_clean, raw) if c is not None]
        if len(kept) < len(raw):
            failures["empty_caption"] += len(raw) - len(kept)
        captions.setdefault(join(image_dir, image), []).extend(kept)
    return _grouped(config.name, captions, failures, config.max_images)


def even_spread(labels: list[int], count: int | None) -> list[int]:
    """Indices of `count` items taken round-robin over the classes (all when None), in their order:
    a smoke run with `max_images` still sees every class, not the first classes only."""
    if count is None:
        return list(range(len(labels)))
    seen, rank_in_class = Counter(), []
    for label in labels:
        rank_in_class.append(seen[label])
        seen[label] += 1
    return sorted(sorted(range(len(labels)), key=lambda i: (rank_in_class[i], labels[i]))[:count])


def read_class_folders(config: EvalDatasetConfig) -> ClassificationSet:
    fs, root = open_fs(config.path)
    protocol = config.path.split("://", 1)[0] + "://" if "://" in config.path else ""
    class_dirs = sorted(p.rstrip("/") for p in fs.ls(root, detail=False) if fs.isdir(p))
    if not class_dirs:
        raise ValueError(f"{config.path} has no class subfolders")
    image_paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in fs.ls(class_dir, detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
        image_paths += [protocol + p if protocol and "://" not in p else p for p in files]
        labels += [label] * len(files)
    keep = even_spread(labels, config.max_images)
    image_paths, labels = [image_paths[i] for i in keep], [labels[i] for i in keep]
    names = [d.rsplit("/", 1)[-1].replace("_", " ") for d in class_dirs]
    return ClassificationSet(config.name, image_paths, labels, names, list(config.templates or FOLDER_TEMPLATES))


READERS = {"coco": read_coco, "flickr30k": read_karpathy, "jsonl": read_jsonl, "classification": read_class_folders}


def read_eval_set(config: EvalDatasetConfig):
    """The set of `config.format`: a RetrievalSet or ClassificationSet, or a question-retrieval or
    segmentation set of the paper's suite (tasks/evaluate/sets/)."""
    from tasks.evaluate.sets import SUITE_READERS  # imported here: the suite's readers import this module

    return {**READERS, **SUITE_READERS}[config.format](config)


def center_crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) exactly as open_clip's eval transform,
    torchvision's ``Resize(size)`` + ``CenterCrop(size)``, computes them: the long side is
    ``int(size * long / short)`` (truncated) and the offsets are ``int(round((side - size) / 2))``
    (Python's round, halves to even), so our pixels equal open_clip's and scores compare with the paper's."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def preprocess_image(data: bytes, image_size: int, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD, resize_mode: str = "center_crop") -> torch.Tensor:
    """JPEG/PNG bytes -> (3, S, S) float, then (x - mean) / std: the model's normalisation
    (`VisionConfig.image_mean/image_std`, CLIP's by default).

    resize_mode "center_crop" (CLIP's): short side resized to S (bicubic), centre crop;
    "squash": the whole image resized to S x S (bicubic), aspect ratio not kept.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {resize_mode!r}")
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if resize_mode == "squash":
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        else:
            new_w, new_h, left, top = center_crop_geometry(*img.size, image_size)
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
            img = img.crop((left, top, left + image_size, top + image_size))
        pixels = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3)
    pixels = (pixels - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, S, S)


def load_image(source: str | bytes, image_size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD, resize_mode: str = "center_crop") -> torch.Tensor | str:
    """The preprocessed image, from a path or from encoded bytes held in memory (CIFAR's), or the
    reason it could not be read."""
    try:
        data = source if isinstance(source, bytes) else read_bytes(source)
    except (FileNotFoundError, IsADirectoryError):
        return "missing_image"
    try:
        return preprocess_image(data, image_size, mean, std, resize_mode)
    except (OSError, ValueError, Image.DecompressionBombError):
        return "decode_error"
