"""The evaluate stage: recall@k, the I2T best-rank rule, the re-rank, readers, and an end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from tasks.config import EvalDatasetConfig, EvaluateConfig, PipelineConfig
from tasks.evaluate.data import CLIP_MEAN, CLIP_STD, RetrievalSet, preprocess_image, read_eval_set
from tasks.evaluate.metrics import (
    chance_recalls,
    classification_accuracy,
    i2t_ranks,
    reranked,
    retrieval_recalls,
    t2i_ranks,
    top_k_masks,
)
from tasks.evaluate.stage import EvaluateStage, evaluate_retrieval
from tasks.stage import SINGLE_UNIT, run_stage
from tests.tasks.evaluate.images import OneHotScorer, write_images


def _brute_force_recalls(sims: list[list[float]], text_image: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Sorted lists and loops; ties against the model (the ground truth sorts last among equals)."""
    num_texts, num_images = len(sims), len(sims[0])
    out = {}
    t2i_rank = []
    for t in range(num_texts):
        order = sorted(range(num_images), key=lambda i: (-sims[t][i], i == text_image[t]))
        t2i_rank.append(order.index(text_image[t]))
    i2t_rank = []
    for i in range(num_images):
        order = sorted(range(num_texts), key=lambda t: (-sims[t][i], text_image[t] == i))
        own = [r for r, t in enumerate(order) if text_image[t] == i]
        i2t_rank.append(min(own))
    for k in ks:
        out[f"t2i_R@{k}"] = sum(r < k for r in t2i_rank) / num_texts
        out[f"i2t_R@{k}"] = sum(r < k for r in i2t_rank) / num_images
    return out


def test_recall_on_a_hand_computed_matrix():
    # 3 images, 4 texts; texts 0, 1 describe image 0, text 2 image 1, text 3 image 2.
    sims = torch.tensor([
        [0.9, 0.1, 0.0],   # text 0 -> image 0 first            (T2I rank 0)
        [0.2, 0.5, 0.1],   # text 1 -> image 0 second           (rank 1)
        [0.3, 0.3, 0.8],   # text 2 -> image 1 third            (rank 2)
        [0.1, 0.2, 0.7],   # text 3 -> image 2 first            (rank 0)
    ])
    text_image = torch.tensor([0, 0, 1, 2])
    assert t2i_ranks(sims, text_image).tolist() == [0, 1, 2, 0]
    # Image 0: its best caption, text 0 (0.9), tops column 0 -> 0. Image 1: column [0.1, 0.5, 0.3, 0.2],
    # text 1 (0.5) beats its caption text 2 (0.3) -> 1. Image 2: text 2 (0.8) beats its text 3 (0.7) -> 1.
    assert i2t_ranks(sims, text_image).tolist() == [0, 1, 1]
    recalls = retrieval_recalls(sims, text_image, ks=(1, 2))
    assert recalls == {"t2i_R@1": 0.5, "t2i_R@2": 0.75, "i2t_R@1": pytest.approx(1 / 3), "i2t_R@2": 1.0}


def test_i2t_takes_the_best_rank_among_an_image_s_captions():
    # Image 0 has captions 0, 1, 2; only caption 2 is near the top (behind one other text).
    sims = torch.tensor([[0.0, 0.9], [0.1, 0.8], [0.7, 0.0], [0.8, 0.1]])  # (4 texts, 2 images)
    text_image = torch.tensor([0, 0, 0, 1])
    # Image 0: only text 3 (0.8) outranks caption 2 (0.7); its captions 0, 1 never count against it.
    # Image 1: texts 0 and 1 (0.9, 0.8) outrank its caption 3 (0.1).
    assert i2t_ranks(sims, text_image).tolist() == [1, 2]
    assert retrieval_recalls(sims, text_image, ks=(1, 2, 3))["i2t_R@2"] == 0.5


def test_ties_count_against_the_model():
    sims = torch.zeros(4, 4)
    recalls = retrieval_recalls(sims, torch.arange(4), ks=(1, 4))
    assert recalls["t2i_R@1"] == 0 and recalls["i2t_R@1"] == 0
    assert recalls["t2i_R@4"] == 1 and recalls["i2t_R@4"] == 1


