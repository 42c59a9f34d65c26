"""Zero-shot semantic segmentation: VOC20, Cityscapes, Context59, ADE20K, COCO-Stuff (paper sec. 4.6, table 3).

The paper computes segmentation maps "following FLAIR", from the text-conditioned pooling
without the attention sink. FLAIR's repository does not ship its segmentation script; its
per-patch procedure is `src/visualization.py` (`visualize_patchwise_sim`): every patch token is
pooled *alone* (one key and value) with the text as query, and the patch's score for the text is
cos(pooled, t). Without the sink a single key takes all the attention whatever the query, so the
pooled patch is out_proj(W_v LN_v(p)) for every text (`Scorer.patch_embeddings`); with the sink it
would be weighted against the zero key. The benchmark protocol around it is the one FLAIR's
sibling COSMOS ships (`src/seg_eval.py`, `training/clip_segmentor.py`, `training/seg_configs`,
from SCLIP), which these five sets and their names match:

- class names of SCLIP's ``cls_*.txt`` (segmentation_classes.json), synonyms scored as separate
  queries, a class taking its best synonym; each name through the 80 OpenAI ImageNet templates,
  the normalised mean of the normalised template embeddings;
- images resized (bilinear, aspect kept) to a short side of 336 px (448 COCO-Stuff, 560
  Cityscapes; long side at most 2048), for a model with 224-px input; other input sizes scale
  these by size/224;
- sliding windows of the model's input size, stride half of it; each window's patch-score map
  upsampled bilinearly to the window, overlaps averaged, the whole map upsampled bilinearly to
  the label's size; the prediction is the best query's class (SCLIP's softmax at logit scale 40,
  with probability threshold 0 and no PAMR, picks the same class);
- mIoU over the dataset (tasks/evaluate/segmentation_metrics.py), label 255 ignored.

Choices where FLAIR/COSMOS leave it open: no SCLIP correlative self-attention in the last ViT
block (COSMOS's `--use-csa`; the encoder is used as trained); the class embedding serves as both
the query and the text the pooled patch is compared with (FLAIR compares with the query itself).

Formats (mmsegmentation's layouts, which COSMOS's configs read; `path` is the directory named):

- voc20: ``VOCdevkit/VOC2012``: ``ImageSets/Segmentation/val.txt``, ``JPEGImages/<id>.jpg``,
  ``SegmentationClass/<id>.png`` (0 background and 255 ignored, 1..20 the classes).
- context59: ``VOCdevkit/VOC2010``: ``ImageSets/SegmentationContext/val.txt``, ``JPEGImages/``,
  ``SegmentationClassContext/<id>.png`` (0 background, 1..59; made from PASCAL-Context's
  ``trainval_merged.json`` by mmsegmentation's ``tools/dataset_converters/pascal_context.py``).
- ade20k: ``ADEChallengeData2016``: ``images/validation/*.jpg``, ``annotations/validation/*.png``
  (0 "other" ignored, 1..150).
- cityscapes: ``leftImg8bit/val/<city>/*_leftImg8bit.png`` and ``gtFine/val/<city>/*_gtFine_labelIds.png``
  as Cityscapes ships them; label ids mapped to the 19 train ids (cityscapesscripts' table).
- coco_stuff: COCO-Stuff 164k: ``images/val2017/*.jpg`` and ``annotations/val2017/*.png``, the
  ``stuffthingmaps_trainval2017.zip`` maps as shipped (ids 0..181, 255 unlabelled), mapped to the
  171 classes by mmsegmentation's ``coco_stuff164k.py`` table.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from storage import join, read_bytes
from tasks.config import EvalDatasetConfig, EvaluateConfig
from tasks.evaluate.data import CLIP_MEAN, CLIP_STD
from tasks.evaluate.scoring import ImageFeatures, encode_text_set
from tasks.evaluate.segmentation_metrics import IGNORE_INDEX, confusion, segmentation_scores
from tasks.evaluate.sets.files import basename, list_dir, read_required_lines

SEGMENTATION_CLASSES = json.loads((Path(__file__).parent / "segmentation_classes.json").read_text())["datasets"]
IMAGENET_TEMPLATES = json.loads((Path(__file__).parent / "zero_shot_classes.json").read_text()
                                )["datasets"]["imagenet"]["templates"]
REFERENCE_CROP = 224  # the input size SCLIP's short sides are given for
MAX_LONG_SIDE = 2048  # at REFERENCE_CROP


def _reduce_zero_label() -> np.ndarray:
    """mmsegmentation's reduce_zero_label as a table: 0 -> ignored, k -> k - 1, 255 stays ignored."""
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = lut[255] = IGNORE_INDEX
    return lut


