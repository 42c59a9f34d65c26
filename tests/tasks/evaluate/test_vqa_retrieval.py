"""Retrieval-VQA: RetVQA's release file over Visual Genome's image folders, R@2 per question type by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tasks.config import EvalDatasetConfig, EvaluateConfig
from tasks.evaluate.scoring import ImageFeatures
from tasks.evaluate.sets.vqa_retrieval import (
    chance_pool_recalls,
    evaluate_question_retrieval,
    read_rvqa,
    top_k_relevant,
)
from tests.tasks.evaluate.images import write_images

# Question text -> score of each Visual Genome image id (the scorer below returns exactly these).
SCORES = {
    "how many cups are there?": {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.2, 5: 0.0},
    "what color is the kite?": {4: 0.5, 1: 0.5, 2: 0.7},
    "what color is the bus?": {5: 0.3, 6: 0.2, 3: 0.1},
}


def _write_retvqa(root):
    write_images(root / "VG_100K", ["1.jpg", "2.jpg", "3.jpg"])
    write_images(root / "VG_100K_2", ["4.jpg", "5.jpg", "6.jpg"])
    release = {
        "q1": {"question": "How many cups are there?", "answer": "two", "q_type": "count", "split": "test",
               "pos_imgs": [1, 2], "neg_imgs": [3, 4, 5]},
        "q2": {"question": "What color is the kite?", "answer": "red", "q_type": "color", "split": "test",
               "pos_imgs": [4], "neg_imgs": [1, 2, 99]},  # image 99 is not in Visual Genome's folders
        "q3": {"question": "What color is the bus?", "answer": "green", "q_type": "Color", "split": "test",
               "pos_imgs": [5, 6], "neg_imgs": [3]},
        "q4": {"question": "How many dogs?", "answer": "one", "q_type": "count", "split": "train",
               "pos_imgs": [1], "neg_imgs": [2]},
        "q5": {"question": "What shape is the sign?", "answer": "round", "q_type": "shape", "split": "test",
               "pos_imgs": [99], "neg_imgs": [1, 2]},  # its only relevant image is missing: dropped
    }
    (root / "retvqa_release_v1.json").write_text(json.dumps(release))
    return EvalDatasetConfig(name="rvqa", format="rvqa", path=str(root / "retvqa_release_v1.json"), images=str(root))


class PoolScorer:
    """Image i (in encoding order) is one-hot i; a question is the row of its SCORES over those images."""

    image_size, device = 8, torch.device("cpu")

    def __init__(self, image_ids: list[int]):
        self.image_ids, self.next_image = image_ids, 0

    def encode_images(self, pixels):
        index = torch.arange(self.next_image, self.next_image + len(pixels))
        self.next_image += len(pixels)
        features = torch.nn.functional.one_hot(index, len(self.image_ids)).float()
        return ImageFeatures(features, features[:, None])

    def encode_texts(self, texts):
        return torch.tensor([[SCORES[t.lower()].get(i, 0.0) for i in self.image_ids] for t in texts])

    def score_pairs(self, texts, images):
        return (texts * images.global_).sum(-1)


def test_reader_builds_each_question_s_pool(tmp_path):
    data = read_rvqa(_write_retvqa(tmp_path))
    ids = [int(p.rsplit("/", 1)[-1][:-4]) for p in data.image_paths]
    assert ids == [1, 2, 3, 4, 5, 6]  # first seen first, from both VG folders
    assert data.image_paths[3] == str(tmp_path / "VG_100K_2/4.jpg")
    assert data.questions == ["How many cups are there?", "What color is the kite?", "What color is the bus?"]
    assert data.question_types == ["count", "color", "color"]
    assert [[ids[i] for i in pool] for pool in data.pools] == [[1, 2, 3, 4, 5], [4, 1, 2], [5, 6, 3]]
    assert [[ids[i] for i in r] for r in data.relevant] == [[1, 2], [4], [5, 6]]
    assert data.failures == {"missing_image": 2, "question_without_relevant_image": 1}
    config = _write_retvqa(tmp_path).model_copy(update={"max_images": 1})
    assert read_rvqa(config).questions == ["How many cups are there?"]
    with pytest.raises(FileNotFoundError, match="RetVQA questions"):
        read_rvqa(config.model_copy(update={"path": str(tmp_path / "nope.json")}))


def test_r_at_2_per_question_type(tmp_path):
    data = read_rvqa(_write_retvqa(tmp_path))
    ids = [int(p.rsplit("/", 1)[-1][:-4]) for p in data.image_paths]
    metrics, counts, failures = evaluate_question_retrieval(PoolScorer(ids), data, EvaluateConfig(score_text_chunk=4))
    # Count, "how many cups": top two are image 1 (relevant) and 3 -> R@2 1/2, hit.
    # Color, "kite": image 2 (0.7), then 1 and 4 tie at 0.5 and the irrelevant 1 goes first -> 0, no hit.
    # Color, "bus": images 5, 6 on top -> 1, hit.
    for mode in ("conditioned", "agnostic"):  # agnostic divides each row by its norm: same order
        assert metrics[f"rvqa/{mode}/count_R@2"] == pytest.approx(0.5)
        assert metrics[f"rvqa/{mode}/color_R@2"] == pytest.approx(0.5)
        assert metrics[f"rvqa/{mode}/average_R@2"] == pytest.approx(0.5)
        assert metrics[f"rvqa/{mode}/count_hit@2"] == 1.0 and metrics[f"rvqa/{mode}/color_hit@2"] == 0.5
        assert metrics[f"rvqa/{mode}/average_hit@2"] == pytest.approx(0.75)
    # A random order: R@2 = 2 / pool size; hit@2 = 1 - C(P - r, 2) / C(P, 2).
    assert metrics["rvqa/chance/count_R@2"] == pytest.approx(2 / 5)
    assert metrics["rvqa/chance/count_hit@2"] == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    assert metrics["rvqa/chance/color_hit@2"] == pytest.approx(((1 - 1 / 3) + 1) / 2)
    assert counts == {"rvqa/questions": 3, "rvqa/images": 6}
    assert failures == {"missing_image": 2, "question_without_relevant_image": 1}


def test_ties_and_padding_in_the_top_k():
    scores = torch.tensor([[0.5, 0.5, 0.5, -math.inf], [0.2, 0.9, 0.1, 0.3]])
    relevant = torch.tensor([[True, False, False, False], [True, False, False, True]])
    # Row 0: three-way tie, the irrelevant ones take the top two. Row 1: 0.9 (no), 0.3 (yes).
    assert top_k_relevant(scores, relevant, 2).tolist() == [[False, False], [False, True]]
    recall, hit = chance_pool_recalls([4, 2], [1, 2])
    assert recall.tolist() == [0.5, 1.0] and hit.tolist() == pytest.approx([0.5, 1.0])
