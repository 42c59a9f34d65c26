"""The annotation gallery: seeded samples, boxes drawn on the image, bounded size, HTML on storage."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

from storage import DatasetLayout, read_bytes
from tasks.annotate.boxes import BoxesStage
from tasks.annotate.gallery import draw_samples, render, write_gallery
from tasks.config import PipelineConfig
from tasks.stage import run_stage
from tests.tasks.annotate.test_boxes import make_shard


def _boxed_root(tmp_path, owl_dir) -> DatasetLayout:
    root = str(tmp_path / "root")
    for shard in range(3):
        make_shard(root, shard)
    config = PipelineConfig.model_validate(
        {"dataset": {"root": root}, "boxes": {"model": owl_dir, "batch_size": 2, "score_threshold": 0.0}})
    run_stage(BoxesStage(config))
    return DatasetLayout(root)


def test_gallery_is_seeded_draws_boxes_and_is_stored(tmp_path, owl_dir):
    layout = _boxed_root(tmp_path, owl_dir)
    samples = draw_samples(layout, "boxes", 4, seed=0)
    assert len(samples) == 4
    assert [s.key for s in draw_samples(layout, "boxes", 4, seed=0)] == [s.key for s in samples]
    assert all(s.boxes and s.phrases for s in samples if s.key[-1] in "012")

    boxed = next(s for s in samples if s.boxes)
    plain = Image.open(io.BytesIO(boxed.image)).convert("RGB")
    drawn = Image.open(io.BytesIO(render(boxed, max_side=320))).convert("RGB")
    assert drawn.size == plain.size  # small images are never upscaled
    assert drawn.tobytes() != plain.tobytes()  # the outline and label were drawn

    markdown, url = write_gallery(layout, "boxes", 4)
    images = re.findall(r"!\[(\w+)\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert [k for k, _ in images] == [s.key for s in samples]
    assert all(max(Image.open(io.BytesIO(base64.b64decode(b))).size) <= 320 for _, b in images)
    assert boxed.boxes[0]["phrase"] in markdown and len(markdown) < 200_000
    page = read_bytes(url).decode()
    assert url.endswith("galleries/boxes.html") and page.count("<img src=\"data:image/jpeg;base64,") == 4


def test_no_finished_shard_no_gallery(tmp_path):
    assert write_gallery(DatasetLayout(str(tmp_path / "empty")), "boxes") is None


def test_shards_without_their_images_are_left_out(tmp_path, owl_dir):
    layout = _boxed_root(tmp_path, owl_dir)
    fs_path = layout.images_tar("00001")
    Path(fs_path).unlink()
    assert {s.key[:5] for s in draw_samples(layout, "boxes", 6)} <= {"00000", "00002"}