@pytest.mark.parametrize("seed", range(5))
def test_recall_matches_a_brute_force_loop(seed):
    g = torch.Generator().manual_seed(seed)
    num_images = 13
    text_image = torch.cat([torch.arange(num_images), torch.randint(0, num_images, (18,), generator=g)])
    sims = torch.randint(-3, 4, (31, num_images), generator=g).float() / 3  # many ties on purpose
    assert retrieval_recalls(sims, text_image) == pytest.approx(_brute_force_recalls(sims.tolist(),
                                                                                    text_image.tolist()))


def test_chance_levels():
    text_image = torch.tensor([0, 0, 1, 2, 3])  # 4 images, 5 texts
    chance = chance_recalls(text_image, 4, ks=(1, 2))
    assert chance["t2i_R@1"] == 0.25 and chance["t2i_R@2"] == 0.5
    # Image 0 (2 of 5 texts): 1 - C(3,1)/C(5,1) = 0.4 at k=1; the others 1/5.
    assert chance["i2t_R@1"] == pytest.approx((0.4 + 3 * 0.2) / 4)
    assert chance["i2t_R@2"] == pytest.approx(((1 - math.comb(3, 2) / math.comb(5, 2)) + 3 * 0.4) / 4)


def test_rerank_orders_candidates_first_by_the_second_stage():
    first = torch.tensor([[0.9, 0.8, 0.1, 0.0]])
    second = torch.tensor([[0.1, 0.7, 0.9, 0.9]])
    t2i, _ = top_k_masks(first, 2)
    assert t2i.tolist() == [[True, True, False, False]]
    assert reranked(first, t2i, second).argsort(descending=True).tolist() == [[1, 0, 2, 3]]


def test_classification_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.4, 0.6], [0.0, 0.2, 0.1]])
    acc = classification_accuracy(logits, torch.tensor([0, 0, 1]), ks=(1, 2))
    assert acc == {"top1": pytest.approx(2 / 3), "top2": 1.0}


def test_a_perfect_scorer_gets_perfect_recall_in_every_mode(tmp_path):
    names = [f"{i}.jpg" for i in range(6)]
    write_images(tmp_path / "img", names)
    captions = {f"caption {i} {j}": i for i in range(6) for j in range(2)}
    data = RetrievalSet("toy", [str(tmp_path / "img" / n) for n in names], list(captions), list(captions.values()))
    config = EvaluateConfig(rerank_top_k=2, image_batch_size=4, score_image_chunk=4, score_text_chunk=5)
    metrics, counts, failures = evaluate_retrieval(OneHotScorer(6, captions), data, config)
    for mode in ("agnostic", "conditioned", "rerank_top2"):
        for direction in ("t2i", "i2t"):
            assert metrics[f"toy/{mode}/{direction}_R@1"] == 1.0
    assert metrics["toy/chance/t2i_R@1"] == pytest.approx(1 / 6)
    assert counts == {"toy/images": 6, "toy/texts": 12} and not failures


