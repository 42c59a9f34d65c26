"""Phrases stage with the real spaCy model: cleaning rules, dedupe, the stage contract, n_process 2."""

import threading
from collections import Counter

import pytest

from storage import DatasetLayout, ShardRecord, StageRecords, read_table, write_table
from tasks.config import ConfigError, PhrasesConfig, PipelineConfig
from tasks.annotate.phrases import PhraseParser, PhrasesStage, caption_text, merge_phrases
from tasks.stage import run_stage

LLAVA = (
    "The image shows a red car parked next to his house. In the background, there are several tall trees "
    "and a man wearing a blue shirt. It is parked on the left side of the street. The black dogs are "
    "sleeping near a wooden bench, and another black dog sits on the bench. There are no people visible."
    "\n\nOverall, the scene conveys a calm atmosphere."
)


@pytest.fixture(scope="module")
def parser():
    return PhraseParser(PhrasesConfig(n_process=1))


def test_noun_chunks_cleaned_to_object_phrases(parser):
    [phrases] = parser([LLAVA])
    texts = [p.text for p in phrases]
    assert texts[:4] == ["red car", "house", "several tall trees", "man"]
    # pronouns, generic heads (image, background, side, scene, atmosphere) and negated chunks are gone
    lowered = " | ".join(texts).lower()
    for dropped in ("image", "background", "it", "side", "scene", "atmosphere", "people"):
        assert dropped not in [t.lower() for t in texts], dropped
    # leading determiners and possessives stripped
    assert not any(t.split()[0].lower() in {"the", "a", "an", "his", "another"} for t in texts), lowered
    by_text = {p.text: p for p in phrases}
    assert by_text["blue shirt"].sentence == (
        "In the background, there are several tall trees and a man wearing a blue shirt."
    )
    assert by_text["red car"].sentence == "The image shows a red car parked next to his house."


def test_dedupe_by_lemma_keeps_the_first_with_its_sentence(parser):
    [phrases] = parser([LLAVA])
    assert [p.dedupe_key for p in phrases].count("black dog") == 2  # "black dogs", "black dog"
    merged = merge_phrases([("long.LLA", phrases), ("long.SV", parser(["Two red cars and a wooden bench."])[0])], 16)
    texts = [m["text"] for m in merged]
    assert texts.count("black dogs") == 1 and "black dog" not in texts
    assert texts.count("wooden bench") == 1 and "bench" in texts  # different lemmas, both kept
    first = next(m for m in merged if m["text"] == "black dogs")
    assert first["sentence"].startswith("The black dogs are sleeping") and first["field"] == "long.LLA"
    assert [m["field"] for m in merged][-1] == "long.SV" and texts[-1] == "Two red cars"
    assert len(merge_phrases([("long.LLA", phrases)], 3)) == 3


def test_without_lemmatizer_dedupe_is_by_lower_text():
    parser = PhraseParser(PhrasesConfig(n_process=1, lemmatize=False))
    assert "lemmatizer" not in parser.nlp.pipe_names and "ner" not in parser.nlp.pipe_names
    [phrases] = parser(["The images show two cats. Two Cats sleep on a sofa."])
    assert [p.dedupe_key for p in phrases] == ["two cats", "two cats", "sofa"]  # "images" caught as generic


def test_entities_outside_chunks_when_enabled():
    parser = PhraseParser(PhrasesConfig(n_process=1, entities=True, entity_labels=["GPE", "ORG"]))
    assert "ner" in parser.nlp.pipe_names
    [phrases] = parser(["A tourist stands in front of a fountain in Rome."])
    assert {"tourist", "fountain", "Rome"} <= {p.text for p in phrases}


def test_missing_model_is_a_config_error_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"en_core_web_xx_missing.*pip install en-core-web-xx-missing"):
        PhraseParser(PhrasesConfig(spacy_model="en_core_web_xx_missing"))
    config = PipelineConfig.model_validate(
        {"dataset": {"root": str(tmp_path)}, "phrases": {"spacy_model": "en_core_web_xx_missing"}}
    )
    with pytest.raises(ConfigError, match="not installed"):
        PhrasesStage(config).prepare()


def test_two_spawned_processes_from_a_thread_match_one_process(parser):
    texts = [LLAVA, "A cat sleeps on a red sofa.", "", "It is what it is."] * 40
    texts = [t for t in texts if t]
    two = PhraseParser(PhrasesConfig(n_process=2, batch_size=16), nlp=parser.nlp)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=two(texts)))  # as in a Prefect task
    thread.start()
    thread.join(timeout=120)
    assert result["out"] == parser(texts)


