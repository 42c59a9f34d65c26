"""The VQA prompt is the paper's, and the parser takes every shape of answer a model gives."""

import json

import pytest

from tasks.annotate.vqa_parse import PROMPT, QA_SCHEMA, build_messages, parse_qa

LIMITS = {"max_pairs": 5, "max_question_chars": 60, "max_answer_chars": 20}
PAIRS = [{"question": "What colour is the circle?", "answer": "red"},
         {"question": "Where is the square?", "answer": "left of the circle"}]


def test_prompt_is_the_papers_verbatim():
    text = build_messages("  a red circle. ")[0]["content"]
    assert text.startswith('Given the following image caption: "a red circle." Please generate five short questions')
    assert text.endswith("Do not invent details or use outside knowledge.")
    assert PROMPT.count("{ref_caption}") == 1
    assert QA_SCHEMA["properties"]["qa"]["items"]["required"] == ["question", "answer"]


@pytest.mark.parametrize("text", [
    json.dumps({"qa": PAIRS}),
    "Here you go:\n```json\n" + json.dumps({"qa": PAIRS}) + "\n```\nAnything else?",
    "Sure. " + json.dumps({"qa": PAIRS}) + " Done.",
    json.dumps(PAIRS),
    json.dumps({"pairs": PAIRS}),
    json.dumps({"qa": PAIRS})[:-2],  # truncated: complete objects are salvaged
    "Q: What colour is the circle?\nA: red\nQ: Where is the square?\nA: left of the circle",
    "1. Question: What colour is the circle?\n   Answer: red\n2. Question: Where is the square?\n   Answer: left of the circle",
    "Q1: What colour is the circle?\nA1: red\n\nQ2) Where is the square?\nA2) left of the circle",
])
def test_parses_json_fenced_truncated_and_text(text):
    parsed = parse_qa(text, **LIMITS)
    assert parsed.error is None and parsed.pairs == PAIRS


def test_truncated_json_keeps_complete_pairs_only():
    assert parse_qa(json.dumps({"qa": PAIRS})[:-5], **LIMITS).pairs == PAIRS[:1]
    assert parse_qa('{"qa": [{"question": "What colour', **LIMITS).error == "unparseable"


def test_control_characters_and_bad_escapes_are_read_not_fatal():
    # vLLM's xgrammar lets raw control characters into JSON strings (seen with `vllm serve`).
    text = '{"qa":[{"question":"Is it\x03 red?","answer":"ye\x1bs"}]}'
    assert parse_qa(text, **LIMITS).pairs == [{"question": "Is it\x03 red?", "answer": "ye\x1bs"}]
    salvaged = parse_qa('{"qa":[{"question":"Is it\x03 red?","answer":"a \\q"}, {"question": "Wh', **LIMITS)
    assert salvaged.pairs == [{"question": "Is it\x03 red?", "answer": "a \\q"}]


def test_nothing_pair_like_is_unparseable():
    assert parse_qa("", **LIMITS).error == "unparseable"
    assert parse_qa("{qa: [{question: What?}", **LIMITS).error == "unparseable"


def test_drops_bad_pairs_and_counts_why():
    pairs = [{"question": "What?", "answer": ""}, {"question": "Describe it", "answer": "a dog"},
             {"question": "Why " + "so " * 30 + "?", "answer": "x"}, {"question": "Which?", "answer": "a " * 20},
             {"question": "Ok?", "answer": "yes"}, {"question": "OK?", "answer": "no"}]
    parsed = parse_qa(json.dumps({"qa": pairs}), **LIMITS)
    assert parsed.pairs == [{"question": "Ok?", "answer": "yes"}]
    assert parsed.dropped == {"empty": 1, "not_a_question": 1, "too_long": 2, "duplicate": 1}
    only_bad = parse_qa(json.dumps({"qa": pairs[:2]}), **LIMITS)
    assert only_bad.pairs == [] and only_bad.error == "no_valid_pairs"


def test_caps_pairs_and_normalises_whitespace():
    pairs = [{"question": f"Question  number\n{i}?", "answer": f" {i} "} for i in range(8)]
    parsed = parse_qa(json.dumps({"qa": pairs}), **{**LIMITS, "max_pairs": 3})
    assert [p["question"] for p in parsed.pairs] == ["Question number 0?", "Question number 1?", "Question number 2?"]
    assert parsed.pairs[0]["answer"] == "0" and parsed.dropped == {"over_max_pairs": 5}
