"""Boxes stage with a tiny random OWLv2 saved like a real checkpoint and loaded through from_pretrained."""

from __future__ import annotations

import io
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from storage import DatasetLayout, ShardRecord, ShardWriter, StageRecords, make_key, read_table, write_table
from storage.tables import BOXES
from tasks.annotate.boxes import BatchLoader, BoxesStage, OwlDetector, collate, decode_image, image_queries
from tasks.config import BoxesConfig, PipelineConfig
from tasks.stage import run_stage
from tasks.demo.http_server import image_bytes


@pytest.fixture(scope="module")
def detector(owl_dir):
    return OwlDetector(BoxesConfig(model=owl_dir, score_threshold=0.0))


def test_standin_loads_through_the_real_classes(owl_dir, detector):
    assert type(detector.processor).__name__ == "Owlv2Processor"
    assert type(detector.model).__name__ == "Owlv2ForObjectDetection"
    assert detector.size == 64 and detector.dtype == torch.float32
    tok = detector.processor.tokenizer
    ids = tok("a red circle")["input_ids"]
    assert ids[0] != 0 and ids[-1] == max(tok.get_vocab().values())  # OWLv2 pools the arg-max id (EOT)


@pytest.mark.parametrize("size", [(48, 32), (32, 60), (64, 64)])
def test_preprocessing_matches_the_reference_processor(detector, size):
    """Resize-then-pad on uint8 == the processor's pad-then-resize (up-scaling, as stored images are < 960 px)."""
    jpg = image_bytes(*size)
    reference = detector.processor.image_processor(images=[Image.open(io.BytesIO(jpg)).convert("RGB")],
                                                   return_tensors="pt")["pixel_values"]
    ours = detector.normalize(collate([decode_image("k", jpg, ["q"], detector.size)], detector.size, False).pixels_BCSS)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().mean() < 0.05  # about 3/255 of intensity: interpolation conventions