def test_preprocess_resizes_the_short_side_and_centre_crops(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 10, 20))  # a black stripe on the left quarter: cropped away
    path = tmp_path / "a.png"
    img.save(path)
    pixels = preprocess_image(path.read_bytes(), 16)
    assert pixels.shape == (3, 16, 16)
    white = (torch.ones(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[:, :, 2:], white[:, None, None].expand(3, 16, 14), atol=0.05)


def test_preprocess_squash_keeps_the_whole_image(tmp_path):
    # resize_mode "squash" (EvaluateConfig.resize_mode) resizes the whole image to S x S, as a
    # full-scale training crop does: the left stripe that centre-cropping drops stays, a quarter wide.
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 10, 20))
    path = tmp_path / "a.png"
    img.save(path)
    pixels = preprocess_image(path.read_bytes(), 16, resize_mode="squash")
    assert pixels.shape == (3, 16, 16)
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    white = (torch.ones(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[:, :, :3], black[:, None, None].expand(3, 16, 3), atol=0.05)
    assert torch.allclose(pixels[:, :, 5:], white[:, None, None].expand(3, 16, 11), atol=0.05)
    with pytest.raises(ValueError, match="resize_mode"):
        preprocess_image(path.read_bytes(), 16, resize_mode="pad")


def test_evaluation_uses_the_configured_resize_mode(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 10, 20))  # a black stripe on the left quarter
    img.save(tmp_path / "a.png")
    data = RetrievalSet("toy", [str(tmp_path / "a.png")], ["a"], [0])

    class Recorder(OneHotScorer):
        def encode_images(self, pixels):
            self.pixels = pixels
            return super().encode_images(pixels)

    assert EvaluateConfig().resize_mode == "center_crop"
    crop, squash = Recorder(1, {"a": 0}), Recorder(1, {"a": 0})
    evaluate_retrieval(crop, data, EvaluateConfig())
    evaluate_retrieval(squash, data, EvaluateConfig(resize_mode="squash"))
    assert crop.pixels[0, :, :, 0].min() > 1.0  # white: the stripe was cropped away
    assert squash.pixels[0, :, :, 0].max() < -1.0  # black: the stripe is in the view


def test_readers(tmp_path):
    write_images(tmp_path / "coco", ["a.jpg", "b.jpg"])
    (tmp_path / "captions_val2017.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}, {"id": 11, "file_name": "c.jpg"}],
        "annotations": [{"image_id": 9, "caption": "b one"}, {"image_id": 7, "caption": "a one"},
                        {"image_id": 9, "caption": "b two "}, {"image_id": 5, "caption": "lost"}],
    }))
    coco = read_eval_set(EvalDatasetConfig(name="coco", format="coco", path=str(tmp_path / "captions_val2017.json"),
                                           images=str(tmp_path / "coco")))
    assert coco.image_paths == [str(tmp_path / "coco/a.jpg"), str(tmp_path / "coco/b.jpg")]
    assert list(zip(coco.texts, coco.text_image)) == [("a one", 0), ("b one", 1), ("b two", 1)]
    assert coco.failures == {"caption_of_unknown_image": 1, "image_without_captions": 1}

    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": [
        {"filename": "1.jpg", "split": "train", "sentences": [{"raw": "train"}]},
        {"filename": "2.jpg", "split": "test", "sentences": [{"raw": "two a"}, {"raw": "two b"}]},
        {"filename": "3.jpg", "split": "test", "sentences": [{"raw": "three"}, {"raw": "  "}]},
    ]}))
    flickr = read_eval_set(EvalDatasetConfig(name="f", format="flickr30k", path=str(tmp_path / "dataset_flickr30k.json"),
                                             images="/data/flickr"))
    assert flickr.image_paths == ["/data/flickr/2.jpg", "/data/flickr/3.jpg"]
    assert flickr.texts == ["two a", "two b", "three"] and flickr.text_image == [0, 0, 1]
    assert flickr.failures == {"empty_caption": 1}
    limited = read_eval_set(EvalDatasetConfig(name="f", format="flickr30k", split="test", max_images=1,
                                              path=str(tmp_path / "dataset_flickr30k.json"), images="/d"))
    assert limited.image_paths == ["/d/2.jpg"] and limited.texts == ["two a", "two b"]

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/pairs.jsonl").write_text(
        '{"image": "images/0.jpg", "caption": "zero"}\n'
        'not json\n'
        '{"image": "images/1.jpg", "captions": ["one", "uno"]}\n'
        '\n'
        '{"image": "images/0.jpg", "caption": "nought"}\n'
        '{"caption": "no image"}\n'
    )
    pairs = read_eval_set(EvalDatasetConfig(name="p", format="jsonl", path=str(tmp_path / "eval/pairs.jsonl")))
    assert pairs.image_paths == [str(tmp_path / "eval/images/0.jpg"), str(tmp_path / "eval/images/1.jpg")]
    assert list(zip(pairs.texts, pairs.text_image)) == [("zero", 0), ("nought", 0), ("one", 1), ("uno", 1)]
    assert pairs.failures == {"bad_line": 2}

    write_images(tmp_path / "classes/red_car", ["1.jpg", "2.png"])
    write_images(tmp_path / "classes/dog", ["x.jpg"])
    (tmp_path / "classes/dog/notes.txt").write_text("not an image")
    classes = read_eval_set(EvalDatasetConfig(name="c", format="classification", path=str(tmp_path / "classes"),
                                              templates=["a {}.", "the {}."]))
    assert classes.class_names == ["dog", "red car"] and classes.labels == [0, 1, 1]
    assert [Path(p).name for p in classes.image_paths] == ["x.jpg", "1.jpg", "2.png"]
    assert classes.templates == ["a {}.", "the {}."]


