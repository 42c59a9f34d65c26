"""Fine-grained (DOCCI-FG, IIW-FG) and long-text (DCI, Urban1k) retrieval sets (paper sec. 4.4, table 1b/1c).

Read as FLAIR ships and reads them (FLAIR `datasets/EVAL_DATASETS.md` and `src/flair/data.py`
`read_docci_pairs`, `read_iiw_pairs(finegrained=True)`, `read_urban1k_pairs`, `read_dci_pairs`),
each into a `RetrievalSet` the retrieval evaluator scores like COCO (R@k both ways, I2T by an
image's best-ranked text):

- docci (DOCCI-FG): ``<path>/annotations/test_annotations.json`` (FLAIR's file), ``{"annotations":
  [{image_id, image, caption}]}`` with one sentence of a DOCCI description per entry; images in
  ``<path>/images`` (the 5k test images of DOCCI's ``docci_images.tar.gz``).
- iiw (IIW-FG): ``<path>/test_annotations.json`` (FLAIR's ``imageinwords/test_annotations.json``),
  same shape with ``caption_id``; image paths relative to ``<path>`` (``docci/``, ``docci_aar/``, ``dci/``).
- urban1k: ``<path>/annotations/annotations.json`` (FLAIR's), one long caption per image;
  images in ``<path>/images`` (Urban1k's images folder).
- dci: the ``densely_captioned_images`` directory of DCI's ``dci.tar.gz``: ``splits.json`` lists
  annotation files of ``annotations/``, each ``{image, short_caption, extra_caption}``; images in
  ``photos/``. As FLAIR (and Long-CLIP) do, every split is used (7,805 images) and an image's text is
  its short and extra captions split into sentences and rejoined with ". ".

Texts are kept whole: the tokenizer cuts them at the text tower's 77-token context, as the paper
does on purpose for DCI and Urban1k ("we deliberately maintain the standard CLIP context length").
`images` in the set's config overrides the image directory of every format.
"""

from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from storage import join
from tasks.config import EvalDatasetConfig
from tasks.evaluate.data import RetrievalSet, _clean, _grouped
from tasks.evaluate.sets.files import read_required_json

# Concurrent reads of DCI's 7,805 small annotation files (object stores answer each in tens of ms).
_ANNOTATION_READERS = 16


def split_caption(text: str) -> list[str]:
    """FLAIR's `split_caption`: sentences split on newlines, ``</s>`` and every full stop, stripped."""
    return [part.strip() for part in re.split(r"\n|</s>|[.]", text) if part.strip()]


def _flair_annotations(config: EvalDatasetConfig, annotation_file: str, image_dir: str, what: str) -> RetrievalSet:
    """FLAIR's unified ``{"annotations": [{image_id, image, caption}]}``: texts grouped by image_id."""
    data = read_required_json(annotation_file, what)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{what}: {annotation_file} holds no 'annotations' list")
    failures = Counter()
    path_of_id: dict[object, str] = {}
    captions: dict[str, list[str]] = {}
    for entry in data["annotations"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "image_id" not in entry:
            failures["bad_entry"] += 1
        elif (caption := _clean(entry.get("caption"))) is None:
            failures["empty_caption"] += 1
        else:
            # FLAIR maps texts to images by image_id; the first entry of an id names its file.
            path = path_of_id.setdefault(entry["image_id"], join(image_dir, entry["image"]))
            captions.setdefault(path, []).append(caption)
    return _grouped(config.name, captions, failures, config.max_images)


def read_docci(config: EvalDatasetConfig) -> RetrievalSet:
    return _flair_annotations(config, join(config.path, "annotations", "test_annotations.json"),
                              config.images or join(config.path, "images"),
                              "DOCCI-FG annotations (FLAIR's datasets/docci/annotations/test_annotations.json)")


def read_iiw(config: EvalDatasetConfig) -> RetrievalSet:
    return _flair_annotations(config, join(config.path, "test_annotations.json"), config.images or config.path,
                              "IIW-FG annotations (FLAIR's datasets/imageinwords/test_annotations.json)")


def read_urban1k(config: EvalDatasetConfig) -> RetrievalSet:
    return _flair_annotations(config, join(config.path, "annotations", "annotations.json"),
                              config.images or join(config.path, "images"),
                              "Urban1k annotations (FLAIR's datasets/Urban1k/annotations/annotations.json)")


def read_dci(config: EvalDatasetConfig) -> RetrievalSet:
    splits = read_required_json(join(config.path, "splits.json"), "DCI splits (densely_captioned_images/splits.json)")
    files = [name for split in splits.values() for name in split]  # FLAIR's order: the file's splits in turn
    image_dir = config.images or join(config.path, "photos")

    def load(name: str) -> dict | str:
        """The annotation, or why it cannot be used (one bad file skips one image)."""
        try:
            annotation = read_required_json(join(config.path, "annotations", name), "DCI annotation")
        except FileNotFoundError:
            return "missing_annotation"
        except ValueError:
            return "bad_annotation"
        return annotation if isinstance(annotation, dict) else "bad_annotation"

    with ThreadPoolExecutor(_ANNOTATION_READERS) as pool:
        annotations = list(pool.map(load, files))
    failures = Counter(a for a in annotations if isinstance(a, str))
    captions: dict[str, list[str]] = {}
    for annotation in annotations:
        if isinstance(annotation, str):
            continue
        sentences = split_caption(f"{annotation.get('short_caption', '')}\n{annotation.get('extra_caption', '')}")
        if not isinstance(annotation.get("image"), str) or not sentences:
            failures["bad_annotation"] += 1
            continue
        captions[join(image_dir, annotation["image"])] = [". ".join(sentences)]
    return _grouped(config.name, captions, failures, config.max_images)


READERS = {"docci": read_docci, "iiw": read_iiw, "urban1k": read_urban1k, "dci": read_dci}
