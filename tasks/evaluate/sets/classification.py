"""Zero-shot classification on the paper's 10 datasets (paper sec. 4.7, table 4).

Food-101, CIFAR-10, CIFAR-100, SUN397, Stanford Cars, FGVC-Aircraft, DTD, Oxford-IIIT Pets,
Flowers-102 and ImageNet, each read from its test split in the layout its archive unpacks to (the
layout torchvision's dataset classes read, which COSMOS, the paper's 30M comparison, evaluates
with). Class names and templates are CLIP's (zero_shot_classes.json: openai/CLIP data/prompts.md,
ImageNet's from open_clip `zero_shot_metadata.py`), in each dataset's label order; `templates` in
the set's config replaces the templates. Scored text-agnostically, top-1/top-5 accuracy.

- food101: ``food-101/``: ``meta/classes.txt``, ``meta/test.txt`` (``<class>/<id>``), ``images/<class>/<id>.jpg``.
- cifar10 / cifar100: ``cifar-10-batches-py/test_batch`` / ``cifar-100-python/test`` (the python
  pickles; only numpy arrays are unpickled) and ``labels`` / ``fine_labels``.
- sun397: ``SUN397/`` with ``ClassName.txt`` and ``Partitions/Testing_01.txt`` (Partitions.zip
  unpacked inside it): CLIP's test partition 1, 50 images per class. (COSMOS's torchvision split is a
  random one seeded with Python's per-process string hash, so it cannot be reproduced.)
- cars: ``stanford_cars/``: ``devkit/cars_meta.mat``, ``cars_test_annos_withlabels.mat``, ``cars_test/``.
- aircraft: ``fgvc-aircraft-2013b/``: ``data/variants.txt``, ``data/images_variant_test.txt``, ``data/images/``.
- dtd: ``dtd/`` with ``images/<class>/`` and ``labels/test1.txt`` (partition 1, as torchvision).
- pets: ``oxford-iiit-pet/``: ``annotations/test.txt`` (``<image> <class id> ...``), ``images/``.
- flowers102: ``flowers-102/``: ``imagelabels.mat``, ``setid.mat`` (``tstid``), ``jpg/image_NNNNN.jpg``.
- imagenet: the 50,000 validation images, either in one folder per wnid (``n01440764/...``) or
  flat as Hugging Face's ``val_images.tar.gz`` names them (``..._n01440764.JPEG``); the class index
  is the wnid's rank among the 1,000.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from storage import join
from tasks.config import EvalDatasetConfig
from tasks.evaluate.data import IMAGE_SUFFIXES, ClassificationSet, even_spread
from tasks.evaluate.sets.files import basename, list_dir, read_required, read_required_lines

ZERO_SHOT = json.loads((Path(__file__).parent / "zero_shot_classes.json").read_text())["datasets"]
IMAGENET_WNID = re.compile(r"(n\d{8})\.jpe?g$", re.IGNORECASE)


def _classification_set(config: EvalDatasetConfig, entries: list[tuple[str | bytes, int | None]]) -> ClassificationSet:
    """The set of (image, label) entries; a label that is no class of the dataset (None or out of
    range) is counted and its image skipped."""
    meta = ZERO_SHOT[config.format]
    known = [(image, label) for image, label in entries if label is not None and 0 <= label < len(meta["classes"])]
    keep = even_spread([label for _, label in known], config.max_images)
    failures = Counter({"unknown_class": len(entries) - len(known)} if len(known) < len(entries) else {})
    return ClassificationSet(config.name, [known[i][0] for i in keep], [known[i][1] for i in keep], meta["classes"],
                             list(config.templates or meta["templates"]), failures)


def _class_index(config: EvalDatasetConfig, url: str, what: str) -> dict[str, int]:
    """The dataset's own class list (one per line) -> label: CLIP's names are in that list's order,
    so it must be the whole list."""
    classes = read_required_lines(url, what)
    if len(classes) != len(ZERO_SHOT[config.format]["classes"]):
        raise ValueError(f"{url}: {what} has {len(classes)} classes, not {len(ZERO_SHOT[config.format]['classes'])}")
    return {name: i for i, name in enumerate(classes)}


def read_food101(config: EvalDatasetConfig) -> ClassificationSet:
    index = _class_index(config, join(config.path, "meta", "classes.txt"), "Food-101 class list")
    entries = read_required_lines(join(config.path, "meta", "test.txt"), "Food-101 test list")
    return _classification_set(config, [(join(config.path, "images", f"{e}.jpg"), index.get(e.split("/", 1)[0]))
                                        for e in entries])


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's python batches hold dicts of bytes, lists and numpy arrays: nothing else may be built."""

    # numpy's array reconstruction, and bytes as protocol 2 writes them from Python 3 (_codecs.encode).
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a CIFAR batch")
        return super().find_class(module, name)


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _read_cifar(config: EvalDatasetConfig, file_name: str, label_key: bytes) -> ClassificationSet:
    raw = read_required(join(config.path, file_name), f"{config.format} test batch")
    batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    labels = [int(label) for label in batch[label_key]]
    keep = even_spread(labels, config.max_images)  # before encoding: only the kept images become PNGs
    # In-memory images travel as PNG bytes, which the image loader decodes like a file's.
    return _classification_set(config.model_copy(update={"max_images": None}),
                               [(_png(pixels[i]), labels[i]) for i in keep])


