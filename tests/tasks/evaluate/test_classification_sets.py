"""The paper's 10 classification datasets, each read from a tiny copy of its own layout, and scored."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from tasks.config import EvalDatasetConfig, EvaluateConfig
from tasks.evaluate.scoring import ImageFeatures
from tasks.evaluate.data import even_spread
from tasks.evaluate.sets.classification import READERS, ZERO_SHOT
from tasks.evaluate.stage import evaluate_classification


def _read(fmt: str, path, **extra):
    return READERS[fmt](EvalDatasetConfig(name=fmt, format=fmt, path=str(path), **extra))


def _names(data) -> list[str]:
    return [data.class_names[label] for label in data.labels]


def test_class_names_and_templates_are_clip_s():
    assert {k: len(v["classes"]) for k, v in ZERO_SHOT.items()} == {
        "food101": 101, "cifar10": 10, "cifar100": 100, "sun397": 397, "cars": 196, "aircraft": 100, "dtd": 47,
        "pets": 37, "flowers102": 102, "imagenet": 1000}
    assert {k: len(v["templates"]) for k, v in ZERO_SHOT.items()} == {
        "food101": 1, "cifar10": 18, "cifar100": 18, "sun397": 2, "cars": 8, "aircraft": 2, "dtd": 8, "pets": 1,
        "flowers102": 1, "imagenet": 80}
    assert ZERO_SHOT["food101"]["templates"] == ["a photo of {}, a type of food."]
    # Pets in class-id order (case-insensitive, cats and dogs mixed), as test.txt numbers them.
    assert ZERO_SHOT["pets"]["classes"][:3] == ["Abyssinian", "american bulldog", "american pit bull terrier"]


def test_food101(tmp_path):
    (tmp_path / "meta").mkdir()
    classes = [name.replace(" ", "_") for name in ZERO_SHOT["food101"]["classes"]]  # meta/classes.txt
    (tmp_path / "meta/classes.txt").write_text("\n".join(classes[:-1]) + "\n")
    (tmp_path / "meta/test.txt").write_text("baklava/1006121\napple_pie/1011328\nsushi/1\nnot_a_food/2\n")
    with pytest.raises(ValueError, match="100 classes, not 101"):
        _read("food101", tmp_path)
    (tmp_path / "meta/classes.txt").write_text("\n".join(classes) + "\n")
    data = _read("food101", tmp_path)
    assert data.image_paths == [str(tmp_path / "images/baklava/1006121.jpg"), str(tmp_path / "images/apple_pie/1011328.jpg"),
                                str(tmp_path / "images/sushi/1.jpg")]
    assert _names(data) == ["baklava", "apple pie", "sushi"] and data.failures == {"unknown_class": 1}


@pytest.mark.parametrize("fmt, folder, file, key", [("cifar10", "cifar-10-batches-py", "test_batch", b"labels"),
                                                    ("cifar100", "cifar-100-python", "test", b"fine_labels")])
def test_cifar_batches(fmt, folder, file, key, tmp_path):
    pixels = np.zeros((3, 3, 32, 32), dtype=np.uint8)  # (N, C, H, W) as CIFAR stores rows of 3072
    pixels[0, 0], pixels[1, 1], pixels[2, 2] = 255, 255, 255  # red, green, blue
    (tmp_path / folder).mkdir()
    with open(tmp_path / folder / file, "wb") as f:
        pickle.dump({b"data": pixels.reshape(3, -1), key: [2, 9, 0], b"batch_label": b"testing batch 1 of 1"}, f,
                    protocol=2)
    data = _read(fmt, tmp_path / folder)
    assert data.labels == [2, 9, 0]
    decoded = [np.asarray(Image.open(io.BytesIO(image))) for image in data.image_paths]
    assert [tuple(d[5, 5]) for d in decoded] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert _read(fmt, tmp_path / folder, max_images=2).labels == [2, 0]  # round-robin from the lowest class


def test_cifar_unpickles_arrays_only(tmp_path):
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Image.new("RGB", (1, 1)), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="no place in a CIFAR batch"):
        _read("cifar10", tmp_path)


def test_sun397_test_partition(tmp_path):
    (tmp_path / "Partitions").mkdir()
    # ClassName.txt: 397 sorted class paths (the first few as SUN397 names them, the rest stand-ins).
    paths = ["/a/abbey", "/a/airplane_cabin", "/a/airport_terminal"] + [f"/z/class_{i:03d}" for i in range(3, 397)]
    (tmp_path / "ClassName.txt").write_text("\n".join(paths) + "\n")
    (tmp_path / "Partitions/Testing_01.txt").write_text("/a/airport_terminal/sun_x.jpg\n/a/abbey/sun_y.jpg\n"
                                                        "/z/class_396/sun_z.jpg\n")
    data = _read("sun397", tmp_path)
    assert data.image_paths[:2] == [str(tmp_path / "a/airport_terminal/sun_x.jpg"), str(tmp_path / "a/abbey/sun_y.jpg")]
    assert data.labels == [2, 0, 396] and _names(data) == ["airport terminal", "abbey", "youth hostel"]


def test_stanford_cars_mat_files(tmp_path):
    record = np.dtype([("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"),
                       ("fname", "O")])
    annotations = np.array([(1, 2, 3, 4, 196, "00001.jpg"), (1, 2, 3, 4, 1, "00002.jpg")], dtype=record)
    scipy.io.savemat(tmp_path / "cars_test_annos_withlabels.mat", {"annotations": annotations})
    data = _read("cars", tmp_path)
    assert data.image_paths == [str(tmp_path / "cars_test/00001.jpg"), str(tmp_path / "cars_test/00002.jpg")]
    assert _names(data) == ["smart fortwo Convertible 2012", "AM General Hummer SUV 2000"]


def test_fgvc_aircraft_variants(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/variants.txt").write_text("\n".join(ZERO_SHOT["aircraft"]["classes"]) + "\n")
    (tmp_path / "data/images_variant_test.txt").write_text("1514522 Cessna 172\n0056978 707-320\nbroken\n")
    data = _read("aircraft", tmp_path)
    assert data.image_paths == [str(tmp_path / "data/images/1514522.jpg"), str(tmp_path / "data/images/0056978.jpg")]
    assert _names(data) == ["Cessna 172", "707-320"] and data.failures == {"unknown_class": 1}


def test_dtd_partition_1(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels/test1.txt").write_text("zigzagged/zigzagged_0133.jpg\nbanded/banded_0004.jpg\n")
    data = _read("dtd", tmp_path)
    assert data.image_paths[1] == str(tmp_path / "images/banded/banded_0004.jpg")
    assert data.labels == [46, 0] and data.templates[0] == "a photo of a {} texture."


def test_oxford_pets_class_ids(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/test.txt").write_text("Abyssinian_201 1 1 1\namerican_bulldog_100 2 2 1\n"
                                                   "yorkshire_terrier_9 37 2 25\n")
    data = _read("pets", tmp_path)
    assert data.image_paths[0] == str(tmp_path / "images/Abyssinian_201.jpg")
    assert _names(data) == ["Abyssinian", "american bulldog", "yorkshire terrier"]


def test_flowers102_mat_files(tmp_path):
    scipy.io.savemat(tmp_path / "imagelabels.mat", {"labels": np.array([[77, 1, 102, 5]])})
    scipy.io.savemat(tmp_path / "setid.mat", {"tstid": np.array([[3, 1]]), "trnid": np.array([[2]]),
                                              "valid": np.array([[4]])})
    data = _read("flowers102", tmp_path)
    assert data.image_paths == [str(tmp_path / "jpg/image_00003.jpg"), str(tmp_path / "jpg/image_00001.jpg")]
    assert _names(data) == ["blackberry lily", "passion flower"]


def test_imagenet_folders_or_flat_files(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    for wnid in wnids:
        (tmp_path / "folders" / wnid).mkdir(parents=True)
        (tmp_path / "folders" / wnid / f"ILSVRC2012_val_{wnid}.JPEG").write_bytes(b"")
    (tmp_path / "flat").mkdir()
    for i, wnid in enumerate(reversed(wnids)):
        (tmp_path / "flat" / f"ILSVRC2012_val_{i:08d}_{wnid}.JPEG").write_bytes(b"")
    folders, flat = _read("imagenet", tmp_path / "folders"), _read("imagenet", tmp_path / "flat")
    assert folders.labels == list(range(1000)) and folders.class_names[0] == "tench"
    assert flat.labels == list(range(999, -1, -1))  # files sorted by name: the last wnid first
    assert _read("imagenet", tmp_path / "flat", max_images=3).labels == [2, 1, 0]  # one image from each of 3 classes
    (tmp_path / "flat" / f"ILSVRC2012_val_00000000_{wnids[-1]}.JPEG").unlink()
    with pytest.raises(ValueError, match="all 1000 classes"):
        _read("imagenet", tmp_path / "flat")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Oxford-IIIT Pets test list: no file at .*annotations/test.txt"):
        _read("pets", tmp_path)
    with pytest.raises(FileNotFoundError, match="ImageNet validation images: no directory"):
        _read("imagenet", tmp_path / "val")


def test_even_spread_keeps_every_class():
    assert even_spread([0, 0, 0, 1, 1, 2], 3) == [0, 3, 5]
    assert even_spread([0, 1], None) == [0, 1]


class ColourScorer:
    """Images are their mean normalised colour; a prompt is the colour axis of the class it names."""

    image_size, device = 8, torch.device("cpu")

    def __init__(self, axis_of_class: dict[str, int]):
        self.axis_of_class = axis_of_class

    def encode_images(self, pixels):
        colour = pixels.mean((2, 3))  # (n, 3)
        return ImageFeatures(colour, colour[:, None])

    def encode_texts(self, texts):
        return torch.stack([torch.eye(3)[next(a for c, a in self.axis_of_class.items() if c in t)] for t in texts])

    def score(self, texts, images, mode):
        assert mode == "agnostic"
        return torch.nn.functional.normalize(texts, dim=-1) @ torch.nn.functional.normalize(images.global_, dim=-1).T


def test_pets_top1_end_to_end(tmp_path):
    # Three cats in red, green, blue; the Bengal is drawn blue, the colour of Birman: top-1 = 2/3.
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/test.txt").write_text("Abyssinian_1 1 1 1\nBengal_2 6 1 2\nBirman_3 7 1 3\n")
    (tmp_path / "images").mkdir()
    for name, colour in [("Abyssinian_1", (255, 0, 0)), ("Bengal_2", (0, 0, 255)), ("Birman_3", (0, 0, 255))]:
        Image.new("RGB", (12, 10), colour).save(tmp_path / "images" / f"{name}.jpg")
    scorer = ColourScorer({"Abyssinian": 0, "Bengal": 1, "Birman": 2, "": 1})  # "": every other breed, green
    metrics, counts, failures = evaluate_classification(scorer, _read("pets", tmp_path), EvaluateConfig())
    assert metrics["pets/agnostic/top1"] == pytest.approx(2 / 3)
    assert metrics["pets/chance/top1"] == pytest.approx(1 / 37)
    assert counts == {"pets/images": 3, "pets/classes": 37} and not failures