def test_config_rejects_a_template_without_a_slot_and_coco_without_images():
    with pytest.raises(ValueError, match="needs a"):
        EvalDatasetConfig(name="c", format="classification", path="/x", templates=["a photo"])
    with pytest.raises(ValueError, match="needs `images`"):
        EvaluateConfig(datasets=[{"name": "coco", "format": "coco", "path": "/x.json"}])


def test_end_to_end_on_a_debug_model(debug_checkpoint):
    from storage import read_json
    from tasks.train.checkpoint import load_scoring_model

    root, run, model = debug_checkpoint
    loaded, named_tokenizer = load_scoring_model(str(run / "model.pt"))
    assert named_tokenizer is None  # a plain state_dict names none: found beside it (find_tokenizer)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name

    config = PipelineConfig.model_validate({
        "dataset": {"root": str(root / "data")},  # no checkpoint given: the latest under runs/
        "evaluate": {"rerank_top_k": 13, "score_image_chunk": 5, "score_text_chunk": 7, "image_batch_size": 5,
                     "datasets": [{"name": "demo_pairs", "format": "jsonl", "path": str(root / "eval/pairs.jsonl")}]},
    })
    summary = run_stage(EvaluateStage(config))
    assert summary["checkpoint"] == str(run) and summary["last_run"]["processed"] == [SINGLE_UNIT]
    written = read_json(str(root / "data/eval/metrics.json"))
    assert written["metrics"] == summary["metrics"] and written["checkpoint"] == str(run)
    assert read_json(str(root / "data/_stages/evaluate.json")) == summary
    metrics = summary["metrics"]
    assert summary["counts"] == written["counts"] == {"demo_pairs/images": 12, "demo_pairs/texts": 13}
    assert summary["failures"] == written["failures"] == {"demo_pairs/missing_image": 1}
    assert metrics["demo_pairs/chance/t2i_R@1"] == pytest.approx(1 / 12, abs=1e-6)
    for mode in ("conditioned", "agnostic", "rerank_top13"):
        for metric in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"):
            assert 0 <= metrics[f"demo_pairs/{mode}/{metric}"] <= 1
            assert f"demo_pairs/chance/{metric}" in metrics
    # With k = the number of texts (>= images) the two-stage ranking is the full conditioned one.
    for direction in ("t2i", "i2t"):
        for k in (1, 5, 10):
            assert metrics[f"demo_pairs/rerank_top13/{direction}_R@{k}"] == pytest.approx(
                metrics[f"demo_pairs/conditioned/{direction}_R@{k}"])
    again = run_stage(EvaluateStage(config))  # same config, same checkpoint: nothing to redo
    assert again["last_run"] == {"processed": [], "skipped": [SINGLE_UNIT]} and again["metrics"] == metrics
    forced = run_stage(EvaluateStage(config), force=True)
    assert forced["last_run"]["processed"] == [SINGLE_UNIT] and forced["metrics"] == metrics