def read_cifar10(config: EvalDatasetConfig) -> ClassificationSet:
    return _read_cifar(config, "test_batch", b"labels")


def read_cifar100(config: EvalDatasetConfig) -> ClassificationSet:
    return _read_cifar(config, "test", b"fine_labels")


def read_sun397(config: EvalDatasetConfig) -> ClassificationSet:
    index = _class_index(config, join(config.path, "ClassName.txt"), "SUN397 class list")
    entries = read_required_lines(join(config.path, "Partitions", "Testing_01.txt"), "SUN397 test partition")
    return _classification_set(config, [(join(config.path, e), index.get(e.rsplit("/", 1)[0])) for e in entries])


def _mat(url: str, what: str) -> dict:
    return scipy.io.loadmat(io.BytesIO(read_required(url, what)), squeeze_me=True)


def read_cars(config: EvalDatasetConfig) -> ClassificationSet:
    annotations = _mat(join(config.path, "cars_test_annos_withlabels.mat"), "Stanford Cars test labels")["annotations"]
    # Class ids 1..196, in cars_meta.mat's order.
    return _classification_set(config, [(join(config.path, "cars_test", str(a["fname"])), int(a["class"]) - 1)
                                        for a in annotations])


def read_aircraft(config: EvalDatasetConfig) -> ClassificationSet:
    index = _class_index(config, join(config.path, "data", "variants.txt"), "FGVC-Aircraft variant list")
    entries = [(line.split(" ", 1) + [""])[:2] for line in read_required_lines(
        join(config.path, "data", "images_variant_test.txt"), "FGVC-Aircraft test list")]
    return _classification_set(config, [(join(config.path, "data", "images", f"{image}.jpg"), index.get(variant))
                                        for image, variant in entries])


def read_dtd(config: EvalDatasetConfig) -> ClassificationSet:
    index = {name: i for i, name in enumerate(ZERO_SHOT["dtd"]["classes"])}  # DTD's folder names, sorted
    entries = read_required_lines(join(config.path, "labels", "test1.txt"), "DTD test partition 1")
    return _classification_set(config, [(join(config.path, "images", e), index.get(e.split("/", 1)[0]))
                                        for e in entries])


def read_pets(config: EvalDatasetConfig) -> ClassificationSet:
    entries = [line.split() for line in read_required_lines(join(config.path, "annotations", "test.txt"),
                                                            "Oxford-IIIT Pets test list")]
    return _classification_set(config, [(join(config.path, "images", f"{e[0]}.jpg"),
                                         int(e[1]) - 1 if len(e) > 1 and e[1].isdigit() else None)
                                        for e in entries])  # class ids 1..37


def read_flowers102(config: EvalDatasetConfig) -> ClassificationSet:
    labels = _mat(join(config.path, "imagelabels.mat"), "Flowers-102 labels")["labels"]
    test_ids = _mat(join(config.path, "setid.mat"), "Flowers-102 splits")["tstid"]
    # Image ids and labels count from 1.
    return _classification_set(config, [(join(config.path, "jpg", f"image_{int(i):05d}.jpg"),
                                         int(labels[int(i) - 1]) - 1) for i in test_ids])


def read_imagenet(config: EvalDatasetConfig) -> ClassificationSet:
    folders = list_dir(config.path, "ImageNet validation images", dirs=True)
    if folders:
        files = [(basename(folder), path) for folder in folders for path in list_dir(folder, "ImageNet class folder")
                 if path.lower().endswith(IMAGE_SUFFIXES)]
    else:
        files = [(match.group(1), path) for path in list_dir(config.path, "ImageNet validation images")
                 if (match := IMAGENET_WNID.search(basename(path)))]
    wnids = sorted({wnid for wnid, _ in files})
    if len(wnids) != len(ZERO_SHOT["imagenet"]["classes"]):
        raise ValueError(f"{config.path}: ImageNet validation needs images of all 1000 classes (the class index is "
                         f"the wnid's rank), found {len(wnids)}")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    return _classification_set(config, [(path, index[wnid]) for wnid, path in files])


READERS = {"food101": read_food101, "cifar10": read_cifar10, "cifar100": read_cifar100, "sun397": read_sun397,
           "cars": read_cars, "aircraft": read_aircraft, "dtd": read_dtd, "pets": read_pets,
           "flowers102": read_flowers102, "imagenet": read_imagenet}