def test_padded_queries_do_not_change_results(detector):
    """An image batched beside one with more queries gets exactly what it gets alone."""
    a = decode_image("a", image_bytes(80, 40), ["a red circle", "dog", "the green square"], detector.size)
    b = decode_image("b", image_bytes(50, 90), ["cat"], detector.size)
    scores, boxes = detector.predict(collate([a, b], detector.size, False))
    assert [len(s) for s in scores] == [3, 1] and [len(x) for x in boxes] == [3, 1]
    for i, im in enumerate((a, b)):
        alone_scores, alone_boxes = detector.predict(collate([im], detector.size, False))
        torch.testing.assert_close(torch.tensor(scores[i]), torch.tensor(alone_scores[0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(boxes[i]), torch.tensor(alone_boxes[0]), atol=1e-3, rtol=0)


def test_dummy_queries_are_marked_as_padding(detector):
    ids, mask, valid = detector.tokenize_queries([["a", "b", "c"], ["d"]])
    assert ids.shape == (6, 16) and valid.tolist() == [[True] * 3, [True, False, False]]
    assert (ids[4:] == 0).all() and mask[4:].sum(dim=1).tolist() == [1, 1]
    assert (ids[:4, 0] != 0).all()


def test_boxes_scale_to_original_pixels_and_clip(detector, monkeypatch):
    """OWLv2 boxes are relative to the padded square: scale by max(w, h), clip to w x h."""
    im = decode_image("k", image_bytes(200, 100), ["left", "bottom"], detector.size)
    num_patches = (detector.size // 16) ** 2
    logits = torch.full((1, num_patches, 2), -10.0)
    logits[0, 3, 0], logits[0, 5, 1] = 2.0, -1.0  # query 0 best at box 3 (p=0.88), query 1 at box 5 (p=0.27)
    boxes = torch.full((1, num_patches, 4), 0.5)
    boxes[0, 3] = torch.tensor([0.25, 0.25, 0.5, 0.5])  # -> (0, 0, 100, 100) px
    boxes[0, 5] = torch.tensor([0.5, 0.5, 0.4, 0.4])  # -> (60, 60, 140, 140) px, y clipped to 100
    monkeypatch.setattr(detector, "model", lambda **kw: SimpleNamespace(logits=logits, pred_boxes=boxes))
    left, bottom = detector.detect(collate([im], detector.size, False))[0]
    assert [left[k] for k in ("x0", "y0", "x1", "y1")] == pytest.approx([0, 0, 100, 100], abs=1e-3)
    assert [bottom[k] for k in ("x0", "y0", "x1", "y1")] == pytest.approx([60, 60, 140, 100], abs=1e-3)
    assert left["score"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())


def test_loader_counts_bad_jpegs_keeps_order_and_stops_early():
    good = image_bytes(40, 30)
    samples = [(f"k{i}", good if i != 2 else b"not a jpeg", ["q"]) for i in range(7)]
    loader = BatchLoader(iter(samples), size=32, batch_size=3, threads=2, prefetch=1)
    keys = [im.key for batch in loader for im in batch.images]
    assert keys == ["k0", "k1", "k3", "k4", "k5", "k6"] and loader.failures == Counter(decode_error=1)
    early = BatchLoader(iter(samples * 20), size=32, batch_size=2, threads=2, prefetch=1)
    for _ in early:
        break
    assert not early._thread.is_alive()


def test_image_queries_dedupe_and_cap():
    phrases = [{"text": t} for t in ["a dog", "A  dog", "", "a cat", "grass", "sky"]]
    assert image_queries(phrases, 3) == ["a dog", "a cat", "grass"]


def make_shard(root: str, shard: int = 0) -> list[str]:
    """An images tar with 5 samples (one corrupt, one without phrases), its phrases table and records."""
    layout = DatasetLayout(root)
    keys = [make_key(shard, i) for i in range(5)]
    sizes = [(96, 64), (64, 96), (80, 80), (120, 40), (50, 50)]
    with ShardWriter(layout.images_tar(shard)) as w:
        for i, (key, size) in enumerate(zip(keys, sizes)):
            w.write(key, {"jpg": b"\xff\xd8 broken" if i == 3 else image_bytes(*size), "json": {"key": key}})
    phrases = [{"key": k, "phrases": [{"text": t, "sentence": "", "field": "long.LLA"}
                                      for t in ["red circle", "blue square", "yellow star"][: 1 + i % 3]]}
               for i, k in enumerate(keys) if i != 4]
    write_table(layout.annotation("phrases", shard), phrases, "phrases")
    for stage in ("download", "phrases"):
        StageRecords(layout, stage).put(ShardRecord(f"{shard:05d}", f"fp-{stage}"))
    return keys


def test_stage_writes_boxes_counts_and_skips_when_done(tmp_path, owl_dir):
    root = str(tmp_path / "root")
    keys = make_shard(root)
    config = PipelineConfig.model_validate(
        {"dataset": {"root": root}, "boxes": {"model": owl_dir, "batch_size": 2, "score_threshold": 0.0}}
    )
    summary = run_stage(BoxesStage(config))
    assert summary["failures"] == {"decode_error": 1, "no_phrases": 1}
    counts = summary["counts"]
    assert counts["images"] == 5 and counts["boxes"] == 1 + 2 + 3 and counts["with_boxes"] == 3
    table = read_table(DatasetLayout(root).annotation("boxes", "00000"))
    assert table.schema.equals(BOXES, check_metadata=False)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert sorted(rows) == keys[:3]
    for r in rows.values():
        for b in r["boxes"]:
            assert 0 <= b["x0"] < b["x1"] <= r["width"] and 0 <= b["y0"] < b["y1"] <= r["height"]
        assert r["has_confident_box"] == any(b["score"] > 0.3 for b in r["boxes"])
    assert (rows[keys[1]]["width"], rows[keys[1]]["height"]) == (64, 96)
    assert counts["confident"] == sum(r["has_confident_box"] for r in rows.values())

    again = BoxesStage(config)
    assert run_stage(again)["last_run"]["skipped"] == ["00000"] and again._detector is None
    stricter = PipelineConfig.model_validate(
        {"dataset": {"root": root}, "boxes": {"model": owl_dir, "score_threshold": 0.99, "batch_size": 4}}
    )
    assert run_stage(BoxesStage(stricter))["counts"]["boxes"] == 0


def test_boxes_flow(tmp_path, owl_dir, prefect_harness):
    from pipelines.boxes import boxes_flow

    root = str(tmp_path / "root")
    make_shard(root)
    summary = boxes_flow({"dataset": {"root": root}, "boxes": {"model": owl_dir, "score_threshold": 0.0}})
    assert summary["counts"]["images"] == 5 and summary["device"] == "cpu"
