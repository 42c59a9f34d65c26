"""The VQA prompt (paper, verbatim) and a forgiving parser of what the model answers.

METHOD.md sec. 7: Phi-3.5-mini-instruct gets the paper's prompt on the ShareGPT4V
short caption and should produce 3-5 short question-answer pairs, requested as
JSON ``{"qa": [{"question", "answer"}]}`` through structured outputs. Servers
without a grammar backend, truncated generations and in-process generation all
produce imperfect text, so parsing tries, in order: the whole text as JSON, JSON
inside a code fence or surrounded by prose, complete ``{"question": ..., "answer":
...}`` objects anywhere (which salvages truncated JSON), then ``Q:``/``A:`` or
``Question:``/``Answer:`` lines. JSON is read leniently: vLLM's grammar backend
(xgrammar) lets raw control characters into strings, which strict JSON forbids.
Pairs that are empty, over-long, or whose question does not end with "?" are
dropped and counted.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

PROMPT = (
    'Given the following image caption: "{ref_caption}" Please generate five short questions and corresponding '
    "short answers that someone might ask about this image. The questions should be relevant to the content of "
    "the caption, and the answers be very short, concise, and factual based on the caption. Only generate "
    "questions and answers that are strictly answerable using the provided caption. Do not invent details or use "
    "outside knowledge."
)

QA_SCHEMA = {
    "type": "object",
    "properties": {
        "qa": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
                "required": ["question", "answer"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["qa"],
    "additionalProperties": False,
}


def build_messages(caption: str) -> list[dict[str, str]]:
    """The chat the model sees: one user turn holding the paper's prompt."""
    return [{"role": "user", "content": PROMPT.format(ref_caption=caption.strip())}]


@dataclass
class ParsedQA:
    pairs: list[dict[str, str]]
    error: str | None  # None, "unparseable" (nothing looked like a pair) or "no_valid_pairs"
    dropped: Counter = field(default_factory=Counter)  # by reason


_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)
_PAIR_OBJECT = re.compile(
    r'\{\s*"question"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"answer"\s*:\s*"((?:[^"\\]|\\.)*)"\s*\}', re.DOTALL
)
_QA_LINE = re.compile(
    r"^\s*(?:[-*]\s*|\d+[.)]\s*)?(?P<tag>Q(?:uestion)?|A(?:nswer)?)\s*\d*\s*[:.)-]\s*(?P<text>.*)$", re.IGNORECASE
)


def _pairs_from_json(obj) -> list[tuple[str, str]] | None:
    if isinstance(obj, dict):
        items = obj.get("qa")
        if items is None:
            items = next((v for v in obj.values() if isinstance(v, list)), None)
    elif isinstance(obj, list):
        items = obj
    else:
        return None
    if not isinstance(items, list):
        return None
    pairs = []
    for item in items:
        if isinstance(item, dict):
            pairs.append((str(item.get("question") or ""), str(item.get("answer") or "")))
    return pairs


def _json_candidates(text: str):
    yield text
    for block in _FENCE.findall(text):
        yield block
    for open_, close in (("{", "}"), ("[", "]")):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            yield text[start : end + 1]


def _pairs_from_lines(text: str) -> list[tuple[str, str]]:
    pairs, question = [], None
    for line in text.splitlines():
        m = _QA_LINE.match(line)
        if not m:
            continue
        if m["tag"][0].lower() == "q":
            question = m["text"]
        elif question is not None:
            pairs.append((question, m["text"]))
            question = None
    return pairs


def _json_string(body: str) -> str:
    """The text of a JSON string literal's body; the body as it is when its escapes are invalid."""
    try:
        return json.loads(f'"{body}"', strict=False)
    except json.JSONDecodeError:
        return body


def extract_pairs(text: str) -> list[tuple[str, str]] | None:
    """Raw (question, answer) pairs from model output, or None when nothing looks like one."""
    for candidate in _json_candidates(text):
        try:
            pairs = _pairs_from_json(json.loads(candidate, strict=False))
        except (json.JSONDecodeError, ValueError):
            continue
        if pairs:
            return pairs
    objects = _PAIR_OBJECT.findall(text)
    if objects:
        return [(_json_string(q), _json_string(a)) for q, a in objects]
    return _pairs_from_lines(text) or None


def parse_qa(text: str, *, max_pairs: int, max_question_chars: int, max_answer_chars: int) -> ParsedQA:
    raw = extract_pairs(text or "")
    if raw is None:
        return ParsedQA([], "unparseable")
    pairs, dropped, seen = [], Counter(), set()
    for question, answer in raw:
        question, answer = " ".join(question.split()), " ".join(answer.split())
        if not question or not answer:
            dropped["empty"] += 1
        elif not question.endswith("?"):
            dropped["not_a_question"] += 1
        elif len(question) > max_question_chars or len(answer) > max_answer_chars:
            dropped["too_long"] += 1
        elif question.lower() in seen:
            dropped["duplicate"] += 1
        elif len(pairs) >= max_pairs:
            dropped["over_max_pairs"] += 1
        else:
            seen.add(question.lower())
            pairs.append({"question": question, "answer": answer})
    return ParsedQA(pairs, None if pairs else "no_valid_pairs", dropped)
