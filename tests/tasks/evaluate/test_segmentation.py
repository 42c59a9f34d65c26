"""Zero-shot segmentation: mIoU by hand, label tables, the windowing, and the five benchmarks read and scored."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.config import EvalDatasetConfig, EvaluateConfig
from tasks.evaluate.scoring import ImageFeatures
from tasks.evaluate.segmentation_metrics import confusion, segmentation_scores
from tasks.evaluate.sets.segmentation import (
    CITYSCAPES_TRAIN_IDS,
    COCO_STUFF_TRAIN_IDS,
    SEGMENTATION_CLASSES,
    dense_logits,
    evaluate_segmentation,
    read_segmentation,
    resized_size,
    window_origins,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def test_miou_by_hand():
    label = torch.tensor([[0, 0, 1, 1], [255, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 0]])
    matrix = confusion(pred, label, num_classes=4)
    # Class 0: TP 1, FN 1 (pred 1), FP 1 (the last pixel; the ignored one never counts) -> 1/3.
    # Class 1: TP 2, FP 1 -> 2/3. Class 2: TP 2, FN 1 -> 2/3. Class 3 never occurs: left out.
    scores = segmentation_scores(matrix)
    assert scores["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert scores["aAcc"] == pytest.approx(5 / 7)


def test_label_tables():
    assert CITYSCAPES_TRAIN_IDS[[0, 7, 8, 9, 11, 26, 33, 255]].tolist() == [255, 0, 1, 255, 2, 13, 18, 255]
    # COCO-Stuff's 182 map ids lose the 11 unused thing ids: 10 -> 10, 11 unused, 12 -> 11, 181 -> 170.
    assert COCO_STUFF_TRAIN_IDS[[0, 10, 11, 12, 90, 91, 181, 255]].tolist() == [0, 10, 255, 11, 255, 80, 170, 255]
    assert sorted(set(COCO_STUFF_TRAIN_IDS.tolist()) - {255}) == list(range(171))
    assert {k: len(v) for k, v in SEGMENTATION_CLASSES.items()} == {
        "voc20": 20, "cityscapes": 19, "context59": 59, "ade20k": 150, "coco_stuff": 171}


def test_resize_and_windows_follow_mmcv_and_sclip():
    # 500 x 375 (w x h) to a short side of 336: x 0.896 -> 336 x 448 (mmcv rounds with int(x + 0.5)).
    assert resized_size(375, 500, 336, 2048, 224) == (336, 448)
    assert resized_size(100, 3000, 336, 2048, 224) == (224, 6720)  # never below one window
    assert window_origins(448, 224, 112) == [0, 112, 224]
    assert window_origins(450, 224, 112) == [0, 112, 224, 226]  # the last one flush with the end
    assert window_origins(224, 224, 112) == [0]


class ColourScorer:
    """A patch is the mean of its (normalised) pixels in RGB; the first three class names of the set
    are the unit red, green and blue axes, every other name the zero vector: a uniformly coloured
    window is every one of its patches the class of its colour."""

    device = torch.device("cpu")

    def __init__(self, names: list[str], image_size: int = 8, patch: int = 4):
        self.axes = {name: torch.eye(3)[i] for i, name in enumerate(names)}
        self.image_size, self.patch = image_size, patch
        self.windows = 0

    def encode_images(self, pixels):
        self.windows += len(pixels)
        patches = torch.nn.functional.avg_pool2d(pixels, self.patch).flatten(2).transpose(1, 2)  # (n, P, 3)
        return ImageFeatures(patches.mean(1), patches)

    def encode_texts(self, texts):
        return torch.stack([self.axes.get(t, torch.zeros(3)) for t in texts])

    def patch_embeddings(self, images):
        return images.patches


def test_dense_logits_average_overlapping_windows():
    # A uniform image: every window gives every pixel the same cosines with the three axes, so the
    # overlap average must give exactly them again (a pixel counted twice, not divided, would double).
    scorer = ColourScorer(["red", "green", "blue"])
    colour = torch.tensor([1.0, -2.0, 0.5])
    logits = dense_logits(scorer, colour[:, None, None].expand(3, 12, 20).clone(), torch.eye(3), batch_size=4)
    expected = colour / colour.norm()  # the cosine with each unit axis
    assert logits.shape == (3, 12, 20)
    assert torch.allclose(logits, expected[:, None, None].expand(3, 12, 20), atol=1e-6)
    assert scorer.windows == len(window_origins(12, 8, 4)) * len(window_origins(20, 8, 4))


# The same two 8 x 12 images in each benchmark's own format. Image A is red; its label: the left
# half the benchmark's class 0, the right half class 1, the top row ignored and one pixel of a value
# that is no class. Image B is blue, all class 2. RAW[fmt] = (class 0, 1, 2, ignored, not a class).
RAW = {"voc20": (1, 2, 3, 255, 0), "context59": (1, 2, 3, 0, 0), "ade20k": (1, 2, 3, 0, 0),
       "cityscapes": (7, 8, 11, 0, 9), "coco_stuff": (0, 1, 2, 255, 11)}


def _labels(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    c0, c1, c2, ignored, other = RAW[fmt]
    a = np.full((8, 12), c0, dtype=np.uint8)
    a[:, 6:] = c1
    a[0] = ignored
    a[1, 0] = other
    return a, np.full((8, 12), c2, dtype=np.uint8)


def _write(fmt: str, root) -> str:
    """The two images and labels where `fmt` keeps them; returns the directory its config names."""
    (label_a, label_b), images = _labels(fmt), [Image.new("RGB", (12, 8), RED), Image.new("RGB", (12, 8), BLUE)]
    if fmt in ("voc20", "context59"):
        split, label_dir = (("ImageSets/Segmentation/val.txt", "SegmentationClass") if fmt == "voc20" else
                            ("ImageSets/SegmentationContext/val.txt", "SegmentationClassContext"))
        files = [(f"JPEGImages/2007_{i}.jpg", f"{label_dir}/2007_{i}.png") for i in ("a", "b")]
        (root / split).parent.mkdir(parents=True)
        (root / split).write_text("2007_a\n2007_b\n")
    elif fmt == "ade20k":
        files = [(f"images/validation/ADE_val_{i}.jpg", f"annotations/validation/ADE_val_{i}.png") for i in "ab"]
    elif fmt == "cityscapes":
        files = [(f"leftImg8bit/val/{c}/{c}_000000_{i}_leftImg8bit.png", f"gtFine/val/{c}/{c}_000000_{i}_gtFine_labelIds.png")
                 for c, i in (("frankfurt", "000294"), ("lindau", "000001"))]
    else:
        files = [(f"images/val2017/00000000013{i}.jpg", f"annotations/val2017/00000000013{i}.png") for i in (9, 8)]
    for (image_file, label_file), image, label in zip(files, images, [label_a, label_b]):
        for file in (image_file, label_file):
            (root / file).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / image_file, quality=100)
        png = Image.fromarray(label)
        if fmt == "voc20":  # VOC's masks are palette PNGs
            png = png.convert("P")
        png.save(root / label_file)
    if fmt == "coco_stuff":  # a converted map beside the shipped one is not read twice
        Image.fromarray(label_b).save(root / "annotations/val2017/000000000138_labelTrainIds.png")
    return str(root)


@pytest.mark.parametrize("fmt", list(RAW))
def test_each_benchmark_read_and_scored_by_hand(fmt, tmp_path):
    path = _write(fmt, tmp_path)
    data = read_segmentation(EvalDatasetConfig(name=fmt, format=fmt, path=path, templates=["{}"]))
    assert len(data.image_paths) == 2 and len(data.templates) == 1
    assert len(read_segmentation(EvalDatasetConfig(name=fmt, format=fmt, path=path)).templates) == 80
    names = [synonyms[0] for synonyms in data.class_names[:3]]
    metrics, counts, failures = evaluate_segmentation(ColourScorer(names), data, EvaluateConfig(image_batch_size=3))
    # Image A is predicted class 0 everywhere. Its labelled pixels: 7 rows x 12 less the one pixel that
    # is no class = 83, of them 41 class 0 and 42 class 1. Image B: 96 pixels of class 2, all right.
    # IoU0 = 41 / (41 + 42), IoU1 = 0, IoU2 = 1; the other classes never occur.
    assert metrics[f"{fmt}/conditioned/mIoU"] == pytest.approx((41 / 83 + 0 + 1) / 3)
    assert metrics[f"{fmt}/conditioned/aAcc"] == pytest.approx((41 + 96) / (83 + 96))
    assert counts == {f"{fmt}/images": 2, f"{fmt}/classes": len(SEGMENTATION_CLASSES[fmt])} and not failures


def test_a_missing_split_file_is_named_and_a_missing_image_counted(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VOC2012 split list: no file at .*ImageSets/Segmentation/val.txt"):
        read_segmentation(EvalDatasetConfig(name="v", format="voc20", path=str(tmp_path)))
    path = _write("voc20", tmp_path)
    (tmp_path / "JPEGImages/2007_b.jpg").unlink()
    data = read_segmentation(EvalDatasetConfig(name="v", format="voc20", path=path, templates=["{}"]))
    metrics, counts, failures = evaluate_segmentation(ColourScorer(["aeroplane", "bicycle", "bird"]), data,
                                                      EvaluateConfig())
    assert failures == {"missing_file": 1} and counts["v/images"] == 1
    assert metrics["v/conditioned/mIoU"] == pytest.approx((41 / 83 + 0) / 2)
    assert not math.isnan(metrics["v/conditioned/aAcc"])
