"""A rule-based STAND-IN for Phi-3.5-mini behind vLLM, so the demo trains the VQA task too.

The demo cannot run Phi-3.5 (no weights offline, no GPU), and a tiny random model writes
garbage the parser rightly rejects, which left L_vqa untrained. This stand-in answers the
paper's prompt the way the real model is asked to: three to five short question-answer
pairs "strictly answerable using the provided caption", as ``{"qa": [...]}`` JSON. It reads
the synthetic scene's words (colour, shape, size, position) out of the caption with a few
rules, so its answers are right for the demo's images and nothing else. The demo serves
it on loopback as an OpenAI-compatible server (``tasks/demo/openai_server.py``) and the vqa
stage reaches it through its real ``openai`` backend, exactly as open30m reaches vLLM.
"""

from __future__ import annotations

import re

from tasks.demo.source import COLOURS, NUM_WORDS, POSITIONS, SHAPES

MODEL_NAME = "scene-rules-standin"  # the served model name: says what answered in every request log
MAX_PAIRS = 5
AT = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
      "center": "in the center"}

_OBJECT = re.compile(
    rf"\b(?:(?P<size>small|large) )?(?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})\b"
    rf"(?P<where>[^,.]*?\b(?P<position>{'|'.join(POSITIONS)}|middle)\b)?"
)


def scene_objects(caption: str) -> list[dict[str, str | None]]:
    """The shapes a demo caption names, in order: colour, shape, and size and position when said."""
    objects = []
    for m in _OBJECT.finditer(caption.lower()):
        position = "center" if m["position"] == "middle" else m["position"]
        objects.append({"colour": m["colour"], "shape": m["shape"], "size": m["size"], "position": position})
    return objects


def scene_answers(caption: str) -> dict:
    """The paper's requested output for a demo caption: ``{"qa": [{"question", "answer"}, ...]}``."""
    objects = scene_objects(caption)
    if not objects:
        return {"qa": []}
    qa = []
    if len(objects) in NUM_WORDS:
        qa.append({"question": "How many shapes are there?", "answer": NUM_WORDS[len(objects)]})
    for obj in objects:
        name = f"{obj['colour']} {obj['shape']}"  # unique in a demo scene; a shape alone may not be
        if obj["position"]:
            qa.append({"question": f"What color is the shape {AT[obj['position']]}?", "answer": obj["colour"]})
            qa.append({"question": f"Where is the {name}?", "answer": obj["position"]})
        if obj["size"]:
            qa.append({"question": f"Is the {name} large or small?", "answer": obj["size"]})
    return {"qa": qa[:MAX_PAIRS]}