def test_a_new_checkpoint_is_evaluated_again(debug_checkpoint, tmp_path):
    # The checkpoint's files are part of the fingerprint: new weights at the same path are scored anew.
    import shutil

    root, run, _ = debug_checkpoint
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(run, checkpoint)
    shutil.copytree(run.parent / "tokenizer", checkpoint / "tokenizer")
    config = PipelineConfig.model_validate({
        "dataset": {"root": str(tmp_path / "data")},
        "evaluate": {"checkpoint": str(checkpoint), "modes": ["agnostic"],
                     "datasets": [{"name": "p", "format": "jsonl", "path": str(root / "eval/pairs.jsonl")}]},
    })
    assert run_stage(EvaluateStage(config))["last_run"]["processed"] == [SINGLE_UNIT]
    assert run_stage(EvaluateStage(config))["last_run"]["skipped"] == [SINGLE_UNIT]
    state = torch.load(checkpoint / "model.pt", weights_only=True)
    state["pooling.query_proj.weight"] += 1
    torch.save(state, checkpoint / "model.pt")
    assert run_stage(EvaluateStage(config))["last_run"]["processed"] == [SINGLE_UNIT]


def test_classification_end_to_end(debug_checkpoint, tmp_path):
    _, run, _ = debug_checkpoint
    for name in ("red", "blue", "green"):
        write_images(tmp_path / "classes" / name, ["a.jpg", "b.jpg"])
    config = PipelineConfig.model_validate({
        "dataset": {"root": str(tmp_path / "data")},
        "evaluate": {"checkpoint": str(run), "datasets": [
            {"name": "colours", "format": "classification", "path": str(tmp_path / "classes"),
             "templates": ["a {} square.", "a photo of {}."]}]},
    })
    metrics = run_stage(EvaluateStage(config))["metrics"]
    assert metrics["colours/chance/top1"] == pytest.approx(1 / 3, abs=1e-6) and metrics["colours/chance/top5"] == 1.0
    assert 0 <= metrics["colours/agnostic/top1"] <= 1 and metrics["colours/agnostic/top5"] == 1.0


@pytest.mark.usefixtures("prefect_harness")
def test_evaluate_flow_publishes_metrics(debug_checkpoint):
    from prefect.client.orchestration import get_client

    from pipelines.cli import print_summaries
    from pipelines.evaluate import evaluate_flow

    root, run, _ = debug_checkpoint
    config = {"dataset": {"root": str(root / "flow-data")},
              "evaluate": {"checkpoint": str(run / "model.pt"), "modes": ["conditioned"],
                           "datasets": [{"name": "demo_pairs", "format": "jsonl",
                                         "path": str(root / "eval/pairs.jsonl")}]}}
    summary = evaluate_flow(config)
    assert summary["last_run"]["processed"] == [SINGLE_UNIT] and summary["num_shards_done"] == 1
    assert "demo_pairs/conditioned/t2i_R@1" in summary["metrics"]
    assert "demo_pairs/agnostic/t2i_R@1" not in summary["metrics"]
    assert summary["counts"] == {"demo_pairs/images": 12, "demo_pairs/texts": 13}
    assert (root / "flow-data/eval/metrics.json").exists()
    print_summaries({"evaluate": summary})
    with get_client(sync_client=True) as client:
        task_runs = {t.name for t in client.read_task_runs()}
        keys = {a.key for a in client.read_artifacts()}
    assert "evaluate-demo_pairs" in task_runs and "evaluate-metrics" in keys  # one task per set
    assert evaluate_flow(config)["last_run"]["skipped"] == [SINGLE_UNIT]


@pytest.mark.parametrize(("size", "expected"), [
    # torchvision Resize(224) + CenterCrop(224), worked by hand: long side int(224 * long / short),
    # offsets int(round(...)) with halves to even.
    ((300, 199), (337, 224, 56, 0)),  # 337.69 is truncated (rounding gave 338, offset 57)
    ((199, 300), (224, 337, 0, 56)),
    ((251, 224), (251, 224, 14, 0)),  # (251 - 224) / 2 = 13.5 rounds to 14 (floor division gave 13)
    ((253, 224), (253, 224, 14, 0)),  # 14.5 rounds to 14, the even neighbour
    ((224, 224), (224, 224, 0, 0)),
])
def test_center_crop_geometry_is_open_clips(size, expected):
    from tasks.evaluate.data import center_crop_geometry

    assert center_crop_geometry(*size, 224) == expected