def _table(pairs: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
    lut[list(pairs)] = list(pairs.values())
    return lut


# cityscapesscripts labels.py: label id -> train id of the 19 evaluated classes; every other id ignored.
CITYSCAPES_TRAIN_IDS = _table({7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                               25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18})
# mmsegmentation coco_stuff164k.py clsID_to_trID: the 182 stuffthingmap ids less the 11 COCO thing ids
# no image uses, in order, onto 0..170.
_COCO_UNUSED_IDS = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
COCO_STUFF_TRAIN_IDS = _table({raw: train for train, raw in
                               enumerate(i for i in range(182) if i not in _COCO_UNUSED_IDS)})


@dataclass
class SegmentationSet:
    name: str
    image_paths: list[str]
    label_paths: list[str]
    class_names: list[list[str]]  # per class its names (synonyms), label order
    label_table: np.ndarray  # (256,) label file value -> class index, IGNORE_INDEX for unlabelled
    short_side: int  # resize target at a REFERENCE_CROP-px model input
    templates: list[str]


def _split_pairs(root: str, split_file: str, image_dir: str, label_dir: str, what: str) -> list[tuple[str, str]]:
    ids = read_required_lines(join(root, split_file), f"{what} split list")
    return [(join(root, image_dir, f"{i}.jpg"), join(root, label_dir, f"{i}.png")) for i in ids]


def _voc20_pairs(root: str) -> list[tuple[str, str]]:
    return _split_pairs(root, "ImageSets/Segmentation/val.txt", "JPEGImages", "SegmentationClass", "VOC2012")


def _context59_pairs(root: str) -> list[tuple[str, str]]:
    return _split_pairs(root, "ImageSets/SegmentationContext/val.txt", "JPEGImages", "SegmentationClassContext",
                        "PASCAL-Context (mmsegmentation layout)")


def _ade20k_pairs(root: str) -> list[tuple[str, str]]:
    images = list_dir(join(root, "images", "validation"), "ADE20K validation images")
    return [(image, join(root, "annotations", "validation", basename(image).rsplit(".", 1)[0] + ".png"))
            for image in images if image.lower().endswith(".jpg")]


def _cityscapes_pairs(root: str) -> list[tuple[str, str]]:
    pairs = []
    for city in list_dir(join(root, "gtFine", "val"), "Cityscapes gtFine/val", dirs=True):
        for label in list_dir(city, "Cityscapes gtFine city"):
            if label.endswith("_gtFine_labelIds.png"):
                stem = basename(label)[: -len("_gtFine_labelIds.png")]
                pairs.append((join(root, "leftImg8bit", "val", basename(city), f"{stem}_leftImg8bit.png"), label))
    return pairs


def _coco_stuff_pairs(root: str) -> list[tuple[str, str]]:
    labels = list_dir(join(root, "annotations", "val2017"), "COCO-Stuff stuffthingmaps val2017")
    # Converted maps (``*_labelTrainIds.png``) may lie beside the shipped ones; only ``<id>.png`` are read.
    return [(join(root, "images", "val2017", basename(label)[:-4] + ".jpg"), label)
            for label in labels if basename(label)[:-4].isdigit() and label.endswith(".png")]


BENCHMARKS = {  # format: (list image/label pairs, label table, SCLIP's short side at 224 px)
    "voc20": (_voc20_pairs, _reduce_zero_label(), 336),
    "context59": (_context59_pairs, _reduce_zero_label(), 336),
    "ade20k": (_ade20k_pairs, _reduce_zero_label(), 336),
    "cityscapes": (_cityscapes_pairs, CITYSCAPES_TRAIN_IDS, 560),
    "coco_stuff": (_coco_stuff_pairs, COCO_STUFF_TRAIN_IDS, 448),
}


def read_segmentation(config: EvalDatasetConfig) -> SegmentationSet:
    list_pairs, table, short_side = BENCHMARKS[config.format]
    pairs = list_pairs(config.path)[: config.max_images]
    if not pairs:
        raise ValueError(f"{config.path} holds no {config.format} validation images")
    return SegmentationSet(config.name, [p[0] for p in pairs], [p[1] for p in pairs],
                           SEGMENTATION_CLASSES[config.format], table, short_side,
                           list(config.templates or IMAGENET_TEMPLATES))


class DenseScorer(Protocol):
    image_size: int
    device: torch.device

    def encode_images(self, pixels: torch.Tensor) -> ImageFeatures: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...

    def patch_embeddings(self, images: ImageFeatures) -> torch.Tensor:
        """(I, P, D) per-patch embeddings in the text space, patches in row-major grid order."""


def resized_size(height: int, width: int, short_side: int, long_side: int, crop: int) -> tuple[int, int]:
    """mmcv's keep-ratio rescale to (long_side, short_side), rounded as mmcv rounds; never below `crop`
    on the short side, so every window is a full model input."""
    scale = max(min(long_side / max(height, width), short_side / min(height, width)), crop / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def load_segmentation_image(data: bytes, short_side: int, crop: int, mean, std) -> tuple[torch.Tensor, tuple[int, int]]:
    """((3, H', W') normalised pixels, the original (H, W)): resized as mmcv's Resize (bilinear on 8-bit
    pixels, no antialiasing) to `short_side` (given at REFERENCE_CROP, scaled to the model's `crop`)."""
    with Image.open(io.BytesIO(data)) as img:
        pixels = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
    scale = crop / REFERENCE_CROP
    size = resized_size(*pixels.shape[1:], round(short_side * scale), round(MAX_LONG_SIDE * scale), crop)
    resized = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
    normalised = (resized / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return normalised, tuple(pixels.shape[1:])


def window_origins(length: int, crop: int, stride: int) -> list[int]:
    """SCLIP's sliding-window starts along one side: every `stride`, the last one flush with the end."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]


def dense_logits(scorer: DenseScorer, pixels: torch.Tensor, queries: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """(Q, H', W') cosine of every pixel with every unit query (Q, D), from overlapping windows."""
    crop = scorer.image_size
    stride = crop // 2
    _, height, width = pixels.shape
    boxes = [(y, x) for y in window_origins(height, crop, stride) for x in window_origins(width, crop, stride)]
    logits = torch.zeros(len(queries), height, width, device=queries.device)
    count = torch.zeros(1, height, width, device=queries.device)
    for start in range(0, len(boxes), batch_size):
        batch = boxes[start:start + batch_size]
        windows = torch.stack([pixels[:, y:y + crop, x:x + crop] for y, x in batch])  # (n, 3, crop, crop)
        patches = F.normalize(scorer.patch_embeddings(scorer.encode_images(windows)).float(), dim=-1)  # (n, P, D)
        grid = math.isqrt(patches.shape[1])
        maps = (patches @ queries.T).transpose(1, 2).unflatten(2, (grid, grid))  # (n, Q, g, g)
        maps = F.interpolate(maps, size=(crop, crop), mode="bilinear", align_corners=False)
        for (y, x), window in zip(batch, maps):
            logits[:, y:y + crop, x:x + crop] += window
            count[:, y:y + crop, x:x + crop] += 1
    return logits / count


def query_embeddings(scorer: DenseScorer, data: SegmentationSet, *, batch_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit queries (Q, D), the class of each query (Q,)): every name of every class through the templates."""
    names = [(name, label) for label, synonyms in enumerate(data.class_names) for name in synonyms]
    prompts = [template.format(name) for name, _ in names for template in data.templates]
    embeddings = F.normalize(encode_text_set(scorer, prompts, batch_size=batch_size).float(), dim=-1)
    queries = F.normalize(embeddings.view(len(names), len(data.templates), -1).mean(1), dim=-1)  # (Q, D)
    return queries, torch.tensor([label for _, label in names], device=queries.device)


def _read_label(path: str, table: np.ndarray) -> torch.Tensor:
    """(H, W) class indices of a label map (one channel of 8-bit values; palette PNGs give their indices)."""
    with Image.open(io.BytesIO(read_bytes(path))) as img:
        values = np.asarray(img)
    if values.ndim != 2 or values.dtype != np.uint8:
        raise ValueError(f"{path}: a label map has one channel of 8-bit class values")
    return torch.from_numpy(table[values])


def evaluate_segmentation(scorer: DenseScorer, data: SegmentationSet, config: EvaluateConfig
                          ) -> tuple[dict[str, float], dict[str, int], Counter]:
    """``<set>/conditioned/mIoU`` and ``aAcc`` over the set, one image at a time (windows in batches
    of `image_batch_size`); an unreadable image or label is counted and skipped."""
    queries, query_class = query_embeddings(scorer, data, batch_size=config.text_batch_size)
    mean, std = getattr(scorer, "image_mean", CLIP_MEAN), getattr(scorer, "image_std", CLIP_STD)
    num_classes = len(data.class_names)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    failures, done = Counter(), 0
    for image_path, label_path in zip(data.image_paths, data.label_paths):
        try:
            pixels, size = load_segmentation_image(read_bytes(image_path), data.short_side, scorer.image_size,
                                                   mean, std)
            label = _read_label(label_path, data.label_table)
        except FileNotFoundError:
            failures["missing_file"] += 1
            continue
        except (OSError, ValueError, Image.DecompressionBombError):
            failures["decode_error"] += 1
            continue
        if size != tuple(label.shape):
            failures["label_size_differs"] += 1
            continue
        logits = dense_logits(scorer, pixels.to(scorer.device), queries, batch_size=config.image_batch_size)
        logits = F.interpolate(logits[None], size=label.shape, mode="bilinear", align_corners=False)[0]
        prediction = query_class[logits.argmax(0)]  # (H, W) class of the best query
        matrix += confusion(prediction, label.to(prediction.device), num_classes)
        done += 1
    if not done:
        raise ValueError(f"{data.name}: none of the {len(data.image_paths)} images could be read ({dict(failures)})")
    metrics = {f"{data.name}/conditioned/{k}": v for k, v in segmentation_scores(matrix).items()}
    return metrics, {f"{data.name}/images": done, f"{data.name}/classes": num_classes}, failures
