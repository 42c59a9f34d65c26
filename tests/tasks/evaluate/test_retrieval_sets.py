"""DOCCI-FG, IIW-FG, Urban1k and DCI read from FLAIR's files and DCI's layout, then scored end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.config import EvalDatasetConfig, EvaluateConfig
from tasks.evaluate.sets.retrieval_sets import READERS, split_caption
from tasks.evaluate.stage import evaluate_retrieval
from tests.tasks.evaluate.images import OneHotScorer, write_images


@pytest.fixture(scope="module")
def clip_tokenizer():
    """CLIP's BPE (tests/assets), to show what the text tower sees of a long caption."""
    from tasks.demo.standin_models import clip_tokenizer_from_bpe_file

    return clip_tokenizer_from_bpe_file(Path(__file__).resolve().parents[2] / "assets/bpe_simple_vocab_16e6.txt.gz")


def _read(fmt: str, path, **extra):
    return READERS[fmt](EvalDatasetConfig(name=fmt, format=fmt, path=str(path), **extra))


def test_docci_fg_one_sentence_per_text(tmp_path):
    # FLAIR's datasets/docci layout: annotations/test_annotations.json, images/.
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/test_annotations.json").write_text(json.dumps({"annotations": [
        {"image_id": 0, "image": "test_01427.jpg", "caption": "A red mug sits on a desk"},
        {"image_id": 0, "image": "test_01427.jpg", "caption": "The desk is oak"},
        {"image_id": 1, "image": "test_01428.jpg", "caption": "A blue kite in the sky"},
        {"image_id": 1, "image": "test_01428.jpg", "caption": "   "},
        {"image": "no_id.jpg", "caption": "no image id"},
    ]}))
    docci = _read("docci", tmp_path)
    assert docci.image_paths == [str(tmp_path / "images/test_01427.jpg"), str(tmp_path / "images/test_01428.jpg")]
    assert list(zip(docci.texts, docci.text_image)) == [
        ("A red mug sits on a desk", 0), ("The desk is oak", 0), ("A blue kite in the sky", 1)]
    assert docci.failures == {"empty_caption": 1, "bad_entry": 1}
    assert _read("docci", tmp_path, images="/elsewhere").image_paths[0] == "/elsewhere/test_01427.jpg"


def test_iiw_fg_paths_are_relative_to_its_root(tmp_path):
    (tmp_path / "test_annotations.json").write_text(json.dumps({"annotations": [
        {"image_id": 0, "image": "docci/test_00731.jpg", "caption": "A white toilet", "caption_id": 0},
        {"image_id": 1, "image": "dci/sa_1552113.jpg", "caption": "Three steps", "caption_id": 1},
        {"image_id": 0, "image": "docci/test_00731.jpg", "caption": "Two rolls of paper", "caption_id": 2},
    ]}))
    iiw = _read("iiw", tmp_path)
    assert iiw.image_paths == [str(tmp_path / "docci/test_00731.jpg"), str(tmp_path / "dci/sa_1552113.jpg")]
    assert iiw.text_image == [0, 0, 1] and iiw.texts[1] == "Two rolls of paper"


def test_urban1k_and_a_missing_annotation_file_is_named(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/annotations.json").write_text(json.dumps({"annotations": [
        {"image_id": 0, "image": "1.jpg", "caption": "A lively outdoor cafe. " * 20},
        {"image_id": 1, "image": "10.jpg", "caption": "A green bus at a station."},
    ]}))
    urban = _read("urban1k", tmp_path)
    assert urban.image_paths == [str(tmp_path / "images/1.jpg"), str(tmp_path / "images/10.jpg")]
    assert urban.texts[0] == ("A lively outdoor cafe. " * 20).strip()  # long captions are kept whole
    with pytest.raises(FileNotFoundError, match=r"Urban1k annotations .*no file at .*elsewhere/annotations/annotations.json"):
        _read("urban1k", tmp_path / "elsewhere")


def test_dci_joins_short_and_extra_captions_over_every_split(tmp_path, clip_tokenizer):
    from model import tokenize

    root = tmp_path / "densely_captioned_images"
    (root / "annotations").mkdir(parents=True)
    (root / "splits.json").write_text(json.dumps({"train": ["1-data.json", "2-data.json"], "valid": ["3-data.json"],
                                                  "test": ["4-data.json", "gone-data.json"]}))
    long_extra = "The car is red. " * 30  # about 150 tokens: beyond the 77-token context
    for name, image, short, extra in [("1", "sa_1.jpg", "A street", "Cars park.\nA dog sits"),
                                      ("3", "sa_3.jpg", "A kitchen.", "It has a stove</s>and a sink."),
                                      ("4", "sa_4.jpg", "A car", long_extra)]:
        (root / f"annotations/{name}-data.json").write_text(
            json.dumps({"image": image, "short_caption": short, "extra_caption": extra}))
    (root / "annotations/2-data.json").write_text("{not json")
    dci = _read("dci", root)
    assert dci.image_paths == [str(root / f"photos/sa_{i}.jpg") for i in (1, 3, 4)]
    # FLAIR's read_dci_pairs: split on newlines, </s> and full stops, rejoined with ". ".
    assert dci.texts[:2] == ["A street. Cars park. A dog sits", "A kitchen. It has a stove. and a sink"]
    assert dci.failures == {"bad_annotation": 1, "missing_annotation": 1}
    assert split_caption("a.b\nc</s>d. ") == ["a", "b", "c", "d"]
    # The whole caption is kept; the tokenizer cuts it at the 77-token context, keeping the EOS.
    ids = tokenize(clip_tokenizer, [dci.texts[2]], context_length=77)[0]
    assert ids.shape == (77,) and ids[-1] == clip_tokenizer.eos_token_id and ids[0] == clip_tokenizer.bos_token_id


def test_docci_fg_recall_end_to_end(tmp_path):
    # 3 images, 2 sentences each; sentence "c2" is scored as if it described image 0.
    write_images(tmp_path / "images", ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "annotations").mkdir()
    sentences = [("a.jpg", 0, "a1"), ("a.jpg", 0, "a2"), ("b.jpg", 1, "b1"), ("b.jpg", 1, "b2"),
                 ("c.jpg", 2, "c1"), ("c.jpg", 2, "c2")]
    (tmp_path / "annotations/test_annotations.json").write_text(json.dumps({"annotations": [
        {"image_id": i, "image": image, "caption": text} for image, i, text in sentences]}))
    scorer = OneHotScorer(3, {"a1": 0, "a2": 0, "b1": 1, "b2": 1, "c1": 2, "c2": 0})
    metrics, counts, failures = evaluate_retrieval(scorer, _read("docci", tmp_path), EvaluateConfig(rerank_top_k=2))
    # T2I: 5 of 6 sentences rank their image first. I2T: image 0's column has a1, a2 and c2 tied at 1,
    # and ties count against the model (c2 is not its caption): rank 1. Images 1, 2 rank first.
    for mode in ("conditioned", "agnostic", "rerank_top2"):
        assert metrics[f"docci/{mode}/t2i_R@1"] == pytest.approx(5 / 6)
        assert metrics[f"docci/{mode}/i2t_R@1"] == pytest.approx(2 / 3)
        assert metrics[f"docci/{mode}/i2t_R@5"] == 1.0
    assert counts == {"docci/images": 3, "docci/texts": 6} and not failures
