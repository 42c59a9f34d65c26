"""The demo's rule-based VQA stand-in: right answers for the synthetic scenes, through the real vqa stage."""

from __future__ import annotations

import numpy as np

from tasks.annotate.vqa import VqaStage
from tasks.demo.openai_server import OpenAIServer
from tasks.demo.source import _captions, _sample_scene
from tasks.demo.vqa_standin import AT, MODEL_NAME, scene_answers, scene_objects
from tasks.stage import run_stage
from tests.tasks.annotate.test_vqa import config, make_captions, vqa_rows


def _scenes(n: int = 40):
    rng = np.random.default_rng(7)
    return [(scene, _captions(scene, rng)["short"]["SV"]) for scene in (_sample_scene(rng, [(200, 150)])
                                                                        for _ in range(n))]


def test_reads_every_shape_of_a_demo_caption():
    for scene, caption in _scenes():
        assert scene_objects(caption) == scene["objects"], caption


def test_answers_are_true_of_the_scene():
    for scene, caption in _scenes():
        qa = scene_answers(caption)["qa"]
        assert 3 <= len(qa) <= 5 if len(scene["objects"]) > 1 else len(qa) == 4  # count, colour, where, size
        by_question = {p["question"]: p["answer"] for p in qa}
        assert by_question["How many shapes are there?"] == ["one", "two", "three"][len(scene["objects"]) - 1]
        first = scene["objects"][0]
        assert by_question[f"What color is the shape {AT[first['position']]}?"] == first["colour"]
        assert by_question[f"Where is the {first['colour']} {first['shape']}?"] == first["position"]


def test_the_vqa_stage_gets_pairs_for_every_image_over_http(tmp_path):
    captions = [caption for _, caption in _scenes(12)]
    keys = make_captions(tmp_path, 0, captions)
    with OpenAIServer(answer_fn=scene_answers) as server:
        summary = run_stage(VqaStage(config(tmp_path, model=MODEL_NAME, openai={"base_urls": [server.base_url]})))
    assert summary["failures"] == {} and summary["counts"]["answered"] == len(keys)
    rows = vqa_rows(tmp_path)
    for key, caption in zip(keys, captions):
        assert rows[key]["qa"] == scene_answers(caption)["qa"]