def _captions_row(key: str, lla_long: str, sv_long: str = "") -> dict:
    return {"key": key, "url": f"http://x/{key}.jpg", "raw": "raw", "short": ["", "", ""],
            "long": ["", sv_long, lla_long]}


def _tiny_root(root) -> DatasetLayout:
    layout = DatasetLayout(str(root))
    shards = {
        "00000": [_captions_row("000000000", LLAVA), _captions_row("000000001", ""),
                  _captions_row("000000002", "It is what it is.")],
        "00001": [_captions_row("000010000", "A cat sleeps on a red sofa.</s>", sv_long="A grey cat lies on the floor."),
                  _captions_row("000010001", "A cat. " * 4000)],  # broken data: far beyond any real caption
    }
    for shard, rows in shards.items():
        write_table(layout.annotation("captions", shard), rows, "captions")
        StageRecords(layout, "captions").put(ShardRecord(shard, f"captions-{shard}", {"captioned": len(rows)}))
    return layout


def test_stage_over_a_tiny_root_then_rerun_skips(tmp_path):
    layout = _tiny_root(tmp_path / "root")
    config = PipelineConfig.model_validate(
        {"dataset": {"root": layout.root}, "phrases": {"n_process": 1, "fields": ["long.LLA", "long.SV"]}}
    )
    summary = run_stage(PhrasesStage(config))
    assert summary["num_shards_done"] == 2
    assert summary["failures"] == {"no_caption_text": 1, "no_phrases": 1, "caption_too_long": 1}
    counts = Counter(summary["counts"])
    assert counts["images"] == 5 and counts["with_phrases"] == 2 and counts["words"] > 60

    rows = {r["key"]: r["phrases"] for r in read_table(layout.annotation("phrases", "00000")).to_pylist()}
    assert list(rows) == ["000000000"]
    assert rows["000000000"][0] == {"text": "red car", "field": "long.LLA",
                                    "sentence": "The image shows a red car parked next to his house."}
    [cat] = read_table(layout.annotation("phrases", "00001")).to_pylist()  # the over-long caption is skipped
    assert [(p["text"], p["field"]) for p in cat["phrases"]] == [("cat", "long.LLA"), ("red sofa", "long.LLA"),
                                                                  ("grey cat", "long.SV"), ("floor", "long.SV")]
    assert counts["phrases"] == len(rows["000000000"]) + 4

    again = run_stage(PhrasesStage(config))
    assert again["last_run"] == {"processed": [], "skipped": ["00000", "00001"]}
    changed = config.model_copy(update={"phrases": config.phrases.model_copy(update={"max_phrases_per_image": 2})})
    assert run_stage(PhrasesStage(changed))["last_run"]["processed"] == ["00000", "00001"]


def test_caption_text_picks_fields_by_captioner():
    row = {"raw": " r ", "short": ["ib", "sv", "lla"], "long": ["IB long", "SV long", "LLA long</s>"]}
    assert [caption_text(row, f) for f in ("raw", "short.SV", "long.LLA", "long.IB")] == [
        "r", "sv", "LLA long", "IB long"]
    assert caption_text({"raw": None, "short": None, "long": None}, "long.LLA") == ""


def test_killed_spacy_worker_is_replaced_and_its_texts_parsed_again(parser):
    import multiprocessing as mp
    import os
    import signal
    import time

    texts = [f"{LLAVA} A cat number {i} sleeps on a red sofa." for i in range(48)]
    before = {p.pid for p in mp.active_children()}
    # batch_size 7: a configuration no other test uses, so its workers are new processes.
    two = PhraseParser(PhrasesConfig(n_process=2, batch_size=7), nlp=parser.nlp)
    result: dict = {}

    def run() -> None:
        try:
            result["out"] = two(texts)
        except BaseException as exc:  # the assertion below shows it
            result["error"] = exc

    thread = threading.Thread(target=run)  # as in a Prefect task
    thread.start()
    deadline = time.time() + 60
    while not (workers := [p for p in mp.active_children() if p.pid not in before]) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(workers[0].pid, signal.SIGKILL)  # the OOM killer, while it loads the model or parses
    thread.join(timeout=180)
    assert "error" not in result, repr(result.get("error"))
    assert result["out"] == parser(texts)
    assert two(texts[:20]) == parser(texts[:20])  # the replaced worker serves the next call
